"""RMSNorm: the reference, and the CUDA kernel that proves the book's path end to end.

    RMSNorm(x) = x / sqrt(mean_i(x_i^2) + eps) * weight

MLA applies it to the compressed latents (q_norm on c^Q, kv_norm on c^KV).

    rms_norm(x, weight, eps)            the reference: x [..., dim], float64 arithmetic
    rms_norm_cuda(x, weight, eps)       cuda/rms_norm.cu: x [n_rows, dim] on the GPU, float32 or bfloat16
    RMS_NORM_KERNELS                    its kernels: 1 (any row), 2 (bf16 rows held in registers)
"""
from __future__ import annotations

import torch

from .checks import FLOATS_BF16, check_shapes, check_tensor
from .kernels import Kernel, KernelTable

__all__ = ["rms_norm", "rms_norm_cuda", "RMS_NORM_KERNELS"]

#: The kernels of cuda/rms_norm.cu; rms_norm_cuda(kernel=None) takes the highest that applies.
RMS_NORM_KERNELS = KernelTable("rms_norm", [
    Kernel(1, "rms_norm_{dtype}", "one block per row, its threads stride over it, x read twice; any dim"),
    Kernel(2, "rms_norm_bf16_vec", "the row held in registers as 16-byte vectors of 8 bf16: x read once",
           needs="bfloat16, dim a multiple of 8 and at most RMS_THREADS * 8 * RMS_VECS, 16-byte aligned "
                 "x, weight and out"),
], variants={"dtype": ("f32", "bf16")})


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Reference RMSNorm over the last dim, computed in float64 and returned in x's dtype.

    x [..., dim] float32, float64 or bfloat16; weight [dim] (any float dtype); eps > 0."""
    check_tensor(x, "x", dtype=FLOATS_BF16)
    check_tensor(weight, "weight", shape=(x.shape[-1],), device=x.device)
    _check_eps(eps)
    x64 = x.double()
    # mean(x^2) over the last dim: [..., 1]
    mean_sq = x64.pow(2).mean(dim=-1, keepdim=True)
    # x / sqrt(mean(x^2) + eps) * weight: [..., dim]
    return (x64 * torch.rsqrt(mean_sq + eps) * weight.double()).to(x.dtype)


def rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, out: torch.Tensor | None = None,
                  kernel: int | None = None) -> torch.Tensor:
    """`cuda/rms_norm.cu`: rms_norm on the GPU. x [n_rows, dim] float32 or bfloat16, contiguous; weight
    [dim] of x's dtype (the reference takes any number of leading dims, float64 and any weight dtype).

    `out` (optional, like x) receives the result; tests pass a poisoned buffer there. `kernel`: a
    version of RMS_NORM_KERNELS (1, or 2 for bf16 rows that fit its registers); None takes the
    highest that applies. No device data is read: nothing to check but shapes, so no host sync."""
    dims = check_shapes("x[n_rows, dim] weight[dim]", x, weight, dtype=(torch.float32, torch.bfloat16),
                        same_dtype=True, cuda=True, contiguous=True)
    _check_eps(eps)
    y = torch.empty_like(x) if out is None else out
    check_tensor(y, "out", shape=("n_rows", "dim"), dims=dims, dtype=x.dtype, device=x.device, contiguous=True)
    n_rows, dim = x.shape
    defines = RMS_NORM_KERNELS.defines()
    most = defines["RMS_THREADS"] * 8 * defines["RMS_VECS"]  # values kernel 2 holds in registers
    why_not = {2: ("is built for bfloat16" if x.dtype != torch.bfloat16 else
                   f"needs dim a multiple of 8 (16-byte vectors), got {dim}" if dim % 8 else
                   f"holds rows of at most {most} values in registers, got dim = {dim}" if dim > most else
                   "needs 16-byte aligned x, weight and out" if any(t.data_ptr() % 16 for t in (x, weight, y)) else
                   None)}
    chosen = RMS_NORM_KERNELS.choose(kernel, why_not)
    if n_rows == 0 or dim == 0:
        return y
    dtype = "f32" if x.dtype == torch.float32 else "bf16"
    RMS_NORM_KERNELS.launch(chosen.version, n_rows, defines["RMS_THREADS"],
                            (x.detach(), weight.detach(), y, n_rows, dim, float(eps)), dtype=dtype)
    return y
