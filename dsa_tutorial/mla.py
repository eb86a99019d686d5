"""Multi-head latent attention (MLA), formulas 1-4 of the guide plus the query path.

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
      .absorb_query(q_nope)       -> q_abs [B, T, n_h, d_c]
      .latent_scores(q_abs, q_rope, c_kv, k_rope) -> [B, T, n_h, S], times args.softmax_scale
      .latent_output(o_latent)    o_latent [B, T, n_h, d_c] -> [B, T, dim]
      .forward(h, positions=None, cache=None, mode="mqa" | "mha") -> [B, T, dim], causal
    LatentCache(args, batch_size) holds only kv [B, S, d_c + d_R] = [c^KV | k^R]; .append(c_kv, k_rope),
      len(cache), .c_kv / .k_rope (views), .kv (the contiguous [B, S, 576] tensor the kernels read).

CUDA: `kv_compress_cuda` (cuda/mla_compress.cu: split + RMSNorm, optionally RoPE, of the wkv_a
output into the latent cache layout) and `decode_scores_cuda` (cuda/mla_decode_scores.cu:
absorbed scores over the latent cache, kernels naive -> tiled -> mma -> pipelined).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import causal
from .checks import check_range, check_same_device, check_tensor
from .config import ModelArgs
from .kernels import launch
from .norm import rms_norm
from .rope import apply_rope, cos_sin_table

__all__ = [
    "ModelArgs", "kv_compress", "kv_decompress", "rotary_key", "final_key", "query_latent", "queries",
    "absorb_query", "latent_scores", "latent_output", "explicit_scores", "causal_mask", "LatentCache", "RMSNorm",
    "MLA", "kv_compress_cuda", "decode_scores_cuda", "COMPRESS_WARPS", "SCORES_TILE", "SCORES_MMA_ROWS",
]

FLOATS = (torch.float32, torch.float64)


def _check_args(args) -> None:
    if not isinstance(args, ModelArgs):
        raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")


# ----------------------------------------------------------------------------- formulas (1)-(4)

def kv_compress(h: torch.Tensor, wkv_a: torch.Tensor, kv_norm_weight: torch.Tensor,
                args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(1) c^KV_t = RMSNorm(W^DKV h_t), with W^KR h_t from the same matrix.

    h [B, T, dim]; wkv_a [d_c + d_R, dim] = [W^DKV; W^KR]; kv_norm_weight [d_c].
    Returns c_kv [B, T, d_c] (normalised) and k_pe [B, T, d_R] (W^KR h_t, before RoPE).
    """
    _check_args(args)
    dims = {"dim": args.dim}
    check_tensor(h, "h", shape=("B", "T", "dim"), dims=dims, dtype=FLOATS)
    check_tensor(wkv_a, "wkv_a", shape=(args.latent_dim, "dim"), dims=dims, dtype=h.dtype, device=h.device)
    check_tensor(kv_norm_weight, "kv_norm_weight", shape=(args.kv_lora_rank,), device=h.device)
    # [W^DKV h_t ; W^KR h_t]: [B, T, d_c + d_R]
    kv = h @ wkv_a.T
    c_kv, k_pe = kv.split([args.kv_lora_rank, args.qk_rope_head_dim], dim=-1)
    # c^KV_t = RMSNorm(W^DKV h_t): [B, T, d_c]
    c_kv = rms_norm(c_kv, kv_norm_weight.to(h.dtype), args.norm_eps)
    return c_kv, k_pe


def kv_decompress(c_kv: torch.Tensor, wkv_b: torch.Tensor, args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(2) k^C_t,i = W^UK_i c^KV_t and v^C_t,i = W^UV_i c^KV_t for every head i.

    c_kv [B, S, d_c]; wkv_b [n_h (d_h + d_v), d_c], per head [W^UK_i; W^UV_i].
    Returns k_nope [B, S, n_h, d_h] and v [B, S, n_h, d_v].
    """
    _check_args(args)
    check_tensor(c_kv, "c_kv", shape=("B", "S", args.kv_lora_rank), dtype=FLOATS)
    n_h, d_h, d_v = args.n_heads, args.qk_nope_head_dim, args.v_head_dim
    check_tensor(wkv_b, "wkv_b", shape=(n_h * (d_h + d_v), args.kv_lora_rank), dtype=c_kv.dtype, device=c_kv.device)
    # [W^UK_i c^KV_t ; W^UV_i c^KV_t] for each head i: [B, S, n_h, d_h + d_v]
    kv = (c_kv @ wkv_b.T).unflatten(-1, (n_h, d_h + d_v))
    k_nope, v = kv.split([d_h, d_v], dim=-1)  # [B, S, n_h, d_h], [B, S, n_h, d_v]
    return k_nope, v


def rotary_key(k_pe: torch.Tensor, positions: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """(3) k^R_t = RoPE(W^KR h_t): one d_R-dim key per token, shared by all heads (interleaved pairs).

    k_pe [B, T, d_R] (W^KR h_t); positions int64 [T]. Returns k_rope [B, T, d_R].
    """
    _check_args(args)
    check_tensor(k_pe, "k_pe", shape=("B", "T", args.qk_rope_head_dim), dtype=FLOATS)
    # RoPE(k_pe) at each token's position, the same rotation for the whole batch: [B, T, d_R]
    return apply_rope(k_pe.unsqueeze(2), positions, "interleaved", args).squeeze(2)


def final_key(k_nope: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """(4) k_t,i = [k^C_t,i ; k^R_t]: the same k^R_t is appended to every head's key.

    k_nope [B, S, n_h, d_h]; k_rope [B, S, d_R]. Returns k [B, S, n_h, d_h + d_R].
    """
    dims: dict[str, int] = {}
    check_tensor(k_nope, "k_nope", shape=("B", "S", "n_h", "d_h"), dims=dims, dtype=FLOATS)
    check_tensor(k_rope, "k_rope", shape=("B", "S", "d_R"), dims=dims, dtype=k_nope.dtype, device=k_nope.device)
    # k^R_t broadcast to every head: [B, S, n_h, d_R]
    k_rope = k_rope.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)
    return torch.cat([k_nope, k_rope], dim=-1)  # [B, S, n_h, d_h + d_R]


# ----------------------------------------------------------------------------- the query path

def query_latent(h: torch.Tensor, wq_a: torch.Tensor, q_norm_weight: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """c^Q_t = RMSNorm(W^DQ h_t). h [B, T, dim]; wq_a [d_c', dim]; q_norm_weight [d_c']. -> c_q [B, T, d_c']."""
    _check_args(args)
    dims = {"dim": args.dim}
    check_tensor(h, "h", shape=("B", "T", "dim"), dims=dims, dtype=FLOATS)
    check_tensor(wq_a, "wq_a", shape=(args.q_lora_rank, "dim"), dims=dims, dtype=h.dtype, device=h.device)
    check_tensor(q_norm_weight, "q_norm_weight", shape=(args.q_lora_rank,), device=h.device)
    # c^Q_t = RMSNorm(W^DQ h_t): [B, T, d_c']
    return rms_norm(h @ wq_a.T, q_norm_weight.to(h.dtype), args.norm_eps)


def queries(c_q: torch.Tensor, wq_b: torch.Tensor, positions: torch.Tensor,
            args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """q^C_t,i = W^UQ_i c^Q_t and q^R_t,i = RoPE(W^QR_i c^Q_t), interleaved pairs.

    c_q [B, T, d_c']; wq_b [n_h (d_h + d_R), d_c'], per head [W^UQ_i; W^QR_i]; positions int64 [T].
    Returns q_nope [B, T, n_h, d_h] and q_rope [B, T, n_h, d_R].
    """
    _check_args(args)
    check_tensor(c_q, "c_q", shape=("B", "T", args.q_lora_rank), dtype=FLOATS)
    n_h, d_h, d_r = args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim
    check_tensor(wq_b, "wq_b", shape=(n_h * (d_h + d_r), args.q_lora_rank), dtype=c_q.dtype, device=c_q.device)
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
    _check_args(args)
    n_h, d_h, d_v = args.n_heads, args.qk_nope_head_dim, args.v_head_dim
    check_tensor(q_nope, "q_nope", shape=("B", "T", n_h, d_h), dtype=FLOATS)
    check_tensor(wkv_b, "wkv_b", shape=(n_h * (d_h + d_v), args.kv_lora_rank), dtype=q_nope.dtype,
                 device=q_nope.device)
    w_uk = wkv_b.view(n_h, d_h + d_v, args.kv_lora_rank)[:, :d_h]  # [n_h, d_h, d_c]
    # q^abs_t,i = W^UK_i^T q^C_t,i: [B, T, n_h, d_c]
    return torch.einsum("bthd,hdc->bthc", q_nope, w_uk)


def latent_scores(q_abs: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                  args: ModelArgs) -> torch.Tensor:
    """score_t,s,i = (q^abs_t,i . c^KV_s + q^R_t,i . k^R_s) * softmax_scale: one 576-dim latent per key.

    q_abs [B, T, n_h, d_c]; q_rope [B, T, n_h, d_R]; c_kv [B, S, d_c]; k_rope [B, S, d_R].
    Returns scores [B, T, n_h, S] (no mask).
    """
    _check_args(args)
    dims = {"d_c": args.kv_lora_rank, "d_R": args.qk_rope_head_dim}
    check_tensor(q_abs, "q_abs", shape=("B", "T", "n_h", "d_c"), dims=dims, dtype=FLOATS)
    check_tensor(q_rope, "q_rope", shape=("B", "T", "n_h", "d_R"), dims=dims, dtype=q_abs.dtype)
    check_tensor(c_kv, "c_kv", shape=("B", "S", "d_c"), dims=dims, dtype=q_abs.dtype)
    check_tensor(k_rope, "k_rope", shape=("B", "S", "d_R"), dims=dims, dtype=q_abs.dtype)
    check_same_device(q_abs=q_abs, q_rope=q_rope, c_kv=c_kv, k_rope=k_rope)
    # q^abs_t,i . c^KV_s + q^R_t,i . k^R_s: [B, T, n_h, S]
    scores = torch.einsum("bthc,bsc->bths", q_abs, c_kv) + torch.einsum("bthr,bsr->bths", q_rope, k_rope)
    return scores * args.softmax_scale


def latent_output(o_latent: torch.Tensor, wkv_b: torch.Tensor, wo: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """o_t = W^O [W^UV_1 o^lat_t,1; ...; W^UV_nh o^lat_t,nh], with o^lat_t,i = sum_s p_t,s,i c^KV_s.

    o_latent [B, T, n_h, d_c]; wkv_b [n_h (d_h + d_v), d_c]; wo [dim, n_h d_v]. Returns [B, T, dim].
    """
    _check_args(args)
    n_h, d_h, d_v = args.n_heads, args.qk_nope_head_dim, args.v_head_dim
    check_tensor(o_latent, "o_latent", shape=("B", "T", n_h, args.kv_lora_rank), dtype=FLOATS)
    check_tensor(wkv_b, "wkv_b", shape=(n_h * (d_h + d_v), args.kv_lora_rank), dtype=o_latent.dtype,
                 device=o_latent.device)
    check_tensor(wo, "wo", shape=(args.dim, n_h * d_v), dtype=o_latent.dtype, device=o_latent.device)
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
    _check_args(args)
    dims: dict[str, int] = {}
    check_tensor(q_nope, "q_nope", shape=("B", "T", "n_h", args.qk_nope_head_dim), dims=dims, dtype=FLOATS)
    check_tensor(q_rope, "q_rope", shape=("B", "T", "n_h", args.qk_rope_head_dim), dims=dims, dtype=q_nope.dtype)
    check_tensor(k, "k", shape=("B", "S", "n_h", args.qk_head_dim), dims=dims, dtype=q_nope.dtype)
    check_same_device(q_nope=q_nope, q_rope=q_rope, k=k)
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
        _check_args(args)
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if dtype not in FLOATS + (torch.bfloat16,):
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
        dims = {"B": self.kv.shape[0]}
        check_tensor(c_kv, "c_kv", shape=("B", "T", self.args.kv_lora_rank), dims=dims, dtype=self.kv.dtype,
                     device=self.kv.device)
        check_tensor(k_rope, "k_rope", shape=("B", "T", self.args.qk_rope_head_dim), dims=dims,
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

    def __init__(self, args: ModelArgs = ModelArgs(), dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        _check_args(args)
        if dtype not in FLOATS:
            raise TypeError(f"MLA parameters must be float32 or float64, got {dtype}")
        self.args = args
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
        return c_kv, rotary_key(k_pe, positions, self.args)

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

COMPRESS_WARPS = 8  # token rows per block of cuda/mla_compress.cu (one warp each)
COMPRESS_VEC_DIMS = (512, 64)  # (d_c, d_R) built into its vector kernel (COMPRESS_D_C, COMPRESS_D_R)
SCORES_TILE = 64  # rows and keys per block tile of the tiled kernels in cuda/mla_decode_scores.cu
SCORES_MMA_ROWS = 128  # query rows per block of the tensor-core kernels (all 128 heads of a decode token)
SCORES_PIPE_KEYS = 128  # keys per tile of decode_scores_pipelined_bf16
SCORES_PIPE_DIMS = 64  # latent dims per pipeline stage of decode_scores_pipelined_bf16
SCORES_PIPE_STAGES = 5  # shared-memory buffers of its cache pipeline


def kv_compress_cuda(kv: torch.Tensor, kv_norm_weight: torch.Tensor, args: ModelArgs,
                     positions: torch.Tensor | None = None, out: torch.Tensor | None = None, *,
                     check_positions: bool = True, kernel: str | None = None) -> torch.Tensor:
    """`cuda/mla_compress.cu`: the wkv_a output kv [T, d_c + d_R] -> latent [T, d_c + d_R] =
    [RMSNorm(c^KV) | k^R], k^R rotated (interleaved RoPE) when `positions` int64 [T] is given,
    copied unrotated otherwise. float32 or bfloat16 (float32 arithmetic), contiguous, on the GPU.
    Writes into `out` [T, d_c + d_R] when given. `check_positions=False` skips the range check (a
    device-to-host sync); the kernel then writes NaN for a position outside the table, never reads there.
    `kernel`: "scalar" (kernel 1, any dims) or "vector" (kernel 2, d_c = 512 and d_R = 64 built in,
    16-byte loads; needs 16-byte aligned kv, kv_norm_weight and out); None picks "vector" where it applies."""
    _check_args(args)
    if kernel not in (None, "scalar", "vector"):
        raise ValueError(f"kernel must be None, 'scalar' or 'vector', got {kernel!r}")
    check_tensor(kv, "kv", shape=("T", args.latent_dim), dtype=(torch.float32, torch.bfloat16), cuda=True,
                 contiguous=True)
    check_tensor(kv_norm_weight, "kv_norm_weight", shape=(args.kv_lora_rank,), dtype=torch.float32,
                 device=kv.device, contiguous=True)
    n_tokens = kv.shape[0]
    if positions is not None:
        check_tensor(positions, "positions", shape=(n_tokens,), dtype=torch.int64, device=kv.device,
                     contiguous=True)
        if check_positions:
            check_range(positions, "positions", 0, args.max_seq_len - 1)
    latent = torch.empty_like(kv) if out is None else out
    check_tensor(latent, "out", shape=tuple(kv.shape), dtype=kv.dtype, device=kv.device, contiguous=True)
    if n_tokens == 0:
        return latent
    # kernel 2 has V3.2's dims built in and moves 16-byte chunks
    fits = ((args.kv_lora_rank, args.qk_rope_head_dim) == COMPRESS_VEC_DIMS
            and all(t.data_ptr() % 16 == 0 for t in (kv, kv_norm_weight, latent)))
    if kernel == "vector" and not fits:
        raise ValueError(f"the vector kernel needs (kv_lora_rank, qk_rope_head_dim) = {COMPRESS_VEC_DIMS} and "
                         "16-byte aligned kv, kv_norm_weight and out")
    vector = fits if kernel is None else kernel == "vector"
    suffix = ("vec_" if vector else "") + ("f32" if kv.dtype == torch.float32 else "bf16")
    blocks = math.ceil(n_tokens / COMPRESS_WARPS)
    kv, kv_norm_weight = kv.detach(), kv_norm_weight.detach()  # kernels are inference only: no autograd
    dims = () if vector else (args.kv_lora_rank, args.qk_rope_head_dim)
    common = (kv, kv_norm_weight, latent, n_tokens, *dims, float(args.norm_eps))
    if positions is None:
        launch("mla_compress", f"mla_compress_{suffix}", grid=blocks, block=32 * COMPRESS_WARPS, args=common)
    else:
        cos, sin = cos_sin_table(args, kv.device)
        launch("mla_compress", f"mla_compress_rope_{suffix}", grid=blocks, block=32 * COMPRESS_WARPS,
               args=common + (positions, cos, sin, args.max_seq_len))
    return latent


def _pipelined_smem_bytes(args: ModelArgs) -> int:
    """Dynamic shared memory of decode_scores_pipelined_bf16: the query tile and the cache stages."""
    width_pad = math.ceil(args.latent_dim / SCORES_PIPE_DIMS) * SCORES_PIPE_DIMS
    return SCORES_MMA_ROWS * width_pad * 2 + SCORES_PIPE_STAGES * SCORES_PIPE_KEYS * SCORES_PIPE_DIMS * 2


def _smem_optin(device: torch.device) -> int:
    """The most shared memory one block may ask for on `device` (227 KiB on an H100/H200)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)


def decode_scores_cuda(q_abs: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, args: ModelArgs,
                       kernel: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`cuda/mla_decode_scores.cu`: absorbed scores over the latent cache,
    scores[b, t, i, s] = (q_abs[b, t, i] . c_kv[b, s] + q_rope[b, t, i] . k_rope[b, s]) * softmax_scale.

    q_abs [B, T, n_h, d_c], q_rope [B, T, n_h, d_R], latent [B, S, d_c + d_R] (LatentCache.kv), all
    float32 (kernel "naive" or "tiled") or all bfloat16 (kernel "mma" or "pipelined", tensor cores;
    d_c and d_R multiples of 16). `kernel=None` picks the fastest for the dtype: "tiled" for float32,
    "pipelined" for bfloat16 ("mma" when the query tile would not fit the GPU's shared memory).
    Returns float32 [B, T, n_h, S] (written into `out` when given).
    """
    _check_args(args)
    if kernel is None:
        kernel = "pipelined" if isinstance(q_abs, torch.Tensor) and q_abs.dtype == torch.bfloat16 else "tiled"
        if kernel == "pipelined" and q_abs.is_cuda and _pipelined_smem_bytes(args) > _smem_optin(q_abs.device):
            kernel = "mma"
    if kernel not in ("naive", "tiled", "mma", "pipelined"):
        raise ValueError(f"kernel must be 'naive', 'tiled', 'mma' or 'pipelined', got {kernel!r}")
    tensor_cores = kernel in ("mma", "pipelined")
    dims = {"d_c": args.kv_lora_rank, "d_R": args.qk_rope_head_dim, "L": args.latent_dim}
    dtype = torch.bfloat16 if tensor_cores else torch.float32
    if tensor_cores and (args.kv_lora_rank % 16 or args.qk_rope_head_dim % 16):
        raise ValueError(f"the {kernel} kernel needs kv_lora_rank and qk_rope_head_dim multiples of 16 (one "
                         f"k-step of m16n8k16), got {args.kv_lora_rank} and {args.qk_rope_head_dim}")
    check_tensor(q_abs, "q_abs", shape=("B", "T", "n_h", "d_c"), dims=dims, dtype=dtype, cuda=True, contiguous=True)
    check_tensor(q_rope, "q_rope", shape=("B", "T", "n_h", "d_R"), dims=dims, dtype=dtype, contiguous=True)
    check_tensor(latent, "latent", shape=("B", "S", "L"), dims=dims, dtype=dtype, contiguous=True)
    check_same_device(q_abs=q_abs, q_rope=q_rope, latent=latent)
    batch, n_q, n_h, _ = q_abs.shape
    n_keys = latent.shape[1]
    rows = n_q * n_h  # the T n_h query rows of one batch entry share its cache
    shape = (batch, n_q, n_h, n_keys)
    scores = torch.empty(shape, dtype=torch.float32, device=q_abs.device) if out is None else out
    check_tensor(scores, "out", shape=shape, dtype=torch.float32, device=q_abs.device, contiguous=True)
    if batch == 0 or rows == 0 or n_keys == 0:
        return scores
    row_blocks = rows if kernel == "naive" else math.ceil(rows / SCORES_TILE)
    if batch > 65535 or row_blocks > 65535:
        raise ValueError(f"batch {batch} and T n_h = {rows} rows must fit the grid (<= 65535 blocks a dim)")
    if tensor_cores:
        for name, tensor in (("q_abs", q_abs), ("q_rope", q_rope), ("latent", latent)):
            if tensor.data_ptr() % 16:
                raise ValueError(f"the {kernel} kernel reads 16-byte chunks: {name} must be 16-byte aligned")
    q_abs, q_rope, latent = q_abs.detach(), q_rope.detach(), latent.detach()  # inference only: no autograd
    common = (q_abs, q_rope, latent, scores, rows, n_keys, args.kv_lora_rank, args.qk_rope_head_dim,
              float(args.softmax_scale))
    if kernel == "naive":
        launch("mla_decode_scores", "decode_scores_naive_f32", grid=(math.ceil(n_keys / 128), rows, batch),
               block=128, args=common)
    elif kernel == "tiled":
        launch("mla_decode_scores", "decode_scores_tiled_f32",
               grid=(math.ceil(n_keys / SCORES_TILE), math.ceil(rows / SCORES_TILE), batch), block=256, args=common)
    elif kernel == "mma":
        launch("mla_decode_scores", "decode_scores_mma_bf16",
               grid=(math.ceil(n_keys / SCORES_TILE), math.ceil(rows / SCORES_MMA_ROWS), batch), block=256, args=common)
    else:
        # work items (batch entry, 128-row block, 128-key tile), spread in contiguous ranges over one block per SM
        items = batch * math.ceil(rows / SCORES_MMA_ROWS) * math.ceil(n_keys / SCORES_PIPE_KEYS)
        if items >= 2**31:
            raise ValueError(f"{items} tiles of 128 x 128 scores: more than the kernel's int32 item count")
        smem = _pipelined_smem_bytes(args)
        if smem > _smem_optin(q_abs.device):
            raise ValueError(f"the pipelined kernel needs {smem} bytes of shared memory for latent_dim "
                             f"{args.latent_dim}, the GPU offers {_smem_optin(q_abs.device)}: use kernel='mma'")
        n_sm = torch.cuda.get_device_properties(q_abs.device).multi_processor_count
        launch("mla_decode_scores", "decode_scores_pipelined_bf16", grid=min(items, n_sm),
               block=256, args=common + (batch,), shared_mem=smem)
    return scores
