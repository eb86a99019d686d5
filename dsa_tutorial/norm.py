"""RMSNorm: the reference, and the CUDA kernel that proves the book's path end to end.

    RMSNorm(x) = x / sqrt(mean_i(x_i^2) + eps) * weight

MLA applies it to the compressed latents (q_norm on c^Q, kv_norm on c^KV).
"""
from __future__ import annotations

import torch

from .checks import check_tensor
from .kernels import launch

__all__ = ["rms_norm", "rms_norm_cuda", "RMS_THREADS"]

RMS_THREADS = 256  # threads per block, as #defined in cuda/rms_norm.cu
RMS_VECS = 4  # 16-byte vectors per thread in rms_norm_bf16_vec, as #defined there


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Reference RMSNorm over the last dim, computed in float64 and returned in x's dtype."""
    check_tensor(x, "x", dtype=(torch.float32, torch.float64, torch.bfloat16))
    check_tensor(weight, "weight", shape=(x.shape[-1],), device=x.device)
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    x64 = x.double()
    # mean(x^2) over the last dim: [..., 1]
    mean_sq = x64.pow(2).mean(dim=-1, keepdim=True)
    # x / sqrt(mean(x^2) + eps) * weight: [..., dim]
    return (x64 * torch.rsqrt(mean_sq + eps) * weight.double()).to(x.dtype)


def rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """`cuda/rms_norm.cu`: x [n_rows, dim] float32 or bfloat16 on the GPU, weight [dim] alike.

    `out` (optional, like x) receives the result; tests pass a poisoned buffer there."""
    dims: dict[str, int] = {}
    check_tensor(x, "x", shape=("n_rows", "dim"), dims=dims, dtype=(torch.float32, torch.bfloat16),
                 cuda=True, contiguous=True)
    check_tensor(weight, "weight", shape=("dim",), dims=dims, dtype=x.dtype, device=x.device, contiguous=True)
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    n_rows, dim = x.shape
    if out is not None:
        check_tensor(out, "out", shape=("n_rows", "dim"), dims=dims, dtype=x.dtype, device=x.device, contiguous=True)
    y = torch.empty_like(x) if out is None else out
    if n_rows == 0 or dim == 0:
        return y
    # Kernel 2 holds the row in registers as 16-byte vectors: bf16, dim a multiple of 8, rows that
    # fit; the tensors' data pointers must be 16-byte aligned (fresh allocations are 256-aligned).
    vectorised = (x.dtype == torch.bfloat16 and dim % 8 == 0 and dim <= RMS_THREADS * 8 * RMS_VECS
                  and all(t.data_ptr() % 16 == 0 for t in (x, weight, y)))
    kernel = "rms_norm_bf16_vec" if vectorised else ("rms_norm_f32" if x.dtype == torch.float32 else "rms_norm_bf16")
    launch("rms_norm", kernel, grid=n_rows, block=RMS_THREADS, args=(x, weight, y, n_rows, dim, float(eps)))
    return y
