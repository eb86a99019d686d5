"""The one timer of the book, and the machine's ceilings measured in the same run.

:func:`benchmark` times a GPU function with CUDA events: warm-up calls first, then one event
pair per call, the median reported. The inputs rotate through enough independent copies to
exceed twice the L2 cache, so no call finds its operands already cached by the previous one.

:func:`measure_ceilings` measures what the chip can do right now (device-to-device copy
bandwidth, bf16 and FP8 GEMM rates); every reported kernel number is quoted as a fraction of
these, measured in the same process.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .kernels import recording_launches, require_gpu

__all__ = ["Timing", "benchmark", "CallTiming", "time_call", "Ceilings", "measure_ceilings", "report", "Results",
           "RESULTS_DIR"]

#: Where the benchmarks write what they measured, one JSON file per operation, for the chapters' figures.
RESULTS_DIR = Path(__file__).resolve().parent.parent / "book" / "data" / "kernels"


@dataclass(frozen=True)
class Timing:
    """Median and spread of the timed calls, in microseconds."""

    median_us: float
    p20_us: float
    p80_us: float
    reps: int
    input_sets: int

    def tflops(self, flops: float) -> float:
        return flops / (self.median_us * 1e-6) / 1e12

    def tbps(self, nbytes: float) -> float:
        return nbytes / (self.median_us * 1e-6) / 1e12

    def __str__(self) -> str:
        return f"{self.median_us:.1f} us (p20 {self.p20_us:.1f}, p80 {self.p80_us:.1f}, {self.reps} reps)"


def _nbytes(args: Sequence[Any]) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def _input_sets(make_inputs: Callable[[], Sequence[Any]], reps: int, max_input_bytes: int) -> list[tuple]:
    """Enough fresh input sets to hold more than 2x the L2 cache (at most max_input_bytes, at most reps)."""
    first = tuple(make_inputs())
    per_set = max(_nbytes(first), 1)
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    n_sets = max(1, min(math.ceil(2 * l2 / per_set), max(1, max_input_bytes // per_set), reps))
    return [first] + [tuple(make_inputs()) for _ in range(n_sets - 1)]


def benchmark(
    fn: Callable[..., Any],
    make_inputs: Callable[[], Sequence[Any]],
    *,
    warmup: int = 5,
    reps: int = 50,
    max_input_bytes: int = 8 << 30,
) -> Timing:
    """Time ``fn(*inputs)`` on the current CUDA stream.

    `make_inputs()` returns one fresh tuple of arguments (random data, never zeros); it is
    called as often as needed to hold more than 2x the L2 cache (at most `max_input_bytes`),
    and the calls cycle through those copies.
    """
    require_gpu()
    return _interleaved([(fn, _input_sets(make_inputs, reps, max_input_bytes))], warmup, reps)[0]


def _interleaved(calls: Sequence[tuple[Callable[..., Any], Sequence[tuple]]], warmup: int, reps: int) -> list[Timing]:
    """Time each (fn, input_sets) of `calls` `reps` times, one call of each in turn per repetition
    (so that clocks and caches treat them alike), with an event pair around every call."""
    if warmup < 0 or reps < 1:
        raise ValueError(f"warmup must be >= 0 and reps >= 1, got {warmup}, {reps}")
    for i in range(warmup):
        for fn, input_sets in calls:
            fn(*input_sets[i % len(input_sets)])
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
              for _ in calls]
    torch.cuda.synchronize()
    for i in range(reps):
        for (fn, input_sets), pairs in zip(calls, events):
            start, end = pairs[i]
            start.record()
            fn(*input_sets[i % len(input_sets)])
            end.record()
    torch.cuda.synchronize()
    timings = []
    for (_, input_sets), pairs in zip(calls, events):
        times = sorted(start.elapsed_time(end) * 1e3 for start, end in pairs)
        quantiles = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
        timings.append(Timing(statistics.median(times), quantiles[0], quantiles[-1], reps, len(input_sets)))
    return timings


@dataclass(frozen=True)
class CallTiming:
    """A public call timed as a user makes it, and the kernel launches it made, timed alone."""

    call: Timing  # the public function, default arguments, checks and all
    launch: Timing  # the same launches replayed through kernels.launch, nothing else
    launches: int  # kernel launches per call
    host_us: float  # host time per call (what the GPU overlaps with earlier work, or waits for)

    @property
    def overhead_us(self) -> float:
        return self.call.median_us - self.launch.median_us

    def __str__(self) -> str:
        return (f"public call {self.call.median_us:.1f} us, launch alone {self.launch.median_us:.1f} us "
                f"({self.launches} launch{'es' if self.launches != 1 else ''}, host {self.host_us:.0f} us a call), "
                f"overhead {self.overhead_us:+.1f} us ({100 * self.overhead_us / self.launch.median_us:+.1f}%)")


def time_call(
    fn: Callable[..., Any],
    make_inputs: Callable[[], Sequence[Any]],
    *,
    warmup: int = 5,
    reps: int = 50,
    max_input_bytes: int = 8 << 30,
) -> CallTiming:
    """Time the public call ``fn(*inputs)`` and, on the same input sets, the kernel launches it
    makes replayed alone (recorded once per input set with kernels.recording_launches), one of each
    in turn: the difference is what the Python around the kernels costs a caller. Also the host's
    own time per call: while it is below the GPU time, the GPU never waits for the host."""
    require_gpu()
    input_sets = _input_sets(make_inputs, reps, max_input_bytes)
    recorded = []
    for inputs in input_sets:
        with recording_launches() as launches:
            fn(*inputs)
        recorded.append(launches)
    if not recorded[0]:
        raise ValueError("the call launched no kernel of the package: nothing to time alone")

    def replay(i):
        for launch in recorded[i]:
            launch.again()

    call, alone = _interleaved([(fn, input_sets), (replay, [(i,) for i in range(len(input_sets))])], warmup, reps)
    host_us = []
    for _ in range(2):  # the host's own time per call, the GPU never waited for: Python, checks, launch
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(reps):
            fn(*input_sets[i % len(input_sets)])
        host_us.append((time.perf_counter() - start) / reps * 1e6)
    torch.cuda.synchronize()
    return CallTiming(call, alone, len(recorded[0]), min(host_us))


@dataclass(frozen=True)
class Ceilings:
    """What the chip reached in this process: copy bandwidth and dense GEMM rates."""

    copy_tbps: float  # bytes read + bytes written per second, device to device
    bf16_tflops: float  # torch.matmul, 8192^3, random bf16
    fp8_tflops: float  # torch._scaled_mm, 8192^3, random e4m3, per-tensor scales
    device: str

    def __str__(self) -> str:
        return (
            f"{self.device}: copy {self.copy_tbps:.2f} TB/s, bf16 GEMM {self.bf16_tflops:.0f} TFLOP/s, "
            f"FP8 GEMM {self.fp8_tflops:.0f} TFLOP/s"
        )


def measure_ceilings(gemm_size: int = 8192, copy_bytes: int = 2 << 30) -> Ceilings:
    """Measure the copy, bf16 GEMM and FP8 GEMM ceilings now, with :func:`benchmark`."""
    require_gpu()
    device = torch.device("cuda", torch.cuda.current_device())
    n = copy_bytes // 4
    copy = benchmark(lambda src, dst: dst.copy_(src),
                     lambda: (torch.rand(n, device=device), torch.empty(n, device=device)),
                     reps=20, max_input_bytes=copy_bytes * 2)
    m = gemm_size
    bf16 = benchmark(torch.matmul,
                     lambda: (torch.randn(m, m, device=device, dtype=torch.bfloat16),
                              torch.randn(m, m, device=device, dtype=torch.bfloat16)),
                     reps=20)
    one = torch.ones((), device=device)

    def make_fp8():
        a = torch.randn(m, m, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(m, m, device=device).to(torch.float8_e4m3fn).t()  # column-major B
        return a, b

    fp8 = benchmark(lambda a, b: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16),
                    make_fp8, reps=20)
    return Ceilings(
        copy_tbps=copy.tbps(2 * copy_bytes),
        bf16_tflops=bf16.tflops(2 * m**3),
        fp8_tflops=fp8.tflops(2 * m**3),
        device=torch.cuda.get_device_name(device),
    )


def report(
    name: str,
    timing: Timing,
    *,
    flops: float | None = None,
    nbytes: float | None = None,
    ceiling_tflops: float | None = None,
    ceiling_tbps: float | None = None,
    baseline: Timing | None = None,
) -> str:
    """One line: time, rate, fraction of the ceiling, speed-up over the baseline."""
    parts = [f"{name}: {timing.median_us:9.1f} us"]
    if flops is not None:
        rate = timing.tflops(flops)
        parts.append(f"{rate:7.1f} TFLOP/s")
        if ceiling_tflops:
            parts.append(f"{100 * rate / ceiling_tflops:5.1f}% of ceiling")
    if nbytes is not None:
        rate = timing.tbps(nbytes)
        parts.append(f"{rate:5.2f} TB/s")
        if ceiling_tbps:
            parts.append(f"{100 * rate / ceiling_tbps:5.1f}% of copy")
    if baseline is not None:
        parts.append(f"{baseline.median_us / timing.median_us:5.2f}x vs baseline")
    return ", ".join(parts)


@dataclass
class Results:
    """What one benchmark measured for one operation, written as JSON for the chapters' figures.

    ``add`` records one timed line of a case (the torch baseline, the public call with its default
    arguments, or one kernel version), with the work it did (FLOPs, bytes) and the ceiling its rate
    is quoted against ("copy", "bf16" or "fp8", measured in the same run); ``write`` stores them with
    the ceilings and the environment in RESULTS_DIR/<operation>.json.
    """

    operation: str
    ceilings: Ceilings
    rows: list[dict] = field(default_factory=list)

    def add(self, case: str, role: str, timing: Timing | CallTiming, *, version: int | None = None, label: str = "",
            flops: float | None = None, nbytes: float | None = None, ceiling: str | None = None,
            baseline: Timing | None = None) -> str:
        """Record one line; return it as :func:`report` prints it (plus the launch alone of a public call)."""
        if role not in ("baseline", "default", "kernel"):
            raise ValueError(f"role must be 'baseline', 'default' or 'kernel', got {role!r}")
        if ceiling not in (None, "copy", "bf16", "fp8"):
            raise ValueError(f"ceiling must be None, 'copy', 'bf16' or 'fp8', got {ceiling!r}")
        call = timing.call if isinstance(timing, CallTiming) else timing
        self.rows.append({
            "case": case, "role": role, "version": version, "label": label or (f"kernel {version}" if version else role),
            "us": round(call.median_us, 3), "p20_us": round(call.p20_us, 3), "p80_us": round(call.p80_us, 3),
            "launch_us": round(timing.launch.median_us, 3) if isinstance(timing, CallTiming) else None,
            "flops": flops, "bytes": nbytes, "ceiling": ceiling,
        })
        tflops = {"bf16": self.ceilings.bf16_tflops, "fp8": self.ceilings.fp8_tflops}.get(ceiling)
        line = report(f"{case} | {self.rows[-1]['label']}", call, flops=flops, nbytes=nbytes, ceiling_tflops=tflops,
                      ceiling_tbps=self.ceilings.copy_tbps if nbytes is not None else None, baseline=baseline)
        if isinstance(timing, CallTiming):
            line += f"\n    {timing}"
        return line

    def write(self, directory: Path | None = None) -> Path:
        import torch as _torch

        directory = Path(directory or RESULTS_DIR)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            import cupy

            cupy_version = cupy.__version__
        except ImportError:  # pragma: no cover - the benchmarks need CuPy anyway
            cupy_version = None
        payload = {
            "operation": self.operation,
            "ceilings": {"copy_tbps": round(self.ceilings.copy_tbps, 4), "bf16_tflops": round(self.ceilings.bf16_tflops, 2),
                         "fp8_tflops": round(self.ceilings.fp8_tflops, 2)},
            "environment": {"device": self.ceilings.device, "torch": _torch.__version__, "cuda": _torch.version.cuda,
                            "cupy": cupy_version, "python": platform.python_version(),
                            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")},
            "rows": self.rows,
        }
        path = directory / f"{self.operation}.json"
        path.write_text(json.dumps(payload, indent=1) + "\n")
        return path
