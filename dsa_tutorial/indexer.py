"""The lightning indexer (equation 1 of the DeepSeek-V3.2-Exp report): which past tokens matter.

    I_t,s = sum_{j=1..H_I} w^I_t,j * ReLU(q^I_t,j . k^I_s)

One small MQA-like scorer per layer: H_I query heads of d_I dims per token, ONE key k^I_s of d_I
dims per token shared by all heads, a per-token, per-head weight w^I_t,j that may be negative,
and ReLU in place of softmax. Its scores only choose which tokens the main attention reads
(chapter 5, `topk`); they are never normalised.

What the official inference code does, step by step, and where it is here:

    1. q^I = wq_b(c^Q)              the query latent of MLA, not h          Indexer.forward
    2. k^I = LayerNorm(wk(h))       LayerNorm with bias                     Indexer.forward
    3. RoPE on the FIRST d_R dims   [rope | nope], "half" (non-interleaved)  indexer_rope
    4. Hadamard rotation            on BOTH q^I and k^I                      hadamard.rotate_activation
    5. FP8 e4m3, 128-value blocks   (the FP8 path; see `Indexer(fp8=True)`)
    6. w^I = weights_proj(h) H_I^-0.5, times d_I^-0.5 (and the q scale)    index_weights
    7. I_t,s as above                                                      index_scores
    8. causal mask: -inf where s is after t                                causal.visible

Interface (used by the sparse attention of chapter 6 and the training of chapters 8-9):

    index_scores(q_idx [T, H, D], w [T, H], k_idx [S, D]) -> float32 [T, S]
        (or with a leading batch dim: [B, T, H, D], [B, T, H], [B, S, D] -> [B, T, S])
    Indexer(args)                   nn.Module with parameters wq_b, wk, k_norm (weight, bias), weights_proj
      .forward(h [B, T, dim], c_q [B, T, q_lora_rank], positions int64 [T], cache=None)
          -> index_scores float32 [B, T, S], -inf where the key comes after the query
    IndexerCache(args, batch_size)  the indexer keys k^I of every cached token, [B, S, d_I]

CUDA: `index_scores_cuda` launches one of the kernels of cuda/index_scores.cu on bfloat16 q^I and
k^I; INDEX_SCORES_KERNELS lists them (naive, tiled in shared memory, tensor cores at two tile widths,
tensor cores with the keys held in registers).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .causal import visible
from .checks import FLOATS_BF16, check_shapes, check_tensor
from .config import ModelArgs, check_args
from .hadamard import rotate_activation
from .kernels import Kernel, KernelTable
from .rope import apply_rope

__all__ = ["index_scores", "index_weights", "indexer_rope", "IndexerCache", "Indexer",
           "index_scores_cuda", "INDEX_SCORES_KERNELS"]


# ----------------------------------------------------------------------------- equation 1

def index_scores(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """I_t,s = sum_j w_t,j ReLU(q_t,j . k_s), equation 1, computed in float32.

    q_idx [T, H, D], w [T, H], k_idx [S, D] -> [T, S]; or batched [B, T, H, D], [B, T, H], [B, S, D]
    -> [B, T, S]. No mask: every (t, s) pair is scored. Any float dtype in, float32 out.
    """
    b = "B, " if isinstance(q_idx, torch.Tensor) and q_idx.dim() == 4 else ""  # the batched form
    check_shapes(f"q_idx[{b}T, H, D] w[{b}T, H] k_idx[{b}S, D]", q_idx, w, k_idx, dtype=FLOATS_BF16)
    q_idx, w, k_idx = q_idx.float(), w.float(), k_idx.float()
    scores = q_idx.new_zeros(*q_idx.shape[:-3], q_idx.shape[-3], k_idx.shape[-2])  # [(B,) T, S]
    for j in range(q_idx.shape[-2]):
        # q^I_t,j . k^I_s for every pair: [(B,) T, S]
        logits = q_idx[..., j, :] @ k_idx.transpose(-1, -2)
        # I_t,s += w^I_t,j ReLU(q^I_t,j . k^I_s)
        scores += w[..., j, None] * torch.relu(logits)
    return scores


def index_weights(weights: torch.Tensor, args: ModelArgs, q_scale: torch.Tensor | None = None) -> torch.Tensor:
    """w^I_t,j = weights_proj(h_t)_j * H_I^-0.5 * d_I^-0.5 (* the FP8 scale of q^I_t,j).

    weights [..., T, H] (the output of weights_proj); q_scale [..., T, H] or None. The two constant
    factors (and q_scale) are folded into w because ReLU(c x) = c ReLU(x) for c > 0: scaling w by c
    is scaling q^I by c, for free. Same shape and dtype as `weights`.
    """
    check_args(args)
    check_tensor(weights, "weights", dtype=FLOATS_BF16)
    if weights.shape[-1] != args.index_n_heads:
        raise ValueError(f"weights must end with index_n_heads = {args.index_n_heads}, got {list(weights.shape)}")
    # w^I = weights_proj(h) * H_I^-0.5 * d_I^-0.5
    w = weights * (args.index_n_heads ** -0.5 * args.index_head_dim ** -0.5)
    if q_scale is not None:
        check_tensor(q_scale, "q_scale", shape=tuple(weights.shape), device=weights.device)
        # ... * q_scale_t,j, which the FP8 kernel then does not need to apply
        w = w * q_scale.to(w.dtype)
    return w


def indexer_rope(x: torch.Tensor, positions: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """RoPE on the FIRST d_R dims of x, "half" layout (pairs i, i + d_R/2); the rest untouched.

    x [B, T, H, d_I] (queries) or [B, T, 1, d_I] (keys); positions int64 [T]. The indexer's layout is
    [rope | nope], the reverse of MLA's [nope | rope], and its pairs are not interleaved.
    """
    check_args(args)
    check_tensor(x, "x", shape=("B", "T", "H", args.index_head_dim), dtype=FLOATS_BF16)
    d_rope = args.qk_rope_head_dim
    x_pe, x_nope = x.split([d_rope, args.index_head_dim - d_rope], dim=-1)
    # [RoPE_half(x[:d_R]) | x[d_R:]]: [B, T, H, d_I]
    return torch.cat([apply_rope(x_pe, positions, "half", args), x_nope], dim=-1)


# ----------------------------------------------------------------------------- cache and module

class IndexerCache:
    """The indexer's share of the cache: one key k^I_s [d_I] per token (after RoPE and Hadamard).

    k_idx [B, S, d_I] grows with `append`. With the FP8 path the official cache holds e4m3 values and
    one float32 scale per token (132 bytes for d_I = 128); this reference cache keeps the values the
    scores are computed from (dequantised on the FP8 path).
    """

    def __init__(self, args: ModelArgs, batch_size: int, dtype: torch.dtype = torch.float32, device="cpu"):
        check_args(args)
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.args = args
        self.k_idx = torch.empty(batch_size, 0, args.index_head_dim, dtype=dtype, device=device)

    def __len__(self) -> int:
        return self.k_idx.shape[1]

    def append(self, k_idx: torch.Tensor) -> None:
        """Add T tokens' keys: k_idx [B, T, d_I], the cache's dtype and device."""
        check_tensor(k_idx, "k_idx", shape=(self.k_idx.shape[0], None, self.args.index_head_dim),
                     dtype=self.k_idx.dtype, device=self.k_idx.device)
        if len(self) + k_idx.shape[1] > self.args.max_seq_len:
            raise ValueError(f"the indexer cache would hold {len(self) + k_idx.shape[1]} tokens, "
                             f"more than max_seq_len = {self.args.max_seq_len}")
        self.k_idx = torch.cat([self.k_idx, k_idx], dim=1)


def _fp8_module():
    try:
        from . import fp8
    except ImportError:
        return None
    return fp8 if hasattr(fp8, "act_quant") else None


class Indexer(nn.Module):
    """The lightning indexer of one layer, parameter names as in the official code.

    wq_b: [H_I d_I, d_c'] (reads c^Q), wk: [d_I, dim], k_norm: LayerNorm(d_I) with bias,
    weights_proj: [H_I, dim]. `fp8=True` rounds q^I and k^I to e4m3 with one power-of-two scale per
    128 values (dsa_tutorial.fp8.act_quant) and folds the q scale into w, as the official code does.
    """

    def __init__(self, args: ModelArgs = ModelArgs(), dtype: torch.dtype = torch.float32, device=None,
                 fp8: bool = False):
        super().__init__()
        check_args(args)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"Indexer parameters must be float32 or float64, got {dtype}")
        if fp8 and _fp8_module() is None:
            raise RuntimeError("the FP8 path needs dsa_tutorial.fp8.act_quant, which is not available")
        self.args, self.fp8 = args, fp8
        n_heads, d_idx = args.index_n_heads, args.index_head_dim
        linear = dict(bias=False, dtype=dtype, device=device)
        self.wq_b = nn.Linear(args.q_lora_rank, n_heads * d_idx, **linear)
        self.wk = nn.Linear(args.dim, d_idx, **linear)
        self.k_norm = nn.LayerNorm(d_idx, eps=1e-6, dtype=dtype, device=device)
        self.weights_proj = nn.Linear(args.dim, n_heads, **linear)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weights ~ N(0, 1/in_features), LayerNorm weight 1 and bias 0."""
        for layer in (self.wq_b, self.wk, self.weights_proj):
            layer.weight.normal_(0.0, layer.in_features ** -0.5)
        self.k_norm.reset_parameters()

    def queries(self, c_q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q^I_t,j = Hadamard(RoPE(wq_b c^Q_t)_j): [B, T, H_I, d_I]."""
        # wq_b c^Q_t, one d_I-dim query per head: [B, T, H_I, d_I]
        q = self.wq_b(c_q).unflatten(-1, (self.args.index_n_heads, self.args.index_head_dim))
        # RoPE (half layout) on the first d_R dims, then the Hadamard rotation: [B, T, H_I, d_I]
        return rotate_activation(indexer_rope(q, positions, self.args))

    def keys(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """k^I_s = Hadamard(RoPE(LayerNorm(wk h_s))): [B, T, d_I], one key for all heads."""
        # LayerNorm(wk h_s): [B, T, d_I]
        k = self.k_norm(self.wk(h))
        # RoPE on the first d_R dims (keys have no head axis: add one of size 1), then Hadamard
        return rotate_activation(indexer_rope(k.unsqueeze(2), positions, self.args).squeeze(2))

    def _fp8_round(self, q_idx: torch.Tensor, k_idx: torch.Tensor):
        """Step 5: e4m3 with one power-of-two scale per d_I values (one block: d_I <= 128).

        Returns the raw e4m3 values of q^I (as float32), k^I dequantised (value * scale, what the
        kernel's k_scale multiplication gives) and the q scales [B, T, H_I], to be folded into w.
        """
        block = self.args.index_head_dim
        if block > 128:
            raise ValueError(f"the FP8 path folds one q scale per head into w: needs index_head_dim <= 128, got {block}")
        act_quant = _fp8_module().act_quant
        q_fp8, q_scale = act_quant(q_idx.float().contiguous(), block_size=block)  # [B, T, H, d_I], [B, T, H, 1]
        k_fp8, k_scale = act_quant(k_idx.float().contiguous(), block_size=block)  # [B, T, d_I], [B, T, 1]
        # k^I ~= k_fp8 * k_scale (per token); q^I ~= q_fp8 * q_scale (per token and head, into w)
        return q_fp8.float(), (k_fp8.float() * k_scale).to(k_idx.dtype), q_scale.squeeze(-1)

    def forward(self, h: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor,
                cache: IndexerCache | None = None) -> torch.Tensor:
        """Causal index scores of the T new tokens against every cached token and themselves.

        h [B, T, dim]; c_q [B, T, q_lora_rank] (MLA's query latent); positions int64 [T] (RoPE).
        Causality follows cache slots, as in `mla.MLA`: query t is slot S - T + t and sees s <= it
        (with the default positions arange(len(cache), len(cache) + T) slot and position agree).
        Returns float32 [B, T, S], -inf where s comes after t.
        """
        args = self.args
        dims = {"B": h.shape[0] if isinstance(h, torch.Tensor) and h.dim() == 3 else -1}
        check_tensor(h, "h", shape=("B", "T", args.dim), dims=dims, dtype=self.wk.weight.dtype,
                     device=self.wk.weight.device)
        check_tensor(c_q, "c_q", shape=("B", "T", args.q_lora_rank), dims=dims, dtype=h.dtype, device=h.device)
        check_tensor(positions, "positions", shape=(h.shape[1],), dtype=torch.int64, device=h.device)
        q_idx = self.queries(c_q, positions)  # [B, T, H_I, d_I]
        k_new = self.keys(h, positions)  # [B, T, d_I]
        q_scale = None
        if self.fp8:
            q_idx, k_new, q_scale = self._fp8_round(q_idx, k_new)
        if cache is not None:
            if not isinstance(cache, IndexerCache):
                raise TypeError(f"cache must be an IndexerCache, got {type(cache).__name__}")
            cache.append(k_new.to(cache.k_idx.dtype))
            k_idx = cache.k_idx.to(h.dtype)  # [B, S, d_I]
        else:
            k_idx = k_new
        w = index_weights(self.weights_proj(h), args, q_scale)  # [B, T, H_I]
        scores = index_scores(q_idx, w, k_idx)  # [B, T, S]
        seen = visible(h.shape[1], k_idx.shape[1], h.device)  # [T, S]: s <= slot of t
        return scores.masked_fill(~seen, float("-inf"))


# ----------------------------------------------------------------------------- CUDA

#: The kernels of cuda/index_scores.cu, "kernel N" as its header and chapter 4 number them.
INDEX_SCORES_KERNELS = KernelTable("index_scores", [
    Kernel(1, "index_scores_naive", "one thread per score, everything read from global memory", needs="T <= 65535"),
    Kernel(2, "index_scores_tiled", "32 x 32 tiles of scores staged in shared memory"),
    Kernel(3, "index_scores_mma", "tensor cores (mma.sync bf16), 64 x 128 tiles"),
    Kernel(4, "index_scores_mma_wide", "tensor cores, 64 x 256 tiles: half the L2 reads of queries"),
    Kernel(5, "index_scores_mma_keys", "tensor cores, the keys held in registers", needs="D = 128"),
], best_first=(5, 3, 4, 2, 1))


def _launch_geometry(version: int, n_q: int, n_k: int, d_idx: int) -> tuple[tuple, int, int]:
    """(grid, threads a block, dynamic shared-memory bytes) of kernel `version`, from the .cu's #defines."""
    c = INDEX_SCORES_KERNELS.defines()
    if version == 1:  # a block: NAIVE_THREADS keys of one query
        return (math.ceil(n_k / c["NAIVE_THREADS"]), n_q), c["NAIVE_THREADS"], 0
    if version == 2:  # TILED_SMEM_ROWS float32 rows of D + 1 (an odd stride, against bank conflicts)
        tile = c["TILED_TILE"]
        return ((math.ceil(n_k / tile), math.ceil(n_q / tile)), c["TILED_THREADS"],
                c["TILED_SMEM_ROWS"] * (d_idx + 1) * 4)
    if version == 5:  # compiled for D = KEYS_D: a fixed amount of shared memory
        return ((math.ceil(n_k / c["KEYS_S"]), math.ceil(n_q / c["KEYS_T"])), c["KEYS_THREADS"],
                c["KEYS_SMEM_BYTES"])
    # kernels 3 and 4: SMEM_ROWS bf16 rows of D + MMA_PAD (the key tile and two query tiles)
    tile_s, threads, rows = ((c["MMA_S"], c["MMA_THREADS"], c["MMA_SMEM_ROWS"]) if version == 3 else
                             (c["MMA_WIDE_S"], c["MMA_WIDE_THREADS"], c["MMA_WIDE_SMEM_ROWS"]))
    return (math.ceil(n_k / tile_s), math.ceil(n_q / c["MMA_T"])), threads, rows * (d_idx + c["MMA_PAD"]) * 2


def _why_not(n_q: int, d_idx: int) -> dict[int, str | None]:
    """For INDEX_SCORES_KERNELS.choose: the reason each version cannot run these sizes (None: it can)."""
    d_keys = INDEX_SCORES_KERNELS.defines()["KEYS_D"]
    return {1: f"one grid row per query needs T <= 65535, got {n_q}" if n_q > 65535 else None,
            5: f"compiled for D = {d_keys} (the keys live in registers), got D = {d_idx}" if d_idx != d_keys else None}


def index_scores_cuda(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor, *, causal: bool = False,
                      kernel: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`cuda/index_scores.cu`: equation 1 on the GPU, float32 [T, S].

    q_idx [T, H, D] and k_idx [S, D] bfloat16, w [T, H] float32, all contiguous on one GPU and
    16-byte aligned, D a multiple of 16 and at most 256. `kernel`: a version of
    INDEX_SCORES_KERNELS (1 naive, 2 tiled, 3 mma, 4 mma_wide, 5 mma_keys); None takes the best
    that applies: kernel 5 when D = 128, else kernel 3. With `causal`, query t (slot S - T + t)
    gets -inf at keys s > S - T + t, and fully masked tiles are not computed. `out`: a
    preallocated float32 [T, S] to write into. One kernel launch, no host synchronisation.
    """
    dims = check_shapes("q_idx[T, H, D] w[T, H] k_idx[S, D]", q_idx, w, k_idx, cuda=True, contiguous=True)
    check_tensor(q_idx, "q_idx", dtype=torch.bfloat16)
    check_tensor(w, "w", dtype=torch.float32)
    check_tensor(k_idx, "k_idx", dtype=torch.bfloat16)
    n_q, n_heads, d_idx, n_k = dims["T"], dims["H"], dims["D"], dims["S"]
    if d_idx % 16 or not 16 <= d_idx <= 256:
        raise ValueError(f"the head dim D must be a multiple of 16 in [16, 256] (k-steps of 16), got {d_idx}")
    if q_idx.data_ptr() % 16 or k_idx.data_ptr() % 16:
        raise ValueError("q_idx and k_idx must start on a 16-byte boundary (the mma kernels copy 16-byte "
                         "chunks with cp.async); a sliced view may not: pass .clone()")
    if causal and n_q > n_k:
        raise ValueError(f"causal scoring needs T <= S (queries are the last T tokens), got T {n_q}, S {n_k}")
    chosen = INDEX_SCORES_KERNELS.choose(kernel, _why_not(n_q, d_idx))
    if out is None:
        out = torch.empty(n_q, n_k, dtype=torch.float32, device=q_idx.device)
    else:
        check_tensor(out, "out", shape=(n_q, n_k), dtype=torch.float32, device=q_idx.device, contiguous=True)
    if n_q == 0 or n_k == 0:
        return out
    if n_heads == 0:  # the empty sum: 0, and -inf after each query when causal
        out.zero_()
        return out.masked_fill_(~visible(n_q, n_k, out.device), float("-inf")) if causal else out
    grid, threads, smem = _launch_geometry(chosen.version, n_q, n_k, d_idx)
    INDEX_SCORES_KERNELS.launch(chosen.version, grid, threads, (q_idx, w, k_idx, out, n_q, n_k, n_heads, d_idx,
                                                                int(causal)), shared_mem=smem)
    return out
