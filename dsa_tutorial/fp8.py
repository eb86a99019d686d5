"""FP8 for the lightning indexer: block quantisation and the FP8 MQA logits (SPEC sections 3 and 6).

Block quantisation (step 5 of the indexer, one scale per `block_size` values along the last dim):

    amax_b = max(max_{i in b} |x_i|, 1e-4)
    s_b    = amax_b / 448                       (scale_fmt=None)
    s_b    = 2^ceil(log2(amax_b / 448))         (scale_fmt="ue8m0": a power of two, 8 exponent bits)
    x_q,i  = e4m3(clamp(x_i / s_b, -448, 448))  (round to nearest even; saturate at +-448)
    x_i   ~= x_q,i * s_b                        (act_dequant)

FP8 MQA logits (DeepGEMM's fp8_mqa_logits), for query i and key j in [ks_i, ke_i):

    logits[i, j] = sum_h w[i, h] * ReLU(q[i, h] . k[j] * k_scale[j])

and -inf outside [ks_i, ke_i) when clean_logits. One call serves a packed batch of ragged causal
prefills: sequence n occupies keys [start_n, end_n), and its query at position t has
ks = start_n, ke = start_n + t + 1.

Which function runs where:

* `act_quant`, `mqa_logits` dispatch: the CUDA kernel for CUDA inputs, the reference otherwise.
* `act_quant_reference`, `mqa_logits_reference` are the specification (pure torch, any device;
  the logits reference computes in float64 and also accepts unquantised float inputs).
* `act_quant_cuda`, `mqa_logits_cuda` always run `cuda/act_quant.cu` / `cuda/fp8_mqa_logits.cu`.

`mqa_logits` with clean_logits=False: the CUDA kernel writes every position of the key range that
its block of 8 queries computes (-inf where the row's own mask says so) and leaves the columns
outside that range as `torch.empty` gave them: unspecified. Only [ks_i, ke_i) is defined.
"""
from __future__ import annotations

import torch

from .checks import check_range, check_same_device, check_tensor
from .kernels import launch

__all__ = [
    "FP8_E4M3_MAX",
    "AMAX_FLOOR",
    "act_quant",
    "act_quant_reference",
    "act_quant_cuda",
    "act_dequant",
    "block_scales",
    "mqa_logits",
    "mqa_logits_reference",
    "mqa_logits_cuda",
    "check_mqa_logits_inputs",
    "causal_ks_ke",
    "MQA_SUPPORTED_HEADS",
    "MQA_SUPPORTED_HEAD_DIM",
]

FP8_E4M3_MAX = 448.0  # largest finite e4m3fn value: 1.75 * 2^8
AMAX_FLOOR = 1e-4  # an all-zero block still gets a positive scale
SCALE_FORMATS = ("ue8m0", None)
ACT_QUANT_WARPS = 8  # warps per block of cuda/act_quant.cu: one quantisation block per warp
MQA_SUPPORTED_HEADS = (32, 64)  # H the CUDA kernel is compiled for (V3.2 uses 64)
MQA_SUPPORTED_HEAD_DIM = 128  # D: one 128-value block scale per key, four k32 steps
MQA_QUERIES_PER_CTA = 8  # as #defined in cuda/fp8_mqa_logits.cu (one query per warp)
MQA_THREADS = 32 * MQA_QUERIES_PER_CTA


# ----------------------------------------------------------------------------- quantisation


def _check_quant_args(x: torch.Tensor, block_size: int, scale_fmt) -> None:
    check_tensor(x, "x", dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64))
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the one cut into blocks)")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if x.shape[-1] % block_size:
        raise ValueError(f"the last dim of x ({x.shape[-1]}) must be a multiple of block_size ({block_size})")
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be 'ue8m0' or None, got {scale_fmt!r}")


def block_scales(amax: torch.Tensor, scale_fmt="ue8m0") -> torch.Tensor:
    """The scale s of each block from its amax (float32), as the official act_quant computes it."""
    # s = max(amax, 1e-4) / 448, one IEEE float32 division
    s = torch.clamp(amax.float(), min=AMAX_FLOOR) / FP8_E4M3_MAX
    if scale_fmt is None:
        return s
    # s = 2^ceil(log2 s): s = m 2^e with m in [0.5, 1), so ceil(log2 s) = e, or e - 1 when m = 0.5
    mantissa, exponent = torch.frexp(s)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.ldexp(torch.ones_like(s), exponent)


def act_quant_reference(x: torch.Tensor, block_size: int = 128, scale_fmt="ue8m0"):
    """Reference block quantisation: (x_fp8 e4m3 [..., N], scales float32 [..., N // block_size])."""
    _check_quant_args(x, block_size, scale_fmt)
    x_blocks = x.float().unflatten(-1, (x.shape[-1] // block_size, block_size))  # [..., n_b, block]
    # amax_b = max_i |x_i| over each block: [..., n_b]
    amax = x_blocks.abs().amax(dim=-1)
    s = block_scales(amax, scale_fmt)  # [..., n_b]
    # x_q = e4m3(clamp(x / s, -448, 448)), round to nearest even
    x_q = torch.clamp(x_blocks / s.unsqueeze(-1), -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return x_q.flatten(-2), s


def act_dequant(x_fp8: torch.Tensor, scales: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """x ~= x_q * s, in float32: the inverse of act_quant up to the rounding it did."""
    check_tensor(x_fp8, "x_fp8", dtype=(torch.float8_e4m3fn, torch.float8_e5m2))
    if x_fp8.dim() == 0 or block_size <= 0 or x_fp8.shape[-1] % block_size:
        raise ValueError(f"the last dim of x_fp8 {list(x_fp8.shape)} must be a multiple of block_size {block_size}")
    check_tensor(scales, "scales", shape=(*x_fp8.shape[:-1], x_fp8.shape[-1] // block_size),
                 dtype=torch.float32, device=x_fp8.device)
    # x = x_q * s_b, each scale repeated over its block: [..., N]
    return (x_fp8.float().unflatten(-1, (-1, block_size)) * scales.unsqueeze(-1)).flatten(-2)


def act_quant_cuda(x: torch.Tensor, block_size: int = 128, scale_fmt="ue8m0"):
    """`cuda/act_quant.cu`: x float32 or bfloat16 on the GPU, contiguous; block_size a multiple of 32.

    Bit-identical to act_quant_reference for finite inputs."""
    _check_quant_args(x, block_size, scale_fmt)
    check_tensor(x, "x", dtype=(torch.float32, torch.bfloat16), cuda=True, contiguous=True)
    if block_size % 32:
        raise ValueError(f"the CUDA act_quant needs block_size a multiple of 32 (one warp a block), got {block_size}")
    x_fp8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32, device=x.device)
    n_blocks = scales.numel()
    if n_blocks == 0:
        return x_fp8, scales
    kernel = "act_quant_f32" if x.dtype == torch.float32 else "act_quant_bf16"
    grid = (n_blocks + ACT_QUANT_WARPS - 1) // ACT_QUANT_WARPS
    launch("act_quant", kernel, grid=grid, block=32 * ACT_QUANT_WARPS,
           args=(x, x_fp8, scales, n_blocks, block_size, scale_fmt == "ue8m0"))
    return x_fp8, scales


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt="ue8m0"):
    """Block-quantise x to e4m3: the CUDA kernel for a CUDA tensor (float32/bf16, contiguous),
    the reference otherwise. Returns (x_fp8 [..., N] float8_e4m3fn, scales [..., N // block_size] float32)."""
    if isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in (torch.float32, torch.bfloat16) \
            and isinstance(block_size, int) and block_size > 0 and block_size % 32 == 0 and x.is_contiguous():
        return act_quant_cuda(x, block_size, scale_fmt)
    return act_quant_reference(x, block_size, scale_fmt)
