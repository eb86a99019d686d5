"""The DSA layer on the GPU: the package's kernels chained inside one module call.

`DSAttention` (sparse_attention.py) is the specification of the whole layer: every step in torch, in
float32, simple enough to read against the paper. `DSAttentionCUDA` runs the same layer the way an
inference engine does, on the same parameters (it wraps a `DSAttention` and shares its modules):

    prefill, one sequence of T tokens at a time (positions 0 .. T-1):
        projections (torch)      c^Q, q = [q_abs | q_rope], [c^KV | k^R], q^I, k^I, w^I
        FP8 rounding             fp8.act_quant_cuda                        q^I, k^I -> e4m3 + scales
        caches                   the latent cache (656-byte FP8 tokens) and the indexer's key cache,
                                 both paged with one block table
        indexer logits           fp8.mqa_logits_cuda          I_t,s for s <= t           [chunk, T]
        top-k                    topk.select_topk_cuda        S_t                        [chunk, k]
                                 (QUERY_CHUNK queries at a time, so the logits never need T x T floats)
        sparse attention         sparse_prefill.sparse_mla_prefill_cuda over the latents read back
                                 from the FP8 cache (bf16, exact)                         [T, h, 512]
        output (torch)           wkv_b's value part, then wo                               [T, dim]

    decode, one (or two: speculative draft) new tokens for each of B sequences, each at its own
    position context_lens[b]:
        projections, FP8 rounding and cache writes as above, at slots taken from the block table
        indexer logits           paged.paged_mqa_logits_cuda over the paged key cache (its schedule
                                 from paged.paged_mqa_logits_metadata)                    [B T, capacity]
        top-k                    topk.select_topk_cuda with each row's own position        [B T, k]
        positions -> slots       block_table[b, p // 64] * 64 + p % 64 (-1 stays -1)
        sparse attention         latent_cache.sparse_mla_decode_fp8_cuda over the FP8 cache [B, T, h, 512]
        output (torch)           as above

Nothing in `decode` reads device data on the host: the lengths live on the GPU (`context_lens`,
advanced in place), the top-k width is fixed (k = topk, unused slots -1), so a decode step can be
captured in a CUDA graph and replayed (tests/test_layer_cuda.py does, and chapter 10 shows it).
The reference keeps k = min(topk, S); the extra slots here are -1 and add nothing to the sums.

How close to the reference: the reference `DSAttention(args, indexer_fp8=True,
latent_cache_fp8=True)` rounds q^I, k^I and c^KV exactly as the caches here store them, so the
indexer logits agree to float32 summation order and the latents attention reads are bit-identical.
What remains is the attention kernels' bf16: q = [q_abs | q_rope] is rounded to bf16 before the
kernel, P is rounded to bf16 before P V, the output is returned in bf16. The tests hold the layer's
output to calc_diff <= TOLERANCE["max_calc_diff"] and |out - ref| <= TOLERANCE["atol_rel"] * max |ref|
(measured on an H200: see the tests), and the selection to a valid top-k of the reference's scores
(every selected score >= every unselected one, up to float32 rounding).

What it does not do: chunked prefill (a prefill starts a sequence from an empty cache), freeing or
sharing blocks (the block table is fixed when the cache is made), training (no autograd through
kernels). The model dimensions must be DeepSeek-V3.2's attention dimensions (what the kernels
serve): kv_lora_rank 512, qk_rope_head_dim 64, n_heads 64 or 128, index_n_heads 64, index_head_dim
128; `dim`, `q_lora_rank` and the rest are free (tests use a small `dim`).
"""
from __future__ import annotations

import torch
from torch import nn

from . import fp8, latent_cache, paged
from .checks import check_range, check_tensor, data_checks_wanted
from .config import ModelArgs, check_args
from .indexer import index_weights
from .mla import kv_compress, rotary_key
from .sparse_attention import DSAttention, sparse_mla_attention
from .sparse_prefill import HEADS, sparse_mla_prefill_cuda
from .topk import select_topk_cuda

__all__ = ["PagedDSACache", "DSAttentionCUDA", "TOLERANCE", "check_kernel_dims", "reference_at", "check_selection",
           "same_sets"]

#: How far the GPU layer may be from the float32 reference layer (relative to the largest |output|,
#: and DeepGEMM's calc_diff): bf16 q, bf16 P and a bf16 attention output (see the module docstring).
TOLERANCE = {"atol_rel": 2e-2, "max_calc_diff": 1e-4}

BLOCK_SIZE = paged.BLOCK_KV  # 64 tokens a block, in both caches (DeepGEMM's paged layout fixes it)
QUERY_CHUNK = 4096  # prefill queries per indexer call: a chunk's logits are QUERY_CHUNK x T float32


def check_kernel_dims(args: ModelArgs) -> None:
    """The attention dimensions the chained kernels serve: DeepSeek-V3.2's. A clear error otherwise."""
    check_args(args)
    want = {"kv_lora_rank": latent_cache.D_NOPE, "qk_rope_head_dim": latent_cache.D_ROPE,
            "index_n_heads": 64, "index_head_dim": fp8.MQA_LOGITS_KERNELS.defines()["HEAD_DIM"]}
    wrong = {name: getattr(args, name) for name, value in want.items() if getattr(args, name) != value}
    if wrong or args.n_heads not in HEADS:
        raise ValueError(f"the GPU layer serves DeepSeek-V3.2's attention dimensions: {want} and n_heads in "
                         f"{HEADS}; got {dict(wrong, n_heads=args.n_heads)}")


def reference_at(layer: DSAttention, h: torch.Tensor, rows: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """The reference layer's output [len(rows), dim] at token rows `rows` of one sequence h [1, L, dim],
    attending to a given selection `selected` [len(rows), k] of positions (-1 unused): the formula of
    DSAttention with S_t given, so a GPU layer's output can be held to it at the selection it made."""
    mla, L = layer.mla, h.shape[1]
    positions = torch.arange(L, device=h.device)
    q_nope, q_rope = mla.queries(mla.query_latent(h), positions)
    c_kv, k_rope = mla.latents(h, positions)  # the FP8 round trip when layer.mla.latent_cache_fp8
    q_abs = mla.absorb_query(q_nope)
    o_latent = sparse_mla_attention(q_abs[:, rows], q_rope[:, rows], c_kv, k_rope, selected[None].int(),
                                    layer.args.softmax_scale)
    return mla.latent_output(o_latent)[0]


def check_selection(selected: torch.Tensor, scores: torch.Tensor, k: int) -> None:
    """Raise ValueError unless every row of `selected` [R, k'] (positions, -1 unused) is a top-k set of
    the same row of `scores` [R, S] (-inf where invisible): min(k, visible) distinct visible positions,
    no unselected score above a selected one by more than float32 rounding (1e-5 of the row's largest
    |score|: the GPU and the reference sum the logits in different orders)."""
    for r, (row, score) in enumerate(zip(selected.cpu(), scores.float().cpu())):
        visible = torch.isfinite(score)
        chosen = row[row >= 0].long()
        if len(chosen) != min(k, int(visible.sum())) or len(set(chosen.tolist())) != len(chosen):
            raise ValueError(f"row {r}: {len(chosen)} positions selected ({len(set(chosen.tolist()))} distinct), "
                             f"want min(k, visible) = {min(k, int(visible.sum()))}")
        if not bool(visible[chosen].all()):
            raise ValueError(f"row {r}: selects a position it cannot see")
        rest = visible.clone()
        rest[chosen] = False
        if rest.any() and len(chosen):
            slack = 1e-5 * float(score[visible].abs().max())
            if float(score[chosen].min()) < float(score[rest].max()) - slack:
                raise ValueError(f"row {r}: an unselected score {float(score[rest].max()):.6g} beats a selected "
                                 f"one {float(score[chosen].min()):.6g}")


def same_sets(selected: torch.Tensor, other: torch.Tensor) -> float:
    """The fraction of rows where two selections [R, k] hold the same set of positions (-1 ignored)."""
    same = [set(a[a >= 0].tolist()) == set(b[b >= 0].tolist()) for a, b in zip(selected.cpu(), other.cpu())]
    return sum(same) / max(len(same), 1)


class PagedDSACache:
    """The two paged caches of B sequences, as an engine keeps them on the GPU.

    latent      float8_e4m3fn [num_blocks, 64, 1, 656]: one FP8 token [c^KV | k^R] a row (latent_cache)
    index       uint8 [num_blocks, 64, 1, 132]: e4m3 k^I and its float32 scale (paged, DeepGEMM's layout)
    block_table int32 [B, max_blocks]: logical block j of sequence b is physical block block_table[b, j]
                (both caches use the same table: token p of sequence b is slot block_table[b, p // 64] * 64
                + p % 64 in each)
    context_lens int32 [B] on the GPU: how many tokens each sequence holds; decode advances it in place
    capacity    max_blocks * 64 (a host int): the longest a sequence may grow

    block_table: None gives sequence b the blocks b * max_blocks .. (b + 1) * max_blocks - 1; pass a
    permutation (tests do) to see that nothing assumes contiguous blocks. Its values (in [0,
    num_blocks)) are device data, checked where checks.data_checks_wanted.
    """

    def __init__(self, batch_size: int, max_context_len: int, device="cuda", block_table: torch.Tensor | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(max_context_len, bool) or not isinstance(max_context_len, int) or max_context_len <= 0:
            raise ValueError(f"max_context_len must be a positive int, got {max_context_len!r}")
        device = torch.empty(0, device=device).device  # "cuda" -> cuda:0, as tensors report it
        max_blocks = -(-max_context_len // BLOCK_SIZE)
        if block_table is None:
            block_table = torch.arange(batch_size * max_blocks, dtype=torch.int32, device=device)
            block_table = block_table.view(batch_size, max_blocks)
        check_tensor(block_table, "block_table", shape=(batch_size, max_blocks), dtype=torch.int32, device=device)
        num_blocks = batch_size * max_blocks
        check_range(block_table, "block_table", 0, num_blocks - 1)
        self.batch_size, self.capacity, self.num_blocks = batch_size, max_blocks * BLOCK_SIZE, num_blocks
        self.block_table = block_table.contiguous()
        self.latent = torch.zeros(num_blocks, BLOCK_SIZE, 1, latent_cache.TOKEN_BYTES, dtype=torch.uint8,
                                  device=device).view(torch.float8_e4m3fn)
        self.index = paged.new_kv_cache(num_blocks, device=device)
        self.context_lens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prefilled = [False] * batch_size  # host bookkeeping: prefill starts a sequence, once

    @property
    def device(self) -> torch.device:
        return self.block_table.device

    def slots(self, seq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of (sequence, position) pairs: block_table[seq, p // 64] * 64 + p % 64 (int64,
        the shape of `positions`). Positions are clipped into [0, capacity) first, so an unchecked
        position past the end overwrites the sequence's last slot instead of writing out of bounds."""
        p = positions.clamp(0, self.capacity - 1)
        return self.block_table[seq, p // BLOCK_SIZE].long() * BLOCK_SIZE + p % BLOCK_SIZE

    def write(self, slots: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor, k_fp8: torch.Tensor,
              k_scale: torch.Tensor) -> None:
        """Store N new tokens at `slots` [N]: the latent [c^KV | k^R] (quantised to the 656-byte FP8 row
        by latent_cache.quantize) and the indexer key (already e4m3 + scale)."""
        kv = torch.cat([c_kv, k_rope], dim=-1).to(torch.bfloat16)  # [N, 576]
        rows = latent_cache.quantize(kv[:, None, None]).view(torch.uint8)  # [N, 1, 1, 656]
        self.latent.view(torch.uint8).view(-1, latent_cache.TOKEN_BYTES)[slots] = rows.view(-1, latent_cache.TOKEN_BYTES)
        paged.store_kv(self.index, k_fp8, k_scale, slots)

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        """Copies of what decode changes (both caches, context_lens), for `restore`."""
        return tuple(t.clone() for t in (self.latent.view(torch.uint8), self.index, self.context_lens))

    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        """Put back a `snapshot`, in place: the tensors keep their addresses (a captured graph still
        reads and writes these very buffers)."""
        for live, saved in zip((self.latent.view(torch.uint8), self.index, self.context_lens), state):
            live.copy_(saved)

    def read_latents(self, slots: torch.Tensor) -> torch.Tensor:
        """The bf16 latents [N, 576] stored at `slots` [N] (latent_cache.dequantize: exact)."""
        rows = self.latent.view(torch.uint8).view(-1, latent_cache.TOKEN_BYTES)[slots]
        return latent_cache.dequantize(rows.view(torch.float8_e4m3fn)[:, None, None])[:, 0, 0]


class DSAttentionCUDA(nn.Module):
    """The GPU twin of a `DSAttention`: the same parameters, the package's kernels in between.

    prefill(h [n, T, dim], cache, seqs=None, topk=None, return_aux=False) -> out [n, T, dim]
        starts sequences `seqs` (default 0 .. n-1) of `cache` with T tokens each (call it again for
        other sequences and other lengths: the cache's sequences may be ragged).
    decode(h [B, T, dim], cache, topk=None, return_aux=False) -> out [B, T, dim]
        T in {1, 2} new tokens for every sequence of the cache, at positions context_lens[b] + j;
        advances context_lens by T. No host synchronisation: capturable in a CUDA graph.
    return_aux=True also returns {"positions": the selected positions [n or B, T, k] int32 (-1 unused),
    "index_logits": the indexer's logits (prefill: a list, per sequence and chunk of QUERY_CHUNK
    queries, of [chunk, T]; decode: [B T, capacity])}.
    topk: None takes args.index_topk; prefill keeps min(topk, T), decode keeps topk (fixed width).
    Outputs are in the layer's dtype (float32), computed from the kernels' bf16 attention output.
    """

    def __init__(self, layer: DSAttention):
        super().__init__()
        if not isinstance(layer, DSAttention):
            raise TypeError(f"layer must be a DSAttention, got {type(layer).__name__}")
        check_kernel_dims(layer.args)
        self.layer, self.args = layer, layer.args

    # --------------------------------------------------------------------- the steps both paths share

    def _check(self, h: torch.Tensor, cache: PagedDSACache, topk) -> int:
        self.layer.mla._check_h(h)
        if h.device.type != "cuda":
            raise ValueError(f"the GPU layer runs on a CUDA device: move the layer (and h) there, got {h.device}")
        if not isinstance(cache, PagedDSACache):
            raise TypeError(f"cache must be a PagedDSACache, got {type(cache).__name__}")
        if cache.device != h.device:
            raise ValueError(f"cache and h must be on one device, got {cache.device} and {h.device}")
        k = self.args.index_topk if topk is None else topk
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"topk must be a positive int, got {k!r}")
        return k

    def _project(self, h: torch.Tensor, positions: torch.Tensor) -> dict:
        """Every per-token projection of N tokens h [1, N, dim] at `positions` [N] (torch, the layer's
        own functions): the kernels' inputs, FP8 rounding of the indexer by act_quant_cuda."""
        mla, indexer, args = self.layer.mla, self.layer.indexer, self.args
        c_q = mla.query_latent(h)  # [1, N, d_c']
        q_nope, q_rope = mla.queries(c_q, positions)  # [1, N, n_h, d_h], [1, N, n_h, d_R]
        q_abs = mla.absorb_query(q_nope)  # [1, N, n_h, d_c]
        # [c^KV | k^R] before the cache: latent_cache.quantize rounds them as the cache stores them
        c_kv, k_pe = kv_compress(h, mla.wkv_a.weight, mla.kv_norm.weight, args)  # [1, N, d_c], [1, N, d_R]
        k_rope = rotary_key(k_pe, positions, args)
        # the indexer: q^I, k^I in e4m3 with one power-of-two scale a head (a key), w^I with q's scale folded in
        q_idx = indexer.queries(c_q, positions).float().contiguous()  # [1, N, H_I, d_I]
        k_idx = indexer.keys(h, positions).float().contiguous()  # [1, N, d_I]
        block = args.index_head_dim
        q_fp8, q_scale = fp8.act_quant_cuda(q_idx, block)  # [1, N, H_I, d_I] e4m3, [1, N, H_I, 1]
        k_fp8, k_scale = fp8.act_quant_cuda(k_idx, block)  # [1, N, d_I] e4m3, [1, N, 1]
        w = index_weights(indexer.weights_proj(h), args, q_scale.squeeze(-1))  # [1, N, H_I]
        q = torch.cat([q_abs, q_rope], dim=-1).to(torch.bfloat16)  # [1, N, n_h, 576]
        return dict(q=q[0], c_kv=c_kv[0], k_rope=k_rope[0], q_fp8=q_fp8[0], w=w[0].float().contiguous(),
                    k_fp8=k_fp8[0], k_scale=k_scale[0, :, 0].contiguous())

    def _output(self, o_latent: torch.Tensor) -> torch.Tensor:
        """o^lat (bf16 [..., n_h, 512]) -> the layer's output [..., dim] in the layer's dtype."""
        return self.layer.mla.latent_output(o_latent.to(self.layer.mla.dtype))

    # --------------------------------------------------------------------- prefill

    def prefill(self, h: torch.Tensor, cache: PagedDSACache, seqs=None, topk: int | None = None,
                return_aux: bool = False):
        k = self._check(h, cache, topk)
        n, T = h.shape[0], h.shape[1]
        seqs = list(range(n)) if seqs is None else [int(s) for s in seqs]
        if len(seqs) != n or len(set(seqs)) != n or not all(0 <= s < cache.batch_size for s in seqs):
            raise ValueError(f"seqs must be {n} distinct sequences of the cache (0 .. {cache.batch_size - 1}), "
                             f"got {seqs}")
        if T == 0 or T > cache.capacity:
            raise ValueError(f"a prefill writes 1 .. {cache.capacity} tokens (the cache's capacity), got T = {T}")
        started = [s for s in seqs if cache.prefilled[s]]
        if started:
            raise ValueError(f"sequences {started} already hold tokens: a prefill starts a sequence (no chunked prefill)")
        k = min(k, T)
        device, args = h.device, self.args
        positions = torch.arange(T, device=device)
        ks = torch.zeros(T, dtype=torch.int32, device=device)
        ke = torch.arange(1, T + 1, dtype=torch.int32, device=device)  # token t sees keys 0 .. t
        outs, selected_all, logits_all = [], [], []
        for i, seq in enumerate(seqs):
            x = self._project(h[i:i + 1], positions)
            slots = cache.slots(torch.full_like(positions, seq), positions)  # [T]
            cache.write(slots, x["c_kv"], x["k_rope"], x["k_fp8"], x["k_scale"])
            # the latents as attention reads them: back from the FP8 cache, bf16: [T, 1, 576]
            kv = cache.read_latents(slots)[:, None]
            selected = torch.empty(T, k, dtype=torch.int32, device=device)
            o_latent = torch.empty(T, args.n_heads, latent_cache.D_NOPE, dtype=torch.bfloat16, device=device)
            for a in range(0, T, QUERY_CHUNK):  # QUERY_CHUNK queries at a time: their logits are [chunk, T]
                b = min(a + QUERY_CHUNK, T)
                # I_t,s over the sequence's own keys, s <= t: [chunk, T] float32 (-inf beyond)
                logits = fp8.mqa_logits_cuda(x["q_fp8"][a:b], (x["k_fp8"], x["k_scale"]), x["w"][a:b], ks[a:b],
                                             ke[a:b])
                # S_t: the k best positions <= t, -1 padded: [chunk, k]
                select_topk_cuda(logits, k, positions[a:b], out=selected[a:b])
                sparse_mla_prefill_cuda(x["q"][a:b], kv, selected[a:b, None], args.softmax_scale,
                                        out=o_latent[a:b])
                if return_aux:
                    logits_all.append(logits)
            outs.append(self._output(o_latent[None])[0])  # [T, dim]
            selected_all.append(selected)
        cache.context_lens[torch.tensor(seqs, device=device)] = T
        for s in seqs:
            cache.prefilled[s] = True
        out = torch.stack(outs)  # [n, T, dim]
        if not return_aux:
            return out
        return out, {"positions": torch.stack(selected_all), "index_logits": logits_all}

    def capture_decode(self, h_static: torch.Tensor, cache: PagedDSACache, topk: int | None = None):
        """Capture one decode step in a CUDA graph, as an engine does once: -> (graph, out_static).

        `graph.replay()` then runs `decode(h_static, cache, topk)` on whatever h_static and the cache
        hold at that moment (copy the next tokens into h_static first), writes out_static and advances
        context_lens, with no Python in between. The warm-up call it needs first (outside the capture:
        allocations, kernel loading) is undone, so the cache is left as it was. Data checks must be
        off (their reads of device data cannot be captured)."""
        state = cache.snapshot()
        side = torch.cuda.Stream(device=h_static.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.decode(h_static, cache, topk)
        torch.cuda.current_stream().wait_stream(side)
        cache.restore(state)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_static = self.decode(h_static, cache, topk)
        cache.restore(state)  # capture runs nothing; kept for safety should that ever change
        return graph, out_static

    # --------------------------------------------------------------------- decode

    def decode(self, h: torch.Tensor, cache: PagedDSACache, topk: int | None = None, return_aux: bool = False):
        k = self._check(h, cache, topk)
        B, T = h.shape[0], h.shape[1]
        if B != cache.batch_size:
            raise ValueError(f"decode takes a token for every sequence of the cache: h has {B}, the cache "
                             f"{cache.batch_size}")
        if T not in (1, 2):
            raise ValueError(f"decode takes T = 1 new token a sequence (2 with a speculative draft token), got T = {T}")
        if k > cache.capacity:
            raise ValueError(f"topk ({k}) must be at most the cache's capacity ({cache.capacity})")
        if not all(cache.prefilled):
            missing = [b for b, done in enumerate(cache.prefilled) if not done]
            raise ValueError(f"sequences {missing} have no prefill yet: prefill them first")
        device, args = h.device, self.args
        if data_checks_wanted(cache.context_lens):
            check_range(cache.context_lens, "context_lens + T", 0, cache.capacity - T)
        # position of new token j of sequence b: context_lens[b] + j, every token one row: [B T]
        seq = torch.arange(B, device=device).repeat_interleave(T)
        positions = (cache.context_lens.long()[:, None] + torch.arange(T, device=device)).view(-1)
        x = self._project(h.reshape(1, B * T, args.dim), positions)
        cache.write(cache.slots(seq, positions), x["c_kv"], x["k_rope"], x["k_fp8"], x["k_scale"])
        cache.context_lens += T  # in place, on the device
        schedule = paged.paged_mqa_logits_metadata(cache.context_lens, BLOCK_SIZE, paged.schedule_size(device))
        q_fp8 = x["q_fp8"].view(B, T, args.index_n_heads, args.index_head_dim)
        # I over each sequence's cached keys (position p <= its own): [B T, capacity]
        logits = paged.paged_mqa_logits_cuda(q_fp8, cache.index, x["w"], cache.context_lens, cache.block_table,
                                             schedule, cache.capacity)
        selected = select_topk_cuda(logits, k, positions)  # [B T, k] positions, -1 unused
        # positions -> slots of the latent cache, -1 kept: [B, T, k]
        slots = cache.slots(seq[:, None], selected.long())
        indices = torch.where(selected >= 0, slots, -1).to(torch.int32).view(B, T, k)
        o_latent, _ = latent_cache.sparse_mla_decode_fp8_cuda(x["q"].view(B, T, args.n_heads, -1), cache.latent,
                                                              indices, args.softmax_scale)
        out = self._output(o_latent)  # [B, T, dim]
        if not return_aux:
            return out
        return out, {"positions": selected.view(B, T, k), "index_logits": logits}
