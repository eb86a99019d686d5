"""Input checks shared by every public function: one clear message for each way an input is wrong.

    dims = check_shapes("q_idx[T, H, D] w[T, H] k_idx[S, D]", q_idx, w, k_idx, dtype=FLOATS)

    dims = {}
    check_tensor(q_idx, "q_idx", shape=("T", "H", "D"), dims=dims, dtype=torch.float32)
    check_tensor(k_idx, "k_idx", shape=("S", "D"), dims=dims)   # D must agree with q_idx

A named dimension binds on first sight and must agree afterwards; an int must match exactly;
None (or "?" in a spec string) matches anything.

Two kinds of checks, two rules:

* **Host metadata** (shape, dtype, device, contiguity, alignment, supported sizes) is known to the
  host without touching the GPU. It is always checked, by every public function.
* **Device data** (the values inside index, position and length tensors: ranges, ordering,
  repeats) can only be checked by reading the tensor back to the host, which waits for the GPU: a
  device synchronisation, paid per call, that a decode step cannot afford and a CUDA graph cannot
  capture. These checks run only when :func:`data_checks_wanted` says so: always for CPU tensors
  (reading them costs nothing), and for GPU tensors only while data checks are switched on, by
  the environment variable ``DSA_CHECK=1`` or by :func:`set_data_checks` / :func:`data_checks`.
  They are off by default; the test suite and the chapters switch them on.

With data checks off, an invalid value is still harmless to memory: every kernel clamps or skips
an out-of-range id, position or length (each tested under compute-sanitizer with wild inputs); its
result is just not meaningful.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from typing import Iterable, Iterator, Sequence

import torch

__all__ = ["FLOATS", "FLOATS_BF16", "check_tensor", "check_shapes", "check_same_device", "check_range",
           "data_checks_enabled", "set_data_checks", "data_checks", "data_checks_wanted"]

#: The float dtypes the references compute in.
FLOATS = (torch.float32, torch.float64)
#: ... and those that also take bfloat16 inputs (upcast to float32 inside).
FLOATS_BF16 = FLOATS + (torch.bfloat16,)

_ENV = "DSA_CHECK"
_override: bool | None = None  # set_data_checks / data_checks; None: follow the environment


def data_checks_enabled() -> bool:
    """True when checks of device data are on: set_data_checks(True), or else DSA_CHECK=1 in the environment."""
    if _override is not None:
        return _override
    return os.environ.get(_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_data_checks(enabled: bool | None) -> None:
    """Switch the checks of device data on (True) or off (False) for the whole package; None
    returns to the environment variable DSA_CHECK."""
    global _override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_data_checks takes True, False or None, got {enabled!r}")
    _override = enabled


@contextlib.contextmanager
def data_checks(enabled: bool = True) -> Iterator[None]:
    """``with data_checks():`` runs a block with the checks of device data on (or off), then restores."""
    global _override
    previous = _override
    set_data_checks(enabled)
    try:
        yield
    finally:
        _override = previous


def data_checks_wanted(*tensors) -> bool:
    """Whether to check the values inside `tensors`: always when none is on a GPU (free), else
    only while data checks are on (reading a GPU tensor synchronises with the device)."""
    on_gpu = any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tensors)
    return not on_gpu or data_checks_enabled()


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
        sizes = x.shape
        if len(sizes) != len(shape):
            raise ValueError(f"{name} must have {len(shape)} dims {_fmt(shape)}, got shape {list(sizes)}")
        dims = {} if dims is None else dims
        for axis, want in enumerate(shape):
            if want is None:
                continue
            got = sizes[axis]
            if want.__class__ is str:
                known = dims.get(want)
                if known is None:
                    dims[want] = got
                elif known != got:
                    raise ValueError(
                        f"{name} has {want} = {got} (dim {axis} of shape {list(sizes)}), "
                        f"but {want} = {known} elsewhere"
                    )
            elif want != got:
                raise ValueError(f"{name} must have shape {_fmt(shape)}, got {list(sizes)}")
    if dtype is not None and x.dtype is not dtype:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if x.dtype not in allowed:
            names = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise TypeError(f"{name} must be {names}, got {str(x.dtype).replace('torch.', '')}")
    if cuda and not x.is_cuda:
        raise ValueError(f"{name} must be on a CUDA device, got {x.device}")
    if device is not None and x.device != (device if isinstance(device, torch.device) else torch.device(device)):
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {x.stride()}")
    return x


_SPEC = re.compile(r"\s*(\w+)\s*\[([^\]]*)\]\s*,?")


@functools.lru_cache(maxsize=256)
def _parse_spec(spec: str) -> tuple:
    """"q[B, 576] k[?, D]" -> (("q", ("B", 576)), ("k", (None, "D"))), parsed once per spec."""
    if "".join(_SPEC.sub("", spec).split()):
        raise ValueError(f"check_shapes: spec {spec!r} must be a list of 'name[dims]'")
    return tuple((name, tuple(None if a == "?" else int(a) if a.isdigit() else a
                              for a in (p.strip() for p in shape.split(",")) if a))
                 for name, shape in _SPEC.findall(spec))


def check_shapes(spec: str, *tensors, dims: dict | None = None, dtype=None, same_dtype: bool = False,
                 **kwargs) -> dict[str, int]:
    """Check several tensors against a shape-annotated spec in one line; return the named dims.

    ``check_shapes("q_abs[B, T, n_h, d_c] c_kv[B, S, d_c]", q_abs, c_kv, dims={"d_c": 512}, dtype=FLOATS)``
    checks each tensor's rank and dims (names bind across tensors and to `dims`; ints must match;
    "?" matches anything), that all are on one device, `dtype` for each (and with `same_dtype`, the
    first one's dtype for the rest); `kwargs` go to :func:`check_tensor` (cuda=, contiguous=)."""
    entries = _parse_spec(spec)
    if len(entries) != len(tensors):
        raise ValueError(f"check_shapes: spec {spec!r} must name one 'name[dims]' per tensor, got {len(tensors)}")
    dims = {} if dims is None else dims
    named = {}
    for (name, axes), x in zip(entries, tensors):
        want = next(iter(named.values())).dtype if same_dtype and named else dtype
        check_tensor(x, name, shape=axes, dims=dims, dtype=want, **kwargs)
        named[name] = x
    if len(named) > 1:
        check_same_device(**named)
    return dims


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; the error names each tensor and its device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")
    return next(iter(devices.values()))


def check_range(value, name: str, low=None, high=None) -> None:
    """low <= value <= high (either bound optional), for ints and for a tensor's min and max.

    A tensor's values are device data: checked only when :func:`data_checks_wanted` (always on
    the CPU; on a GPU only with data checks on, since it reads the tensor back to the host)."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0 or not data_checks_wanted(value):
            return
        lo, hi = value.min().item(), value.max().item()
    else:
        lo = hi = value
    if low is not None and lo < low:
        raise ValueError(f"{name} must be >= {low}, got {lo}")
    if high is not None and hi > high:
        raise ValueError(f"{name} must be <= {high}, got {hi}")
