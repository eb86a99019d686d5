"""Benchmark the radix-select top-k kernels (cuda/topk.cu) against torch.topk on an H200.

    python benchmarks/topk.py           (from the repository root, on a GPU; well under a minute)

Cases, float32 scores, k = 2048, every position visible (the kernel still applies its NaN and
visibility rules; torch.topk has none, so the baseline does strictly less):
* 128 rows x 131072 (decode over a 128K context; SPEC section 9: torch.topk 327 us),
* 8192 rows x 8192 and 2048 rows x 65536 (prefill shapes).
The bytes are one read of the scores plus the indices written: the least any top-k must move,
quoted against the copy bandwidth measured in the same run. The baseline is torch.topk(sorted=False)
(the faster of its two modes; sorted=True is printed too).

Both kernels are timed through `select_topk_cuda` with check_positions=False (the range check of
query_positions reads them back to the host, a synchronisation that would put the wrapper's Python
time inside every measurement; the kernel is memory-safe without it), and kernel 2 once more
launched directly ("kernel only"), which is what the GPU itself spends.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import bench  # noqa: E402
from dsa_tutorial.kernels import launch  # noqa: E402
from dsa_tutorial.topk import TOPK_LIST_MAX, TOPK_THREADS, select_topk_cuda  # noqa: E402

K = 2048


def main() -> None:
    torch.manual_seed(0)
    ceilings = bench.measure_ceilings()
    print(ceilings)
    for rows, length in ((128, 131072), (8192, 8192), (2048, 65536)):
        positions = torch.full((rows,), length - 1, device="cuda")

        def make(rows=rows, length=length):
            return (torch.randn(rows, length, device="cuda"),)

        nbytes = rows * length * 4 + rows * K * 4
        sorted_base = bench.benchmark(lambda s: s.topk(K, dim=-1), make)
        base = bench.benchmark(lambda s: s.topk(K, dim=-1, sorted=False), make)
        four = bench.benchmark(
            lambda s, p=positions: select_topk_cuda(s, K, p, kernel="four_passes", check_positions=False), make)
        compact = bench.benchmark(
            lambda s, p=positions: select_topk_cuda(s, K, p, kernel="compact", check_positions=False), make)
        out = torch.empty(rows, K, dtype=torch.int32, device="cuda")
        capacity = min(length, TOPK_LIST_MAX)

        def kernel_only(s, p=positions, out=out, length=length, capacity=capacity, rows=rows):
            launch("topk", "topk_radix_select_compact", grid=rows, block=TOPK_THREADS,
                   args=(s, p, rows, out, length, K, capacity), shared_mem=8 * capacity)

        bare = bench.benchmark(kernel_only, make)
        label = f"{rows:5d} x {length:6d}"
        print(bench.report(f"torch.topk sorted          {label}", sorted_base, nbytes=nbytes,
                           ceiling_tbps=ceilings.copy_tbps))
        print(bench.report(f"torch.topk unsorted        {label}", base, nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps))
        print(bench.report(f"kernel 1 four passes       {label}", four, nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps,
                           baseline=base))
        print(bench.report(f"kernel 2 compact           {label}", compact, nbytes=nbytes,
                           ceiling_tbps=ceilings.copy_tbps, baseline=base))
        print(bench.report(f"kernel 2 compact, kernel only {label}", bare, nbytes=nbytes,
                           ceiling_tbps=ceilings.copy_tbps, baseline=base))


if __name__ == "__main__":
    main()
