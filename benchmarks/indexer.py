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
Every rate is quoted against the bf16 GEMM ceiling measured in the same run (torch.matmul 8192^3).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import bench  # noqa: E402
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


def torch_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Equation 1 in eager torch, bf16 GEMMs, 1024 queries at a time (a [1024, 64, S] bf16 buffer)."""
    T, S = q.shape[0], k.shape[0]
    out = torch.empty(T, S, dtype=torch.float32, device=q.device)
    for t0 in range(0, T, chunk):
        qc = q[t0:t0 + chunk]  # [c, H, D]
        logits = (qc.reshape(-1, D) @ k.T).view(qc.shape[0], H, S)  # [c, H, S] bf16
        out[t0:t0 + chunk] = torch.einsum("chs,ch->cs", logits.relu().float(), w[t0:t0 + chunk])
    return out


def main() -> None:
    torch.manual_seed(0)
    ceilings = bench.measure_ceilings()
    print(ceilings)
    gemm = dict(ceiling_tflops=ceilings.bf16_tflops)
    T = S = 8192
    full, causal = 2 * T * S * H * D, 2 * causal_pairs(T) * H * D
    base = bench.benchmark(torch_scores, make_inputs(T, S), warmup=1, reps=5)
    print(bench.report(f"torch bf16 chunks            T=S={T} full  ", base, flops=full, **gemm))
    for is_causal, flops in ((False, full), (True, causal)):
        label = "causal" if is_causal else "full  "
        timed = bench.time_call(lambda q, w, k, c=is_causal: index_scores_cuda(q, w, k, causal=c), make_inputs(T, S),
                                warmup=3, reps=20)
        print(bench.report(f"index_scores_cuda (default)  T=S={T} {label}", timed.call, flops=flops, baseline=base,
                           **gemm))
        print(f"    {timed}")
        for v in TENSOR_CORES:
            timing = bench.benchmark(lambda q, w, k, v=v, c=is_causal: index_scores_cuda(q, w, k, causal=c, kernel=v),
                                     make_inputs(T, S), warmup=3, reps=20)
            print(bench.report(f"kernel {v} {INDEX_SCORES_KERNELS[v].entry:<22}  T=S={T} {label}", timing,
                               flops=flops, baseline=base, **gemm))
    small = 2048
    small_flops = 2 * small * small * H * D
    small_base = bench.benchmark(torch_scores, make_inputs(small, small), warmup=1, reps=5)
    print(bench.report(f"torch bf16 chunks            T=S={small} full  ", small_base, flops=small_flops, **gemm))
    for v in INDEX_SCORES_KERNELS.versions:
        timing = bench.benchmark(lambda q, w, k, v=v: index_scores_cuda(q, w, k, kernel=v),
                                 make_inputs(small, small), warmup=1, reps=5)
        print(bench.report(f"kernel {v} {INDEX_SCORES_KERNELS[v].entry:<22}  T=S={small} full  ", timing,
                           flops=small_flops, baseline=small_base, **gemm))


if __name__ == "__main__":
    main()
