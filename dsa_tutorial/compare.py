"""The one way the book compares a result with its reference.

Three numbers, computed in float64 over the positions where the reference is finite:

* the largest absolute error, and the largest error relative to ``max|ref|`` there;
* DeepGEMM's ``calc_diff(x, y) = 1 - 2 sum(x y) / sum(x^2 + y^2)``, which is 0 for equal tensors
  and about ``relative error^2 / 2`` for small noise;

plus exact checks: the ``-inf`` pattern (every ``-inf`` of the reference is ``-inf`` in the
output, and nowhere else), that the output has no NaN (the poison that unwritten elements
keep, see :func:`poisoned`), and that the reference has none either (a NaN reference is a broken
reference, and nothing can be said to match it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["calc_diff", "Comparison", "compare", "assert_close", "poisoned"]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 sum(x y) / sum(x^2 + y^2) in float64 (DeepGEMM's test metric; finite entries only)."""
    x, y = x.double(), y.double()
    finite = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[finite], y[finite]
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` measured, and whether it is within the stated tolerance."""

    max_abs: float
    max_rel: float
    calc_diff: float
    inf_pattern_ok: bool
    nan_count: int
    atol: float
    rtol: float
    max_calc_diff: float | None
    passed: bool
    first_mismatches: tuple[str, ...] = ()
    ref_nan_count: int = 0

    def __str__(self) -> str:
        """The verdict and the tolerance it was held to: the same text on every machine, so a
        notebook can print it under strict nbval. The measured errors are in :meth:`measured`."""
        bounds = [f"atol {self.atol:g}", f"rtol {self.rtol:g}"]
        if self.max_calc_diff is not None:
            bounds.append(f"calc_diff <= {self.max_calc_diff:g}")
        verdict = "PASS" if self.passed else "FAIL"
        inf = "" if self.inf_pattern_ok else ", -inf pattern WRONG"
        nan = f", {self.nan_count} NaN" if self.nan_count else ""
        nan += f", {self.ref_nan_count} NaN in the reference" if self.ref_nan_count else ""
        return f"{verdict} ({', '.join(bounds)}{inf}{nan})"

    def measured(self) -> str:
        """The measured errors, to one significant digit (they vary with hardware and library
        versions: print them in cells tagged nbval-ignore-output)."""
        return (f"max abs err {self.max_abs:.0e}, max rel err {self.max_rel:.0e}, "
                f"calc_diff {self.calc_diff:.0e}, -inf pattern " + ("exact" if self.inf_pattern_ok else "WRONG"))


def compare(
    out: torch.Tensor,
    ref: torch.Tensor,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    max_calc_diff: float | None = None,
) -> Comparison:
    """Compare `out` with `ref` elementwise: pass when |out - ref| <= atol + rtol |ref| everywhere
    ref is finite, the -inf pattern is exact, out has no NaN, and calc_diff <= max_calc_diff."""
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: out {list(out.shape)} vs ref {list(ref.shape)}")
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    nan_count = int(torch.isnan(out64).sum())
    ref_nan_count = int(torch.isnan(ref64).sum())
    inf_pattern_ok = bool(torch.equal(torch.isneginf(out64), torch.isneginf(ref64))) and bool(
        torch.equal(torch.isposinf(out64), torch.isposinf(ref64))
    )
    finite = torch.isfinite(ref64)
    err = (out64 - ref64).abs()
    err = torch.where(finite, err, torch.zeros_like(err))
    err = torch.where(torch.isnan(out64), torch.full_like(err, float("inf")), err)
    scale = ref64[finite].abs().max().item() if finite.any() else 0.0
    max_abs = err.max().item() if err.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    bound = atol + rtol * ref64.abs()
    bad = (err > bound) & (finite | torch.isnan(out64))
    diff = calc_diff(out64, ref64)
    passed = (
        not bool(bad.any())
        and inf_pattern_ok
        and nan_count == 0
        and ref_nan_count == 0
        and (max_calc_diff is None or diff <= max_calc_diff)
    )
    mismatches = []
    for index in bad.nonzero()[:5].tolist():
        mismatches.append(f"at {index}: out {out64[tuple(index)].item():.6g} ref {ref64[tuple(index)].item():.6g}")
    if not inf_pattern_ok:
        wrong = (torch.isinf(out64) != torch.isinf(ref64)).nonzero()[:5].tolist()
        mismatches += [f"-inf pattern differs at {i}" for i in wrong]
    if ref_nan_count:
        mismatches += [f"the reference is NaN at {i}" for i in torch.isnan(ref64).nonzero()[:5].tolist()]
    return Comparison(max_abs, max_rel, diff, inf_pattern_ok, nan_count, atol, rtol, max_calc_diff,
                      passed, tuple(mismatches), ref_nan_count)


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    max_calc_diff: float | None = None,
    name: str = "output",
) -> Comparison:
    """:func:`compare`, raising AssertionError with the first mismatches when it fails."""
    result = compare(out, ref, atol=atol, rtol=rtol, max_calc_diff=max_calc_diff)
    if not result.passed:
        tolerance = f"atol {atol:g}, rtol {rtol:g}" + (
            f", calc_diff <= {max_calc_diff:g}" if max_calc_diff is not None else ""
        )
        detail = "\n  ".join(result.first_mismatches)
        raise AssertionError(
            f"{name} differs from its reference ({tolerance}): max abs {result.max_abs:.3g}, "
            f"calc_diff {result.calc_diff:.3g}, {result.nan_count} NaN, {result.ref_nan_count} NaN in the "
            f"reference\n  {detail}"
        )
    return result


def poisoned(shape, dtype: torch.dtype, device="cuda") -> torch.Tensor:
    """An output buffer filled with a value no kernel writes: NaN for floating types (fp8 too),
    the most negative integer for integer types. Any element a kernel forgets stays visible."""
    if dtype.is_floating_point:
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return torch.full(shape, 0xFF, dtype=torch.uint8, device=device).view(dtype)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)
