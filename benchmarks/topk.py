"""Benchmark the radix-select top-k kernels (cuda/select_topk.cu) against torch.topk on an H200.

    python benchmarks/topk.py           (from the repository root, on a GPU; well under a minute)

Cases, float32 scores, k = 2048:
* 128 rows x 131072 (decode over a 128K context),
* 8192 rows x 8192 and 2048 rows x 65536 (prefill shapes).
For each, the public call as a user makes it, timed with bench.time_call (its kernel launch replayed
alone beside it: the difference is the Python of the call):
* `select_topk_cuda(scores, 2048)`, default arguments: kernel=None (select_topk_default: kernel 3 for
  the 8192-long rows, kernel 4 for the longer ones), the causal default
  positions S - T + t computed on the device (at the prefill shapes row t then sees only
  S - T + t + 1 scores: less work than torch.topk's full rows);
* `select_topk_cuda(scores, 2048, last)` with query_positions = S - 1 for every row (every score
  visible, as torch.topk sees them; data checks off, the default: the positions are not read back);
then every version of SELECT_TOPK_KERNELS (kernel=1, 2, 3, 4; kernel 3 only where a row fits one
block's shared memory) through the same call with positions, and
the baseline torch.topk(sorted=False) (the faster of its two modes; sorted=True is printed too;
torch.topk has no visibility or NaN rule, so it does strictly less). The bytes are one read of the
scores plus the indices written: the least any top-k must move, quoted against the copy bandwidth
measured in the same run. Every line is also written to book/data/kernels/select_topk.json
(bench.Results) for chapter 5's figure.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import bench, checks  # noqa: E402
from dsa_tutorial.topk import SELECT_TOPK_KERNELS, select_topk_cuda, select_topk_why_not  # noqa: E402

K = 2048


def main() -> None:
    torch.manual_seed(0)
    checks.set_data_checks(False)  # what a user gets by default, whatever DSA_CHECK says: no positions read back
    ceilings = bench.measure_ceilings()
    print(ceilings)
    results = bench.Results("select_topk", ceilings)
    for rows, length in ((128, 131072), (8192, 8192), (2048, 65536)):

        def make(rows=rows, length=length):
            return (torch.randn(rows, length, device="cuda"),)

        last = torch.full((rows,), length - 1, device="cuda")  # every position visible
        rates = dict(nbytes=rows * length * 4 + rows * K * 4, ceiling="copy")
        sorted_base = bench.benchmark(lambda s: s.topk(K, dim=-1), make)
        base = bench.benchmark(lambda s: s.topk(K, dim=-1, sorted=False), make)
        case = f"{rows} x {length}"
        print(results.add(case, "baseline", sorted_base, label="torch.topk sorted", **rates))
        print(results.add(case, "baseline", base, label="torch.topk unsorted", **rates))
        timed = bench.time_call(lambda s: select_topk_cuda(s, K), make)
        print(results.add(case, "default", timed, label="default, causal positions", baseline=base, **rates))
        timed = bench.time_call(lambda s, p=last: select_topk_cuda(s, K, p), make)
        print(results.add(case, "default", timed, label="default, positions S - 1", baseline=base, **rates))
        for v in SELECT_TOPK_KERNELS.versions:
            if select_topk_why_not(length)[v] is not None:  # kernel 3: rows up to one block's shared memory
                continue
            timing = bench.benchmark(lambda s, v=v, p=last: select_topk_cuda(s, K, p, kernel=v), make)
            print(results.add(case, "kernel", timing, version=v, baseline=base, **rates))
    print("wrote", results.write())

if __name__ == "__main__":
    main()
