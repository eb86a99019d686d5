"""Benchmark the index-score kernels (cuda/index_scores.cu) against torch on an H200.

    python benchmarks/indexer.py        (from the repository root, on a GPU; about two minutes)

Cases (one `bench.report` line each; FLOPs count a multiply-add as two):
* the public call `index_scores_cuda(q_idx, w, k_idx)` with its default arguments (kernel=None: kernel
  5 at D = 128) at T = S = 8192, H = 64, D = 128, full and causal, timed as a user calls it, with
  the same kernel launch replayed alone beside it (bench.time_call: the difference is the Python of
  the call);
* torch baseline: bf16 GEMM per 1024-query chunk (q [c H, D] @ k^T), ReLU, times w, sum over heads,
  full T x S;
* every tensor-core version of INDEX_SCORES_KERNELS (kernel=3, 4, 5) at the same size, full and
  causal (masked tiles skipped; FLOPs of the causal pairs only; the baseline is still the full
  torch computation);
* every version (1 to 5) at T = S = 2048 (a sixteenth of the work: kernels 1 and 2 take seconds at
  8192), to show the progression.
Every rate is quoted against the bf16 GEMM ceiling measured in the same run (torch.matmul 8192^3);
the torch baseline is dsa_tutorial.baselines.index_scores_torch. Every line is also written to
book/data/kernels/index_scores.json (bench.Results) for chapter 4's figure.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import baselines, bench  # noqa: E402
from dsa_tutorial.cost import causal_pairs  # noqa: E402
from dsa_tutorial.indexer import INDEX_SCORES_KERNELS, index_scores_cuda  # noqa: E402

H, D = 64, 128
TENSOR_CORES = (3, 4, 5)  # the versions timed at T = S = 8192; all of them at 2048


def make_inputs(T: int, S: int):
    def make():
        q = torch.randn(T, H, D, device="cuda").to(torch.bfloat16)
        w = torch.randn(T, H, device="cuda") * H ** -0.5
        k = torch.randn(S, D, device="cuda").to(torch.bfloat16)
        return q, w, k
    return make


def moved(T: int, S: int) -> int:
    """Bytes every kernel must move at least: q, w and k read once, the float32 scores written."""
    return T * H * D * 2 + T * H * 4 + S * D * 2 + T * S * 4


def main() -> None:
    torch.manual_seed(0)
    ceilings = bench.measure_ceilings()
    print(ceilings)
    results = bench.Results("index_scores", ceilings)
    T = S = 8192
    full, causal = 2 * T * S * H * D, 2 * causal_pairs(T) * H * D
    base = bench.benchmark(baselines.index_scores_torch, make_inputs(T, S), warmup=1, reps=5)
    for is_causal, flops in ((False, full), (True, causal)):
        case = f"T=S={T} {'causal' if is_causal else 'full'}"
        rates = dict(flops=flops, nbytes=moved(T, S), ceiling="bf16")
        print(results.add(case, "baseline", base, label="torch bf16 chunks (full)", **rates))
        timed = bench.time_call(lambda q, w, k, c=is_causal: index_scores_cuda(q, w, k, causal=c), make_inputs(T, S),
                                warmup=3, reps=20)
        print(results.add(case, "default", timed, baseline=base, **rates))
        for v in TENSOR_CORES:
            timing = bench.benchmark(lambda q, w, k, v=v, c=is_causal: index_scores_cuda(q, w, k, causal=c, kernel=v),
                                     make_inputs(T, S), warmup=3, reps=20)
            print(results.add(case, "kernel", timing, version=v, baseline=base, **rates))
    small = 2048
    case, rates = f"T=S={small} full", dict(flops=2 * small * small * H * D, nbytes=moved(small, small), ceiling="bf16")
    small_base = bench.benchmark(baselines.index_scores_torch, make_inputs(small, small), warmup=1, reps=5)
    print(results.add(case, "baseline", small_base, label="torch bf16 chunks", **rates))
    for v in INDEX_SCORES_KERNELS.versions:
        timing = bench.benchmark(lambda q, w, k, v=v: index_scores_cuda(q, w, k, kernel=v),
                                 make_inputs(small, small), warmup=1, reps=5)
        print(results.add(case, "kernel", timing, version=v, baseline=small_base, **rates))
    print("wrote", results.write())


if __name__ == "__main__":
    main()
