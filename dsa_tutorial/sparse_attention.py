"""Sparse attention over the selected latents (equation 2), and the DSA layer: MLA + the indexer.

    u_t = Attn(h_t, { c_s : I_t,s in Top-k(I_t,:) })

DSA runs MLA in MQA mode: every cached token is one latent [c^KV_s | k^R_s] (576 values for V3.2)
shared by all n_h heads, so selecting k tokens for query t selects k latents, and each of them
serves every head at once. For head i:

    score_t,s,i = softmax_scale * (q^abs_t,i . c^KV_s + q^R_t,i . k^R_s),   s in S_t
    o^lat_t,i   = sum_{s in S_t} softmax_s(score_t,s,i) c^KV_s                    [d_c]

which is exactly dense MLA with the scores set to -inf outside S_t (the test checks it). A row
whose selection is empty (all -1) gets o^lat = 0, not NaN.

Interface (used by chapters 6, 8 and 9):

    sparse_mla_attention(q_abs [B,T,n_h,d_c], q_rope [B,T,n_h,d_R], c_kv [B,S,d_c], k_rope [B,S,d_R],
                         indices int32 [B,T,k], softmax_scale) -> o_latent [B,T,n_h,d_c]
    DSAttention(args, indexer_fp8=False, latent_cache_fp8=False)  nn.Module holding .mla (mla.MLA) and
                                  .indexer (indexer.Indexer, in FP8 as the official model runs it with
                                  indexer_fp8=True); latent_cache_fp8=True: MLA reads its latents as an FP8
                                  cache returns them (latent_cache.latent_round_trip)
      .forward(h, positions=None, cache=None, topk=None, return_aux=False, detach_indexer_input=False)
    DSACache(args, batch_size)    .latent (mla.LatentCache) and .index (indexer.IndexerCache)

CUDA: `sparse_mla_attention_cuda` runs cuda/sparse_mla_attention.cu for decode (one query token per
sequence, bf16 cache); SPARSE_MLA_ATTENTION_KERNELS lists its kernels: 1, float32 CUDA cores; 2,
tensor cores (the default).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .checks import FLOATS_BF16, check_range, check_shapes, check_tensor, data_checks_wanted
from .config import ModelArgs
from .indexer import Indexer, IndexerCache
from .kernels import Kernel, KernelTable
from .mla import MLA, LatentCache, causal_mask
from .topk import select_topk

__all__ = ["gather_latents", "sparse_mla_attention", "DSACache", "DSAttention", "sparse_mla_attention_cuda",
           "SPARSE_MLA_ATTENTION_KERNELS"]


def gather_latents(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x[b, indices[b, t, j]] for every (b, t, j): x [B, S, D], indices [B, T, k] -> [B, T, k, D].

    Unused slots (-1) gather position 0; the caller masks them.
    """
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]  # [B, 1, 1]
    return x[batch, indices.clamp(min=0).long()]  # [B, T, k, D]


def _check_indices(indices: torch.Tensor, n_keys: int) -> None:
    """Each row of `indices` lists distinct positions in [0, S), -1 for unused slots. These are
    device data: checked only when checks.data_checks_wanted(indices) (always on the CPU)."""
    if not data_checks_wanted(indices):
        return
    check_range(indices, "indices", -1, n_keys - 1)
    # the same position twice in one row would be counted twice: not a set
    ordered = indices.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(repeated.any()):
        raise ValueError("indices repeat a position within a row; each row must list distinct positions (-1 aside)")


def _check_scale(softmax_scale) -> None:
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive number, got {softmax_scale!r}")


def _check_attention_inputs(q_abs, q_rope, c_kv, k_rope, indices, softmax_scale) -> None:
    """The inputs of sparse_mla_attention: shapes, one float dtype, one device, the scale, the indices."""
    dims = check_shapes("q_abs[B, T, n_h, d_c] q_rope[B, T, n_h, d_R] c_kv[B, S, d_c] k_rope[B, S, d_R]",
                        q_abs, q_rope, c_kv, k_rope, dtype=FLOATS_BF16, same_dtype=True)
    check_shapes("indices[B, T, k]", indices, dims=dims, dtype=torch.int32, device=q_abs.device)
    _check_scale(softmax_scale)
    _check_indices(indices, dims["S"])


def sparse_mla_attention(q_abs: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                         indices: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """o^lat_t,i = sum_{s in S_t} softmax(score_t,:,i)_s c^KV_s over the selected latents only.

    q_abs [B, T, n_h, d_c], q_rope [B, T, n_h, d_R], c_kv [B, S, d_c], k_rope [B, S, d_R] (one float
    dtype); indices int32 [B, T, k], distinct positions in [0, S) per row, -1 for unused slots.
    Computed in float32 (float64 for float64 inputs). Returns o_latent [B, T, n_h, d_c].
    """
    _check_attention_inputs(q_abs, q_rope, c_kv, k_rope, indices, softmax_scale)
    dtype = torch.float64 if q_abs.dtype == torch.float64 else torch.float32
    q_abs, q_rope, c_kv, k_rope = (x.to(dtype) for x in (q_abs, q_rope, c_kv, k_rope))
    c_sel = gather_latents(c_kv, indices)  # [B, T, k, d_c]
    k_rope_sel = gather_latents(k_rope, indices)  # [B, T, k, d_R]
    # score_t,j,i = softmax_scale (q^abs_t,i . c^KV_s_j + q^R_t,i . k^R_s_j): [B, T, n_h, k]
    scores = (torch.einsum("bthc,btjc->bthj", q_abs, c_sel)
              + torch.einsum("bthr,btjr->bthj", q_rope, k_rope_sel)) * softmax_scale
    scores = scores.masked_fill((indices < 0)[:, :, None, :], float("-inf"))
    # softmax over the selected slots; an empty row (all -inf) gives NaN, set to 0 below
    p = torch.softmax(scores, dim=-1).nan_to_num(nan=0.0)
    # o^lat_t,i = sum_j p_t,j,i c^KV_s_j: [B, T, n_h, d_c]
    return torch.einsum("bthj,btjc->bthc", p, c_sel)


# ----------------------------------------------------------------------------- the DSA layer

class DSACache:
    """What DSA caches per token: MLA's latent [c^KV | k^R] and the indexer key k^I."""

    def __init__(self, args: ModelArgs, batch_size: int, dtype: torch.dtype = torch.float32, device="cpu"):
        self.latent = LatentCache(args, batch_size, dtype, device)
        self.index = IndexerCache(args, batch_size, dtype, device)

    def __len__(self) -> int:
        return len(self.latent)


class DSAttention(nn.Module):
    """DeepSeek Sparse Attention: MLA in MQA mode, reading only the top-k latents the indexer picks.

    forward(h [B, T, dim], positions=None, cache=None, topk=None, return_aux=False,
            detach_indexer_input=False) -> out [B, T, dim], or (out, aux) with
        aux["index_scores"] float32 [B, T, S], causal (-inf after the query);
        aux["indices"]      int32 [B, T, k], select_topk of the index scores (-1 padded);
        aux["attn_probs"]   float32 [B, T, n_h, S], the main attention's probabilities over all
                            visible positions, as dense MLA computes them (the warm-up KL target).
    k = min(topk or args.index_topk, S): with k >= S every visible token is selected and the layer
    is dense MLA. Prefill: T tokens, no cache (or an empty one). Decode: T = 1 with a DSACache.
    `detach_indexer_input` cuts the gradient from the indexer into h and c^Q (sparse training stage).
    `indexer_fp8=True` (constructor) runs the indexer's step 5 as the official model does: q^I and
    k^I rounded to FP8 e4m3 with one power-of-two scale per block (indexer.Indexer(fp8=True)).
    `latent_cache_fp8=True` (constructor) makes the attention read [c^KV | k^R] as DeepSeek-V3.2's FP8
    latent cache stores them: c^KV in e4m3 with a power-of-two scale per 128 values, k^R in bf16
    (mla.MLA(latent_cache_fp8=True), latent_cache.latent_round_trip).
    """

    def __init__(self, args: ModelArgs = ModelArgs(), dtype: torch.dtype = torch.float32, device=None,
                 indexer_fp8: bool = False, latent_cache_fp8: bool = False):
        super().__init__()
        self.args = args
        self.mla = MLA(args, dtype=dtype, device=device, latent_cache_fp8=latent_cache_fp8)
        # indexer_fp8: q^I and k^I rounded to e4m3 with block scales, as the official model always runs it
        self.indexer = Indexer(args, dtype=dtype, device=device, fp8=indexer_fp8)

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None, cache: DSACache | None = None,
                topk: int | None = None, return_aux: bool = False, detach_indexer_input: bool = False):
        args, mla = self.args, self.mla
        mla._check_h(h)
        if cache is not None and not isinstance(cache, DSACache):
            raise TypeError(f"cache must be a DSACache, got {type(cache).__name__}")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0):
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        n_past = 0 if cache is None else len(cache)
        if positions is None:
            positions = torch.arange(n_past, n_past + h.shape[1], device=h.device)
        c_q = mla.query_latent(h)  # [B, T, d_c']
        q_nope, q_rope = mla.queries(c_q, positions)  # [B, T, n_h, d_h], [B, T, n_h, d_R]
        c_kv, k_rope = mla.latents(h, positions)  # [B, T, d_c], [B, T, d_R]
        if cache is not None:
            cache.latent.append(c_kv.to(cache.latent.kv.dtype), k_rope.to(cache.latent.kv.dtype))
            c_kv, k_rope = cache.latent.c_kv.to(h.dtype), cache.latent.k_rope.to(h.dtype)  # [B, S, .]
        # the indexer reads h and c^Q; detached, its loss cannot reach the rest of the model
        h_idx, c_q_idx = (h.detach(), c_q.detach()) if detach_indexer_input else (h, c_q)
        index_scores = self.indexer(h_idx, c_q_idx, positions, None if cache is None else cache.index)  # [B, T, S]
        n_keys = c_kv.shape[1]
        k = min(topk or args.index_topk, n_keys)
        # S_t = Top-k(I_t,:) among s <= slot of t: [B, T, k]
        indices = select_topk(index_scores.detach().float(), k)
        q_abs = mla.absorb_query(q_nope)  # [B, T, n_h, d_c]
        o_latent = sparse_mla_attention(q_abs, q_rope, c_kv, k_rope, indices, args.softmax_scale).to(h.dtype)
        out = mla.latent_output(o_latent)  # [B, T, dim]
        if not return_aux:
            return out
        # what dense MLA would attend to: softmax over all visible positions, per head
        scores = mla.latent_scores(q_abs, q_rope, c_kv, k_rope)  # [B, T, n_h, S]
        mask = causal_mask(h.shape[1], n_keys, h.device, scores.dtype)  # [T, S]
        attn_probs = torch.softmax((scores + mask[:, None, :]).float(), dim=-1)
        return out, {"index_scores": index_scores, "indices": indices, "attn_probs": attn_probs}


# ----------------------------------------------------------------------------- CUDA

#: The kernels of cuda/sparse_mla_attention.cu (decode: one query token per sequence), "kernel N" as
#: its header and chapter 6 number them.
SPARSE_MLA_ATTENTION_KERNELS = KernelTable("sparse_mla_attention", [
    Kernel(1, "sparse_mla_attention_simt", "decode, float32 CUDA cores, 32 heads a block"),
    Kernel(2, "sparse_mla_attention_mma", "decode, tensor cores (mma.sync bf16), 64 heads a block",
           needs="16-byte aligned q_abs, q_rope, kv; 225 KiB of shared memory a block"),
])


def _why_not(q_abs, q_rope, kv) -> dict[int, str | None]:
    """For SPARSE_MLA_ATTENTION_KERNELS.choose: why each version cannot run these inputs (None: it can)."""
    smem = SPARSE_MLA_ATTENTION_KERNELS.defines()["MMA_SMEM_BYTES"]
    limit = getattr(torch.cuda.get_device_properties(kv.device), "shared_memory_per_block_optin", smem)
    misaligned = [name for name, x in (("q_abs", q_abs), ("q_rope", q_rope), ("kv", kv)) if x.data_ptr() % 16]
    return {2: (f"{', '.join(misaligned)} must start on a 16-byte boundary (cp.async rows); pass .clone()"
                if misaligned else
                f"needs {smem} bytes of shared memory a block, this GPU allows {limit}" if limit < smem else None)}


def sparse_mla_attention_cuda(q_abs: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                              softmax_scale: float, *, kernel: int | None = None,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """`cuda/sparse_mla_attention.cu`: sparse MLA attention for decode, one query token per sequence,
    over a bf16 latent cache. Returns o_latent float32 [B, n_h, 512].

    q_abs [B, n_h, 512] and q_rope [B, n_h, 64] bfloat16 (the kernels read both: no concatenation);
    kv [B, S, 576] bfloat16 (LatentCache.kv: [c_kv | k_rope]); indices int32 [B, k], distinct, in
    [-1, S). All contiguous on one GPU, B <= 65535. `kernel`: a version of
    SPARSE_MLA_ATTENTION_KERNELS (1 simt, float32 CUDA cores; 2 mma, tensor cores); None takes
    kernel 2 where it applies (16-byte aligned inputs, 225 KiB of shared memory a block), else 1.
    `out`: a preallocated float32 [B, n_h, 512] to write into. One kernel launch, no host
    synchronisation.

    The index values are device data: checked (range, repeats) only when checks.data_checks_wanted.
    Unchecked, the kernels still never read outside the cache: an index outside [0, S) counts as
    an unused slot (-1).
    """
    dims = check_shapes("q_abs[B, n_h, d_c] q_rope[B, n_h, d_R] kv[B, S, L]", q_abs, q_rope, kv,
                        dims={"d_c": 512, "d_R": 64, "L": 576}, dtype=torch.bfloat16, cuda=True, contiguous=True)
    check_shapes("indices[B, k]", indices, dims=dims, dtype=torch.int32, cuda=True, device=kv.device, contiguous=True)
    _check_scale(softmax_scale)
    batch, n_heads, n_keys, k = dims["B"], dims["n_h"], dims["S"], dims["k"]
    if any(x.data_ptr() % 4 for x in (q_abs, q_rope, kv)):  # bf16 pairs
        raise ValueError("q_abs, q_rope and kv must start on a 4-byte boundary (the kernels read bf16 pairs)")
    if batch > 65535:
        raise ValueError(f"batch must be at most 65535 (one grid row per sequence), got {batch}")
    chosen = SPARSE_MLA_ATTENTION_KERNELS.choose(kernel, _why_not(q_abs, q_rope, kv))
    _check_indices(indices, n_keys)  # only with data checks on
    if out is None:
        out = torch.empty(batch, n_heads, 512, dtype=torch.float32, device=kv.device)
    else:
        check_tensor(out, "out", shape=(batch, n_heads, 512), dtype=torch.float32, device=kv.device, contiguous=True)
    if batch == 0 or n_heads == 0:
        return out
    if k == 0 or n_keys == 0:  # nothing can be selected: the empty sum
        return out.zero_()
    c = SPARSE_MLA_ATTENTION_KERNELS.defines()
    heads, threads, smem = ((c["MMA_HEADS"], c["MMA_THREADS"], c["MMA_SMEM_BYTES"]) if chosen.version == 2 else
                            (c["SPARSE_HEADS"], c["SPARSE_THREADS"], c["SPARSE_SMEM_BYTES"]))
    SPARSE_MLA_ATTENTION_KERNELS.launch(chosen.version, (math.ceil(n_heads / heads), batch), threads,
                                        (q_abs, q_rope, kv, indices, out, batch, n_keys, n_heads, k,
                                         float(softmax_scale)), shared_mem=smem)
    return out
