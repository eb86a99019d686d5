"""Multi-head latent attention (MLA): compression, decompression, the rotary key, and the query path.

One function per formula, in the paper's symbols (batch-first: B batch, T query tokens,
S cached tokens, n_h heads):

    (1)  c^KV_t = RMSNorm(W^DKV h_t)                     kv_compress     -> c_kv [B, T, d_c]
    (2)  [k^C_t,1..n_h] = W^UK c^KV_t, v^C = W^UV c^KV_t   kv_decompress   -> k_nope, v [B, S, n_h, d_h|d_v]
    (3)  k^R_t = RoPE(W^KR h_t)                           rotary_key      -> k_rope [B, T, d_R]
    (4)  k_t,i = [k^C_t,i ; k^R_t]                        final_key       -> k [B, S, n_h, d_h + d_R]
         c^Q_t = RMSNorm(W^DQ h_t)                        query_latent    -> c_q [B, T, d_c']
         q^C = W^UQ c^Q,  q^R = RoPE(W^QR c^Q)            queries         -> q_nope, q_rope
    absorption (MQA mode): score_t,s,i = (W^UK_i^T q^C_t,i) . c^KV_s + q^R_t,i . k^R_s
         absorb_query -> q_abs [B, T, n_h, d_c];  latent_scores -> [B, T, n_h, S];
         latent_output: o_i = W^UV_i (sum_s p_s c^KV_s), then W^O.

In the official code W^DKV and W^KR are one matrix, ``wkv_a`` [d_c + d_R, d] whose output is
split [c^KV | k^R before RoPE]; W^DQ is ``wq_a``; W^UQ and W^QR are ``wq_b`` (per head
[q^C (d_h) | q^R (d_R)]); W^UK and W^UV are ``wkv_b`` (per head [k^C (d_h) | v^C (d_v)]); W^O is ``wo``.

Interface used by the other chapters (the indexer and DSA):

    MLA(args)                     nn.Module with parameters wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo
      .query_latent(h)            h [B, T, dim] -> c_q [B, T, q_lora_rank]
      .queries(c_q, positions)    -> (q_nope [B, T, n_h, d_h], q_rope [B, T, n_h, d_R])
      .latents(h, positions)      -> (c_kv [B, T, d_c], k_rope [B, T, d_R]), kv_norm and RoPE applied
                                  (with MLA(args, latent_cache_fp8=True): as read back from an FP8 latent
                                  cache, c^KV in e4m3 with a scale per 128 values, k^R in bf16)
      .absorb_query(q_nope)       -> q_abs [B, T, n_h, d_c]
      .latent_scores(q_abs, q_rope, c_kv, k_rope) -> [B, T, n_h, S], times args.softmax_scale
      .latent_output(o_latent)    o_latent [B, T, n_h, d_c] -> [B, T, dim]
      .forward(h, positions=None, cache=None, mode="mqa" | "mha") -> [B, T, dim], causal
    LatentCache(args, batch_size) holds only kv [B, S, d_c + d_R] = [c^KV | k^R]; .append(c_kv, k_rope),
      len(cache), .c_kv / .k_rope (views), .kv (the contiguous [B, S, 576] tensor the kernels read).

CUDA (each kernel named after its reference; one kernel table per .cu file):

    kv_compress_cuda     cuda/kv_compress.cu    KV_COMPRESS_KERNELS: split + RMSNorm, optionally RoPE,
                         of the wkv_a output, written in the latent cache layout
    latent_scores_cuda   cuda/latent_scores.cu  LATENT_SCORES_KERNELS: the absorbed scores over the
                         latent cache, kernel 1 naive -> 2 tiled -> 3 mma -> 4 pipelined
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import causal
from .checks import FLOATS, FLOATS_BF16, check_range, check_shapes, check_tensor
from .config import ModelArgs, check_args
from .kernels import Kernel, KernelTable
from .norm import rms_norm
from .rope import apply_rope, cos_sin_table

__all__ = [
    "ModelArgs", "kv_compress", "kv_decompress", "rotary_key", "final_key", "query_latent", "queries",
    "absorb_query", "latent_scores", "latent_output", "explicit_scores", "causal_mask", "LatentCache", "RMSNorm",
    "MLA", "kv_compress_cuda", "latent_scores_cuda", "KV_COMPRESS_KERNELS", "LATENT_SCORES_KERNELS",
]


def _dims(args: ModelArgs) -> dict[str, int]:
    """The model's sizes by the names the shape specs below use: dim (d), d_c, d_cq (d_c'), d_R, d_h,
    d_v, d_k = d_h + d_R (an explicit key) and L = d_c + d_R (a latent cache row). The number of
    heads n_h is left free unless a weight fixes it."""
    a = check_args(args)
    return {"dim": a.dim, "d_c": a.kv_lora_rank, "d_cq": a.q_lora_rank, "d_R": a.qk_rope_head_dim,
            "d_h": a.qk_nope_head_dim, "d_v": a.v_head_dim, "d_k": a.qk_head_dim, "L": a.latent_dim}


# ----------------------------------------------------------------------------- formulas (1)-(4)

def kv_compress(h: torch.Tensor, wkv_a: torch.Tensor, kv_norm_weight: torch.Tensor,
                args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(1) c^KV_t = RMSNorm(W^DKV h_t), with W^KR h_t from the same matrix.

    h [B, T, dim]; wkv_a [d_c + d_R, dim] = [W^DKV; W^KR]; kv_norm_weight [d_c].
    Returns c_kv [B, T, d_c] (normalised) and k_pe [B, T, d_R] (W^KR h_t, before RoPE).
    """
    check_shapes("h[B, T, dim] wkv_a[L, dim] kv_norm_weight[d_c]", h, wkv_a, kv_norm_weight, dims=_dims(args),
                 dtype=FLOATS, same_dtype=True)
    # [W^DKV h_t ; W^KR h_t]: [B, T, d_c + d_R]
    kv = h @ wkv_a.T
    c_kv, k_pe = kv.split([args.kv_lora_rank, args.qk_rope_head_dim], dim=-1)
    # c^KV_t = RMSNorm(W^DKV h_t): [B, T, d_c]
    c_kv = rms_norm(c_kv, kv_norm_weight, args.norm_eps)
    return c_kv, k_pe


def kv_decompress(c_kv: torch.Tensor, wkv_b: torch.Tensor, args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(2) k^C_t,i = W^UK_i c^KV_t and v^C_t,i = W^UV_i c^KV_t for every head i.

    c_kv [B, S, d_c]; wkv_b [n_h (d_h + d_v), d_c], per head [W^UK_i; W^UV_i].
    Returns k_nope [B, S, n_h, d_h] and v [B, S, n_h, d_v].
    """
    n_h, d_h, d_v = check_args(args).n_heads, args.qk_nope_head_dim, args.v_head_dim
    check_shapes(f"c_kv[B, S, d_c] wkv_b[{n_h * (d_h + d_v)}, d_c]", c_kv, wkv_b, dims=_dims(args), dtype=FLOATS,
                 same_dtype=True)
    # [W^UK_i c^KV_t ; W^UV_i c^KV_t] for each head i: [B, S, n_h, d_h + d_v]
    kv = (c_kv @ wkv_b.T).unflatten(-1, (n_h, d_h + d_v))
    k_nope, v = kv.split([d_h, d_v], dim=-1)  # [B, S, n_h, d_h], [B, S, n_h, d_v]
    return k_nope, v


def rotary_key(k_pe: torch.Tensor, positions: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """(3) k^R_t = RoPE(W^KR h_t): one d_R-dim key per token, shared by all heads (interleaved pairs).

    k_pe [B, T, d_R] (W^KR h_t); positions int64 [T]. Returns k_rope [B, T, d_R].
    """
    check_shapes("k_pe[B, T, d_R]", k_pe, dims=_dims(args), dtype=FLOATS)
    # RoPE(k_pe) at each token's position, the same rotation for the whole batch: [B, T, d_R]
    return apply_rope(k_pe.unsqueeze(2), positions, "interleaved", args).squeeze(2)


def final_key(k_nope: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """(4) k_t,i = [k^C_t,i ; k^R_t]: the same k^R_t is appended to every head's key.

    k_nope [B, S, n_h, d_h]; k_rope [B, S, d_R]. Returns k [B, S, n_h, d_h + d_R].
    """
    check_shapes("k_nope[B, S, n_h, d_h] k_rope[B, S, d_R]", k_nope, k_rope, dtype=FLOATS, same_dtype=True)
    # k^R_t broadcast to every head: [B, S, n_h, d_R]
    k_rope = k_rope.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)
    return torch.cat([k_nope, k_rope], dim=-1)  # [B, S, n_h, d_h + d_R]


# ----------------------------------------------------------------------------- the query path

def query_latent(h: torch.Tensor, wq_a: torch.Tensor, q_norm_weight: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """c^Q_t = RMSNorm(W^DQ h_t). h [B, T, dim]; wq_a [d_c', dim]; q_norm_weight [d_c']. -> c_q [B, T, d_c']."""
    check_shapes("h[B, T, dim] wq_a[d_cq, dim] q_norm_weight[d_cq]", h, wq_a, q_norm_weight, dims=_dims(args),
                 dtype=FLOATS, same_dtype=True)
    # c^Q_t = RMSNorm(W^DQ h_t): [B, T, d_c']
    return rms_norm(h @ wq_a.T, q_norm_weight, args.norm_eps)


def queries(c_q: torch.Tensor, wq_b: torch.Tensor, positions: torch.Tensor,
            args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """q^C_t,i = W^UQ_i c^Q_t and q^R_t,i = RoPE(W^QR_i c^Q_t), interleaved pairs.

    c_q [B, T, d_c']; wq_b [n_h (d_h + d_R), d_c'], per head [W^UQ_i; W^QR_i]; positions int64 [T].
    Returns q_nope [B, T, n_h, d_h] and q_rope [B, T, n_h, d_R].
    """
    n_h, d_h, d_r = check_args(args).n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim
    check_shapes(f"c_q[B, T, d_cq] wq_b[{n_h * (d_h + d_r)}, d_cq]", c_q, wq_b, dims=_dims(args), dtype=FLOATS,
                 same_dtype=True)
    # [W^UQ_i c^Q_t ; W^QR_i c^Q_t]: [B, T, n_h, d_h + d_R]
    q = (c_q @ wq_b.T).unflatten(-1, (n_h, d_h + d_r))
    q_nope, q_pe = q.split([d_h, d_r], dim=-1)
    # q^R_t,i = RoPE(W^QR_i c^Q_t): [B, T, n_h, d_R]
    q_rope = apply_rope(q_pe, positions, "interleaved", args)
    return q_nope, q_rope


# ----------------------------------------------------------------------------- absorbed (MQA) mode

def absorb_query(q_nope: torch.Tensor, wkv_b: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """q^abs_t,i = W^UK_i^T q^C_t,i, so that q^C_t,i . k^C_s,i = q^abs_t,i . c^KV_s.

    q_nope [B, T, n_h, d_h]; wkv_b [n_h (d_h + d_v), d_c]. Returns q_abs [B, T, n_h, d_c].
    """
    n_h, d_h, d_v = check_args(args).n_heads, args.qk_nope_head_dim, args.v_head_dim
    check_shapes(f"q_nope[B, T, {n_h}, d_h] wkv_b[{n_h * (d_h + d_v)}, d_c]", q_nope, wkv_b, dims=_dims(args),
                 dtype=FLOATS, same_dtype=True)
    w_uk = wkv_b.view(n_h, d_h + d_v, args.kv_lora_rank)[:, :d_h]  # [n_h, d_h, d_c]
    # q^abs_t,i = W^UK_i^T q^C_t,i: [B, T, n_h, d_c]
    return torch.einsum("bthd,hdc->bthc", q_nope, w_uk)


def latent_scores(q_abs: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                  args: ModelArgs) -> torch.Tensor:
    """score_t,s,i = (q^abs_t,i . c^KV_s + q^R_t,i . k^R_s) * softmax_scale: one 576-dim latent per key.

    q_abs [B, T, n_h, d_c]; q_rope [B, T, n_h, d_R]; c_kv [B, S, d_c]; k_rope [B, S, d_R].
    Returns scores [B, T, n_h, S] (no mask).
    """
    check_shapes("q_abs[B, T, n_h, d_c] q_rope[B, T, n_h, d_R] c_kv[B, S, d_c] k_rope[B, S, d_R]",
                 q_abs, q_rope, c_kv, k_rope, dims=_dims(args), dtype=FLOATS, same_dtype=True)
    # q^abs_t,i . c^KV_s + q^R_t,i . k^R_s: [B, T, n_h, S]
    scores = torch.einsum("bthc,bsc->bths", q_abs, c_kv) + torch.einsum("bthr,bsr->bths", q_rope, k_rope)
    return scores * args.softmax_scale


def latent_output(o_latent: torch.Tensor, wkv_b: torch.Tensor, wo: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """o_t = W^O [W^UV_1 o^lat_t,1; ...; W^UV_nh o^lat_t,nh], with o^lat_t,i = sum_s p_t,s,i c^KV_s.

    o_latent [B, T, n_h, d_c]; wkv_b [n_h (d_h + d_v), d_c]; wo [dim, n_h d_v]. Returns [B, T, dim].
    """
    n_h, d_h, d_v = check_args(args).n_heads, args.qk_nope_head_dim, args.v_head_dim
    check_shapes(f"o_latent[B, T, {n_h}, d_c] wkv_b[{n_h * (d_h + d_v)}, d_c] wo[dim, {n_h * d_v}]", o_latent, wkv_b,
                 wo, dims=_dims(args), dtype=FLOATS, same_dtype=True)
    w_uv = wkv_b.view(n_h, d_h + d_v, args.kv_lora_rank)[:, d_h:]  # [n_h, d_v, d_c]
    # o_t,i = W^UV_i o^lat_t,i: [B, T, n_h, d_v]
    o = torch.einsum("bthc,hvc->bthv", o_latent, w_uv)
    # W^O [o_t,1; ...; o_t,nh]: [B, T, dim]
    return o.flatten(2) @ wo.T


# ----------------------------------------------------------------------------- explicit (MHA) mode

def explicit_scores(q_nope: torch.Tensor, q_rope: torch.Tensor, k: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """score_t,s,i = q_t,i . k_s,i * softmax_scale with q_t,i = [q^C_t,i; q^R_t,i] (MHA mode).

    q_nope [B, T, n_h, d_h]; q_rope [B, T, n_h, d_R]; k [B, S, n_h, d_h + d_R]. Returns [B, T, n_h, S].
    """
    check_shapes("q_nope[B, T, n_h, d_h] q_rope[B, T, n_h, d_R] k[B, S, n_h, d_k]", q_nope, q_rope, k,
                 dims=_dims(args), dtype=FLOATS, same_dtype=True)
    q = torch.cat([q_nope, q_rope], dim=-1)  # [B, T, n_h, d_h + d_R]
    # q_t,i . k_s,i: [B, T, n_h, S]
    return torch.einsum("bthd,bshd->bths", q, k) * args.softmax_scale


def causal_mask(n_queries: int, n_keys: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The additive causal mask [T, S]: 0 where query t may see key s (causal.visible), -inf after it."""
    visible = causal.visible(n_queries, n_keys, device)  # [T, S]
    return torch.zeros(n_queries, n_keys, device=device, dtype=dtype).masked_fill(~visible, float("-inf"))


# ----------------------------------------------------------------------------- cache and module

class LatentCache:
    """The MLA cache: per token only [c^KV (d_c) | k^R (d_R)], 576 values for V3.2.

    kv [B, S, d_c + d_R] grows by `append`; `c_kv` and `k_rope` are views of it.
    """

    def __init__(self, args: ModelArgs, batch_size: int, dtype: torch.dtype = torch.float32, device="cpu"):
        check_args(args)
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if dtype not in FLOATS_BF16:
            raise TypeError(f"cache dtype must be float32, float64 or bfloat16, got {dtype}")
        self.args = args
        self.kv = torch.empty(batch_size, 0, args.latent_dim, dtype=dtype, device=device)

    def __len__(self) -> int:
        return self.kv.shape[1]

    @property
    def c_kv(self) -> torch.Tensor:
        return self.kv[..., : self.args.kv_lora_rank]  # [B, S, d_c]

    @property
    def k_rope(self) -> torch.Tensor:
        return self.kv[..., self.args.kv_lora_rank:]  # [B, S, d_R]

    def append(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Add T tokens: c_kv [B, T, d_c], k_rope [B, T, d_R], same dtype and device as the cache."""
        check_shapes("c_kv[B, T, d_c] k_rope[B, T, d_R]", c_kv, k_rope, dims={**_dims(self.args), "B": len(self.kv)},
                     dtype=self.kv.dtype, device=self.kv.device)
        if len(self) + c_kv.shape[1] > self.args.max_seq_len:
            raise ValueError(f"the cache would hold {len(self) + c_kv.shape[1]} tokens, "
                             f"more than max_seq_len = {self.args.max_seq_len}")
        self.kv = torch.cat([self.kv, torch.cat([c_kv, k_rope], dim=-1)], dim=1)

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight (official name `weight`), computed by `norm.rms_norm`."""

    def __init__(self, dim: int, eps: float, dtype=torch.float32, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLA(nn.Module):
    """Multi-head latent attention with DeepSeek's parameter names; see the module docstring."""

    def __init__(self, args: ModelArgs = ModelArgs(), dtype: torch.dtype = torch.float32, device=None,
                 latent_cache_fp8: bool = False):
        super().__init__()
        check_args(args)
        if dtype not in FLOATS:
            raise TypeError(f"MLA parameters must be float32 or float64, got {dtype}")
        if not isinstance(latent_cache_fp8, bool):
            raise TypeError(f"latent_cache_fp8 must be True or False, got {latent_cache_fp8!r}")
        self.args = args
        # latent_cache_fp8: the latents pass through the FP8 cache format (latent_cache.latent_round_trip)
        # before attention reads them, as the official V3.2 inference model simulates its FP8 cache
        self.latent_cache_fp8 = latent_cache_fp8
        n_h, d_c = args.n_heads, args.kv_lora_rank
        linear = dict(bias=False, dtype=dtype, device=device)
        self.wq_a = nn.Linear(args.dim, args.q_lora_rank, **linear)  # W^DQ
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps, dtype, device)
        self.wq_b = nn.Linear(args.q_lora_rank, n_h * args.qk_head_dim, **linear)  # [W^UQ_i; W^QR_i] per head
        self.wkv_a = nn.Linear(args.dim, d_c + args.qk_rope_head_dim, **linear)  # [W^DKV; W^KR]
        self.kv_norm = RMSNorm(d_c, args.norm_eps, dtype, device)
        self.wkv_b = nn.Linear(d_c, n_h * (args.qk_nope_head_dim + args.v_head_dim), **linear)  # [W^UK_i; W^UV_i]
        self.wo = nn.Linear(n_h * args.v_head_dim, args.dim, **linear)  # W^O
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weights ~ N(0, 1/in_features) so every activation is O(1); norm weights 1."""
        for layer in (self.wq_a, self.wq_b, self.wkv_a, self.wkv_b, self.wo):
            layer.weight.normal_(0.0, layer.in_features ** -0.5)
        self.q_norm.weight.fill_(1.0)
        self.kv_norm.weight.fill_(1.0)

    @property
    def dtype(self) -> torch.dtype:
        return self.wq_a.weight.dtype

    def _check_h(self, h: torch.Tensor) -> None:
        check_tensor(h, "h", shape=("B", "T", self.args.dim), dtype=self.dtype, device=self.wq_a.weight.device)

    def query_latent(self, h: torch.Tensor) -> torch.Tensor:
        self._check_h(h)
        return query_latent(h, self.wq_a.weight, self.q_norm.weight, self.args)

    def queries(self, c_q: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return queries(c_q, self.wq_b.weight, positions, self.args)

    def latents(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_h(h)
        c_kv, k_pe = kv_compress(h, self.wkv_a.weight, self.kv_norm.weight, self.args)
        k_rope = rotary_key(k_pe, positions, self.args)
        if self.latent_cache_fp8:  # as an FP8 cache gives them back: c^KV in e4m3, k^R in bf16
            # imported here: latent_cache imports sparse_attention, which imports this module
            from .latent_cache import latent_round_trip

            c_kv, k_rope = latent_round_trip(c_kv, k_rope)
        return c_kv, k_rope

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        return absorb_query(q_nope, self.wkv_b.weight, self.args)

    def latent_scores(self, q_abs, q_rope, c_kv, k_rope) -> torch.Tensor:
        return latent_scores(q_abs, q_rope, c_kv, k_rope, self.args)

    def latent_output(self, o_latent: torch.Tensor) -> torch.Tensor:
        return latent_output(o_latent, self.wkv_b.weight, self.wo.weight, self.args)

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None, cache: LatentCache | None = None,
                mode: str = "mqa") -> torch.Tensor:
        """Causal MLA over the cache plus the T new tokens. h [B, T, dim] -> [B, T, dim].

        positions default to arange(len(cache), len(cache) + T) (RoPE only; causality follows cache
        slots). mode "mha" decompresses explicit keys and values, "mqa" attends over the latent.
        """
        self._check_h(h)
        if mode not in ("mqa", "mha"):
            raise ValueError(f"mode must be 'mqa' or 'mha', got {mode!r}")
        n_past = 0 if cache is None else len(cache)
        if cache is not None:
            if not isinstance(cache, LatentCache):
                raise TypeError(f"cache must be a LatentCache, got {type(cache).__name__}")
            if cache.kv.shape[0] != h.shape[0]:
                raise ValueError(f"cache holds batch {cache.kv.shape[0]}, h has batch {h.shape[0]}")
        if positions is None:
            positions = torch.arange(n_past, n_past + h.shape[1], device=h.device)
        c_q = self.query_latent(h)
        q_nope, q_rope = self.queries(c_q, positions)  # [B, T, n_h, d_h], [B, T, n_h, d_R]
        c_kv, k_rope = self.latents(h, positions)  # [B, T, d_c], [B, T, d_R]
        if cache is not None:
            cache.append(c_kv.to(cache.kv.dtype), k_rope.to(cache.kv.dtype))
            c_kv, k_rope = cache.c_kv.to(h.dtype), cache.k_rope.to(h.dtype)  # [B, S, .]
        mask = causal_mask(h.shape[1], c_kv.shape[1], h.device, h.dtype)  # [T, S]
        if mode == "mha":
            k_nope, v = kv_decompress(c_kv, self.wkv_b.weight, self.args)
            k = final_key(k_nope, k_rope)  # [B, S, n_h, d_h + d_R]
            scores = explicit_scores(q_nope, q_rope, k, self.args)  # [B, T, n_h, S]
            p = F.softmax(scores + mask[:, None, :], dim=-1)
            o = torch.einsum("bths,bshv->bthv", p, v)  # [B, T, n_h, d_v]
            return o.flatten(2) @ self.wo.weight.T
        q_abs = self.absorb_query(q_nope)  # [B, T, n_h, d_c]
        scores = self.latent_scores(q_abs, q_rope, c_kv, k_rope)  # [B, T, n_h, S]
        p = F.softmax(scores + mask[:, None, :], dim=-1)
        # o^lat_t,i = sum_s p_t,s,i c^KV_s: [B, T, n_h, d_c]
        o_latent = torch.einsum("bths,bsc->bthc", p, c_kv)
        return self.latent_output(o_latent)


# ----------------------------------------------------------------------------- CUDA loaders

#: The kernels of cuda/kv_compress.cu; kv_compress_cuda(kernel=None) takes the highest that applies.
#: {rope} is "" (k^R copied) or "_rope" (k^R rotated at the given positions).
KV_COMPRESS_KERNELS = KernelTable("kv_compress", [
    Kernel(1, "kv_compress{rope}_{dtype}", "scalar: one warp per token, one value per lane per step; any d_c, d_R"),
    Kernel(2, "kv_compress{rope}_vec_{dtype}", "vector: the row loaded at once in 16-byte chunks, kept in registers",
           needs="d_c = COMPRESS_D_C (512) and d_R = COMPRESS_D_R (64), compiled in; 16-byte aligned kv, "
                 "kv_norm_weight and out"),
], variants={"rope": ("", "_rope"), "dtype": ("f32", "bf16")})

#: The kernels of cuda/latent_scores.cu; latent_scores_cuda(kernel=None) takes the highest that applies.
LATENT_SCORES_KERNELS = KernelTable("latent_scores", [
    Kernel(1, "latent_scores_naive_f32", "naive: one thread per score, the latent row read from global memory",
           needs="float32"),
    Kernel(2, "latent_scores_tiled_f32", "tiled: 64 rows x 64 keys a block, 32 dims at a time in shared memory",
           needs="float32"),
    Kernel(3, "latent_scores_mma_bf16", "tensor cores (mma.sync m16n8k16): 128 rows x 64 keys a block",
           needs="bfloat16, d_c and d_R multiples of 16, 16-byte aligned inputs"),
    Kernel(4, "latent_scores_pipelined_bf16", "mma.sync fed by a cp.async pipeline: query tile kept in shared "
           "memory, one persistent block per SM", needs="what kernel 3 needs, and room for the query tile and "
           "PIPE_STAGES cache stages in one block's shared memory"),
])


def kv_compress_cuda(kv: torch.Tensor, kv_norm_weight: torch.Tensor, args: ModelArgs,
                     positions: torch.Tensor | None = None, out: torch.Tensor | None = None, *,
                     kernel: int | None = None) -> torch.Tensor:
    """`cuda/kv_compress.cu`: formula (1), and (3) when `positions` are given, fused after the GEMM.

    The reference kv_compress takes h and wkv_a and returns c_kv and k_pe apart; the kernel takes the
    GEMM's output kv = h wkv_a^T [T, d_c + d_R] and writes the latent cache rows [T, d_c + d_R] =
    [RMSNorm(c^KV) | k^R] (LatentCache.kv's layout), k^R rotated (interleaved RoPE) at `positions`
    int64 [T] when given, copied unrotated otherwise. kv float32 or bfloat16 (float32 arithmetic),
    kv_norm_weight float32 [d_c], contiguous, on the GPU; written into `out` [T, d_c + d_R] when given.

    `kernel`: a version of KV_COMPRESS_KERNELS (1 scalar, 2 vector); None takes the highest that
    applies. Positions outside [0, max_seq_len) are refused only with the package's data checks on
    (checks.set_data_checks, DSA_CHECK=1: reading them is a device sync); with them off the kernels
    write NaN for such a token's k^R and never read outside the table."""
    dims = _dims(args)
    check_shapes("kv[T, L]", kv, dims=dims, dtype=(torch.float32, torch.bfloat16), cuda=True, contiguous=True)
    check_shapes("kv_norm_weight[d_c]", kv_norm_weight, dims=dims, dtype=torch.float32, device=kv.device,
                 contiguous=True)
    if positions is not None:
        check_shapes("positions[T]", positions, dims=dims, dtype=torch.int64, device=kv.device, contiguous=True)
        check_range(positions, "positions", 0, args.max_seq_len - 1)  # device data: only with data checks on
    latent = torch.empty_like(kv) if out is None else out
    check_shapes("out[T, L]", latent, dims=dims, dtype=kv.dtype, device=kv.device, contiguous=True)
    defines = KV_COMPRESS_KERNELS.defines()
    built_in = (defines["COMPRESS_D_C"], defines["COMPRESS_D_R"])
    why_not = {2: (f"is compiled for (d_c, d_R) = {built_in}, got {(dims['d_c'], dims['d_R'])}"
                   if (dims["d_c"], dims["d_R"]) != built_in else
                   "needs 16-byte aligned kv, kv_norm_weight and out"
                   if any(t.data_ptr() % 16 for t in (kv, kv_norm_weight, latent)) else None)}
    chosen = KV_COMPRESS_KERNELS.choose(kernel, why_not)
    n_tokens = kv.shape[0]
    if n_tokens == 0:
        return latent
    sizes = () if chosen.version == 2 else (dims["d_c"], dims["d_R"])  # kernel 2 has them compiled in
    launch_args = (kv.detach(), kv_norm_weight.detach(), latent, n_tokens, *sizes, float(args.norm_eps))
    if positions is not None:
        cos, sin = cos_sin_table(args, kv.device)
        launch_args += (positions, cos, sin, args.max_seq_len)
    KV_COMPRESS_KERNELS.launch(chosen.version, math.ceil(n_tokens / defines["COMPRESS_WARPS"]),
                               defines["COMPRESS_THREADS"], launch_args, rope="" if positions is None else "_rope",
                               dtype="f32" if kv.dtype == torch.float32 else "bf16")
    return latent


def _pipelined_smem_bytes(args: ModelArgs) -> int:
    """Dynamic shared memory of kernel 4 of cuda/latent_scores.cu, from its #defines: the query tile
    (PIPE_ROWS rows of the latent width rounded up to PIPE_DIMS, bf16) and PIPE_STAGES cache stages."""
    defines = LATENT_SCORES_KERNELS.defines()
    stages_per_row = math.ceil(args.latent_dim / defines["PIPE_DIMS"])
    return (defines["PIPE_ROWS"] * stages_per_row * defines["PIPE_ROW_BYTES"]
            + defines["PIPE_STAGES"] * defines["PIPE_STAGE_BYTES"])


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int]:
    """(the most shared memory one block may ask for, the number of SMs) of GPU `index`: 227 KiB and
    132 on an H200. Host metadata, asked once per GPU."""
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block), props.multi_processor_count


def _latent_scores_why_not(dtype: torch.dtype, batch: int, rows: int, n_keys: int, args: ModelArgs, aligned: bool,
                           smem_limit: int) -> dict[int, str | None]:
    """Why each kernel of LATENT_SCORES_KERNELS cannot run these inputs (None: it can), from host
    metadata only: its dtype, the tensor-core shapes and alignment, its own grid's limits (kernels
    1-3: (key blocks, row blocks, batch), at most 65535 row blocks and batch entries; kernel 4: a
    1-D grid over an int32 count of tiles), and kernel 4's shared memory."""
    defines = LATENT_SCORES_KERNELS.defines()
    d_c, d_r = args.kv_lora_rank, args.qk_rope_head_dim
    f32 = None if dtype == torch.float32 else f"is built for float32 inputs, got {dtype}"
    bf16 = None if dtype == torch.bfloat16 else f"is built for bfloat16 inputs, got {dtype}"
    mma = (f"needs d_c and d_R multiples of 16 (the k-step of mma m16n8k16), got {d_c} and {d_r}"
           if d_c % 16 or d_r % 16 else
           "reads 16-byte chunks: needs 16-byte aligned q_abs, q_rope and latent" if not aligned else None)

    def grid(row_blocks: int) -> str | None:
        return (f"needs a grid of {row_blocks} row blocks x {batch} batch entries, at most 65535 each"
                if max(row_blocks, batch) > 65535 else None)

    tiles = batch * math.ceil(rows / defines["PIPE_ROWS"]) * math.ceil(n_keys / defines["PIPE_KEYS"])
    smem = _pipelined_smem_bytes(args)
    return {
        1: f32 or grid(rows),
        2: f32 or grid(math.ceil(rows / defines["TILE"])),
        3: bf16 or mma or grid(math.ceil(rows / defines["MMA_ROWS"])),
        4: bf16 or mma or (f"counts its {tiles} tiles of scores in int32" if tiles >= 2**31 else None)
        or (f"needs {smem} bytes of shared memory per block, the GPU offers {smem_limit}" if smem > smem_limit
            else None),
    }


def latent_scores_cuda(q_abs: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, args: ModelArgs,
                       out: torch.Tensor | None = None, *, kernel: int | None = None) -> torch.Tensor:
    """`cuda/latent_scores.cu`: latent_scores on the GPU, over the latent cache as stored,
    scores[b, t, i, s] = (q_abs[b, t, i] . c_kv[b, s] + q_rope[b, t, i] . k_rope[b, s]) * softmax_scale.

    The reference takes c_kv [B, S, d_c] and k_rope [B, S, d_R] apart; the kernels read the cache rows
    latent [B, S, d_c + d_R] = [c_kv | k_rope] (LatentCache.kv), so that
    latent_scores_cuda(q_abs, q_rope, latent, args) == latent_scores(q_abs, q_rope, latent[..., :d_c],
    latent[..., d_c:], args). q_abs [B, T, n_h, d_c], q_rope [B, T, n_h, d_R], latent: contiguous, on
    the GPU, all float32 (kernels 1, 2) or all bfloat16 (kernels 3, 4: tensor cores). Returns float32
    [B, T, n_h, S], written into `out` when given.

    `kernel`: a version of LATENT_SCORES_KERNELS; None takes the highest that applies (kernel 2 for
    float32; kernel 4 for bfloat16, kernel 3 where its shared memory does not fit the GPU). No
    device data is read (the inputs hold no index): no host sync."""
    dims = _dims(args)
    check_shapes("q_abs[B, T, n_h, d_c] q_rope[B, T, n_h, d_R] latent[B, S, L]", q_abs, q_rope, latent, dims=dims,
                 dtype=(torch.float32, torch.bfloat16), same_dtype=True, cuda=True, contiguous=True)
    batch, n_q, n_h, _ = q_abs.shape
    n_keys = latent.shape[1]
    rows = n_q * n_h  # the T n_h query rows of one batch entry share its cache
    scores = torch.empty((batch, n_q, n_h, n_keys), dtype=torch.float32, device=q_abs.device) if out is None else out
    check_shapes("out[B, T, n_h, S]", scores, dims=dims, dtype=torch.float32, device=q_abs.device, contiguous=True)
    aligned = all(t.data_ptr() % 16 == 0 for t in (q_abs, q_rope, latent))
    smem_limit, n_sm = _device_limits(q_abs.device.index)
    why_not = _latent_scores_why_not(q_abs.dtype, batch, rows, n_keys, args, aligned, smem_limit)
    chosen = LATENT_SCORES_KERNELS.choose(kernel, why_not)
    if batch == 0 or rows == 0 or n_keys == 0:
        return scores
    defines = LATENT_SCORES_KERNELS.defines()
    launch_args = (q_abs.detach(), q_rope.detach(), latent.detach(), scores, rows, n_keys, dims["d_c"], dims["d_R"],
                   float(args.softmax_scale))
    threads, shared_mem = defines["THREADS"], 0
    if chosen.version == 1:
        grid, threads = (math.ceil(n_keys / defines["NAIVE_THREADS"]), rows, batch), defines["NAIVE_THREADS"]
    elif chosen.version == 2:
        grid = (math.ceil(n_keys / defines["TILE"]), math.ceil(rows / defines["TILE"]), batch)
    elif chosen.version == 3:
        grid = (math.ceil(n_keys / defines["TILE"]), math.ceil(rows / defines["MMA_ROWS"]), batch)
    else:  # persistent blocks, one per SM, over the (batch entry, row block, key tile) work items
        tiles = batch * math.ceil(rows / defines["PIPE_ROWS"]) * math.ceil(n_keys / defines["PIPE_KEYS"])
        grid = min(tiles, n_sm)
        launch_args, shared_mem = launch_args + (batch,), _pipelined_smem_bytes(args)
    LATENT_SCORES_KERNELS.launch(chosen.version, grid, threads, launch_args, shared_mem=shared_mem)
    return scores
