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
    DSAttention(args)             nn.Module holding .mla (mla.MLA) and .indexer (indexer.Indexer)
      .forward(h, positions=None, cache=None, topk=None, return_aux=False, detach_indexer_input=False)
    DSACache(args, batch_size)    .latent (mla.LatentCache) and .index (indexer.IndexerCache)

CUDA: `sparse_mla_decode_cuda` runs cuda/sparse_mla.cu (one query token per sequence, bf16 cache):
kernel="mma" (tensor cores, the default) or "simt" (the first, float32 CUDA-core kernel).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .checks import check_range, check_same_device, check_tensor
from .config import ModelArgs
from .indexer import Indexer, IndexerCache
from .kernels import launch
from .mla import MLA, LatentCache, causal_mask
from .topk import select_topk

__all__ = ["gather_latents", "sparse_mla_attention", "DSACache", "DSAttention", "sparse_mla_decode_cuda",
           "SPARSE_HEADS", "SPARSE_CHUNK", "SPARSE_KERNELS"]

FLOATS = (torch.float32, torch.float64, torch.bfloat16)
SPARSE_HEADS, SPARSE_CHUNK, SPARSE_THREADS = 32, 32, 256  # kernel 1, as #defined in cuda/sparse_mla.cu
MMA_HEADS, MMA_TILE, MMA_THREADS = 64, 64, 256  # kernel 2, as #defined in cuda/sparse_mla.cu
SPARSE_KERNELS = ("mma", "simt")  # kernel 2 (the default), kernel 1


def gather_latents(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x[b, indices[b, t, j]] for every (b, t, j): x [B, S, D], indices [B, T, k] -> [B, T, k, D].

    Unused slots (-1) gather position 0; the caller masks them.
    """
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]  # [B, 1, 1]
    return x[batch, indices.clamp(min=0).long()]  # [B, T, k, D]


def _check_indices(indices: torch.Tensor, n_keys: int) -> None:
    check_range(indices, "indices", -1, n_keys - 1)
    # the same position twice in one row would be counted twice: not a set
    ordered = indices.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(repeated.any()):
        raise ValueError("indices repeat a position within a row; each row must list distinct positions (-1 aside)")


def sparse_mla_attention(q_abs: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                         indices: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """o^lat_t,i = sum_{s in S_t} softmax(score_t,:,i)_s c^KV_s over the selected latents only.

    q_abs [B, T, n_h, d_c], q_rope [B, T, n_h, d_R], c_kv [B, S, d_c], k_rope [B, S, d_R] (one float
    dtype); indices int32 [B, T, k], distinct positions in [0, S) per row, -1 for unused slots.
    Computed in float32 (float64 for float64 inputs). Returns o_latent [B, T, n_h, d_c].
    """
    dims: dict[str, int] = {}
    check_tensor(q_abs, "q_abs", shape=("B", "T", "n_h", "d_c"), dims=dims, dtype=FLOATS)
    check_tensor(q_rope, "q_rope", shape=("B", "T", "n_h", "d_R"), dims=dims, dtype=q_abs.dtype)
    check_tensor(c_kv, "c_kv", shape=("B", "S", "d_c"), dims=dims, dtype=q_abs.dtype)
    check_tensor(k_rope, "k_rope", shape=("B", "S", "d_R"), dims=dims, dtype=q_abs.dtype)
    check_tensor(indices, "indices", shape=("B", "T", "k"), dims=dims, dtype=torch.int32)
    check_same_device(q_abs=q_abs, q_rope=q_rope, c_kv=c_kv, k_rope=k_rope, indices=indices)
    if not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive number, got {softmax_scale!r}")
    _check_indices(indices, c_kv.shape[1])
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
    """

    def __init__(self, args: ModelArgs = ModelArgs(), dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.args = args
        self.mla = MLA(args, dtype=dtype, device=device)
        self.indexer = Indexer(args, dtype=dtype, device=device)

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

def sparse_mla_decode_cuda(q_abs: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                           softmax_scale: float, check_indices: bool = True, kernel: str = "mma") -> torch.Tensor:
    """`cuda/sparse_mla.cu`: one query token per sequence over a bf16 latent cache.

    q_abs [B, n_h, 512] and q_rope [B, n_h, 64] bfloat16; kv [B, S, 576] bfloat16 (LatentCache.kv:
    [c_kv | k_rope]); indices int32 [B, k], distinct, in [-1, S). All contiguous on one GPU.
    Returns o_latent float32 [B, n_h, 512]. `check_indices=False` skips the range check (a device
    sync), as the benchmark does; the kernels themselves ignore any index outside [0, S).
    `kernel`: "mma" (kernel 2, tensor cores: bf16 probabilities in P V, float32 accumulation; kv
    must start on a 16-byte boundary) or "simt" (kernel 1, float32 CUDA-core math throughout).
    """
    if kernel not in SPARSE_KERNELS:
        raise ValueError(f"kernel must be one of {SPARSE_KERNELS}, got {kernel!r}")
    dims = {"d_c": 512, "d_R": 64, "L": 576}
    check_tensor(q_abs, "q_abs", shape=("B", "n_h", "d_c"), dims=dims, dtype=torch.bfloat16, cuda=True)
    check_tensor(q_rope, "q_rope", shape=("B", "n_h", "d_R"), dims=dims, dtype=torch.bfloat16, cuda=True)
    check_tensor(kv, "kv", shape=("B", "S", "L"), dims=dims, dtype=torch.bfloat16, cuda=True, contiguous=True)
    check_tensor(indices, "indices", shape=("B", "k"), dims=dims, dtype=torch.int32, cuda=True, contiguous=True)
    check_same_device(q_abs=q_abs, q_rope=q_rope, kv=kv, indices=indices)
    if not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive number, got {softmax_scale!r}")
    batch, n_heads, _ = q_abs.shape
    n_keys, k = kv.shape[1], indices.shape[1]
    alignment = 16 if kernel == "mma" else 4  # 16-byte cp.async rows / bf16 pairs
    if kv.data_ptr() % alignment:
        raise ValueError(f"kv must start on a {alignment}-byte boundary for kernel {kernel!r}; pass .clone()")
    if batch > 65535:
        raise ValueError(f"batch must be at most 65535 (one grid row per sequence), got {batch}")
    if check_indices:
        _check_indices(indices, n_keys)
    out = torch.empty(batch, n_heads, 512, dtype=torch.float32, device=q_abs.device)
    if batch == 0 or n_heads == 0:
        return out
    if k == 0 or n_keys == 0:
        return out.zero_()
    q = torch.cat([q_abs, q_rope], dim=-1).contiguous()  # [B, n_h, 576], a fresh (256-byte aligned) tensor
    args = (q, kv, indices, out, batch, n_keys, n_heads, k, float(softmax_scale))
    if kernel == "mma":
        # Q [64, 576] + 2 stages x [64, 576] bf16 + P [64, 64] bf16 + row exchange [2, 64] f32 + valid [2, 64] i32
        smem = (MMA_HEADS + 2 * MMA_TILE) * 576 * 2 + MMA_HEADS * MMA_TILE * 2 + 2 * MMA_HEADS * 4 + 2 * MMA_TILE * 4
        limit = getattr(torch.cuda.get_device_properties(q.device), "shared_memory_per_block_optin", smem)
        if limit < smem:  # 225 KiB: Hopper (H100/H200) has 227 KiB a block, smaller GPUs less
            raise ValueError(f"kernel 'mma' needs {smem} bytes of shared memory a block, this GPU allows {limit}; "
                             "use kernel='simt'")
        launch("sparse_mla", "sparse_mla_decode_mma", grid=(math.ceil(n_heads / MMA_HEADS), batch),
               block=MMA_THREADS, args=args, shared_mem=smem)
        return out
    smem = (SPARSE_HEADS + SPARSE_CHUNK) * (576 + 2) * 2 + SPARSE_HEADS * SPARSE_CHUNK * 4 + SPARSE_CHUNK * 4
    launch("sparse_mla", "sparse_mla_decode", grid=(math.ceil(n_heads / SPARSE_HEADS), batch),
           block=SPARSE_THREADS, args=args, shared_mem=smem)
    return out
