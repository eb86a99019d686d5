"""Input checks shared by every public function: one clear message for each way an input is wrong.

    dims = {}
    check_tensor(q_idx, "q_idx", shape=("T", "H", "D"), dims=dims, dtype=torch.float32)
    check_tensor(k_idx, "k_idx", shape=("S", "D"), dims=dims)   # D must agree with q_idx

A named dimension binds on first sight and must agree afterwards; an int must match exactly;
None matches anything.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = ["check_tensor", "check_same_device", "check_range"]


def _fmt(shape: Iterable) -> str:
    return "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"


def check_tensor(
    x,
    name: str,
    *,
    shape: Sequence[int | str | None] | None = None,
    dims: dict[str, int] | None = None,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    device: torch.device | str | None = None,
    contiguous: bool = False,
    cuda: bool = False,
) -> torch.Tensor:
    """Check one tensor argument and return it; raise TypeError/ValueError naming `name`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if shape is not None:
        if x.dim() != len(shape):
            raise ValueError(f"{name} must have {len(shape)} dims {_fmt(shape)}, got shape {list(x.shape)}")
        dims = {} if dims is None else dims
        for axis, (want, got) in enumerate(zip(shape, x.shape)):
            if want is None:
                continue
            if isinstance(want, str):
                if want in dims and dims[want] != got:
                    raise ValueError(
                        f"{name} has {want} = {got} (dim {axis} of shape {list(x.shape)}), "
                        f"but {want} = {dims[want]} elsewhere"
                    )
                dims[want] = got
            elif want != got:
                raise ValueError(f"{name} must have shape {_fmt(shape)}, got {list(x.shape)}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if x.dtype not in allowed:
            names = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise TypeError(f"{name} must be {names}, got {str(x.dtype).replace('torch.', '')}")
    if cuda and not x.is_cuda:
        raise ValueError(f"{name} must be on a CUDA device, got {x.device}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {x.stride()}")
    return x


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; the error names each tensor and its device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")
    return next(iter(devices.values()))


def check_range(value, name: str, low=None, high=None) -> None:
    """low <= value <= high (either bound optional), for ints and for a tensor's min and max."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return
        lo, hi = value.min().item(), value.max().item()
    else:
        lo = hi = value
    if low is not None and lo < low:
        raise ValueError(f"{name} must be >= {low}, got {lo}")
    if high is not None and hi > high:
        raise ValueError(f"{name} must be <= {high}, got {hi}")
