"""The Hadamard rotation the indexer applies to q^I and k^I before FP8 rounding.

H_n (Sylvester's construction, n a power of two) has entries +-1 and H H^T = n I, so
R = H / sqrt(n) is orthonormal: (R q) . (R k) = q . k in exact arithmetic. Rotating spreads one
large coordinate over all n, so a block scale set by amax loses less to the outlier.
The official code uses the fast transform (O(n log n)); the matrix form here is the specification.
"""
from __future__ import annotations

import functools

import torch

from .checks import check_tensor

__all__ = ["hadamard_matrix", "rotate_activation"]


@functools.lru_cache(maxsize=16)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        # H_2m = [[H_m, H_m], [H_m, -H_m]]
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


@functools.lru_cache(maxsize=16)
def _sylvester_on(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """H_n in `dtype` on `device`, copied there once (shared: never modified). A GPU caller then
    copies nothing from the host per call, which also lets a CUDA graph capture the rotation."""
    return _sylvester(n).to(dtype=dtype, device=device)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
    """Unnormalised Sylvester-Hadamard matrix H_n [n, n] of +-1 (n a power of two)."""
    if not isinstance(n, int) or n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a positive power of two, got {n}")
    return _sylvester_on(n, dtype, torch.empty(0, device=device).device).clone()


def rotate_activation(x: torch.Tensor) -> torch.Tensor:
    """x H / sqrt(n) over the last dim (n = x.shape[-1]); the same for q^I and k^I."""
    check_tensor(x, "x", dtype=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
    n = x.shape[-1]
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a positive power of two, got {n}")
    h = _sylvester_on(n, torch.float32 if x.dtype != torch.float64 else torch.float64, x.device)
    # [..., n] @ [n, n] * n^-0.5 (H is symmetric, so x H = (H x^T)^T)
    return (x.to(h.dtype) @ h * n**-0.5).to(x.dtype)
