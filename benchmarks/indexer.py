"""Benchmark the lightning-indexer logits kernels (cuda/indexer_logits.cu) against torch on an H200.

    python benchmarks/indexer.py        (from the repository root, on a GPU; under two minutes)

Cases (one `bench.report` line each; FLOPs count a multiply-add as two):
* torch baseline: bf16 GEMM per 1024-query chunk (q [c H, D] @ k^T), ReLU, times w, sum over heads,
  full T x S (SPEC section 9 measured 24.1 ms = 46 TFLOP/s for this one).
* kernel 3 (mma.sync, bf16 in, float32 accumulate) at T = S = 8192, H = 64, D = 128, both tile widths
  (mma: 64 x 128, mma_wide: 64 x 256), and kernel 4 (mma_keys: the keys in registers, the queries
  streamed with ldmatrix): full, and causal (masked tiles skipped; FLOPs of the causal pairs only;
  the baseline is still the full torch computation).
* kernels 1 and 2 (naive, tiled) at T = S = 2048 (a sixteenth of the work), to show the progression.
Every rate is quoted against the bf16 GEMM ceiling measured in the same run (torch.matmul 8192^3).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import bench  # noqa: E402
from dsa_tutorial.cost import causal_pairs  # noqa: E402
from dsa_tutorial.indexer import index_scores_cuda  # noqa: E402

H, D = 64, 128


def make_inputs(T: int, S: int):
    def make():
        q = torch.randn(T, H, D, device="cuda").to(torch.bfloat16)
        w = torch.randn(T, H, device="cuda") * H ** -0.5
        k = torch.randn(S, D, device="cuda").to(torch.bfloat16)
        return q, w, k
    return make


def torch_logits(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
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
    T = S = 8192
    full = 2 * T * S * H * D
    causal = 2 * causal_pairs(T) * H * D
    base = bench.benchmark(torch_logits, make_inputs(T, S), warmup=1, reps=5)
    print(bench.report(f"torch bf16 chunks      T=S={T} full  ", base, flops=full, ceiling_tflops=ceilings.bf16_tflops))
    labels = {"mma": "kernel 3 mma     ", "mma_wide": "kernel 3 mma_wide", "mma_keys": "kernel 4 mma_keys"}
    for kernel, label in labels.items():
        timing = bench.benchmark(lambda q, w, k, kernel=kernel: index_scores_cuda(q, w, k, kernel),
                                 make_inputs(T, S), warmup=3, reps=20)
        print(bench.report(f"{label}      T=S={T} full  ", timing, flops=full,
                           ceiling_tflops=ceilings.bf16_tflops, baseline=base))
    for kernel, label in labels.items():
        timing = bench.benchmark(lambda q, w, k, kernel=kernel: index_scores_cuda(q, w, k, kernel, causal=True),
                                 make_inputs(T, S), warmup=3, reps=20)
        print(bench.report(f"{label}      T=S={T} causal", timing, flops=causal,
                           ceiling_tflops=ceilings.bf16_tflops, baseline=base))
    small = 2048
    small_flops = 2 * small * small * H * D
    small_base = bench.benchmark(torch_logits, make_inputs(small, small), warmup=1, reps=5)
    print(bench.report(f"torch bf16 chunks      T=S={small} full  ", small_base, flops=small_flops,
                       ceiling_tflops=ceilings.bf16_tflops))
    for number, kernel in enumerate(("naive", "tiled", "mma", "mma_keys"), start=1):
        timing = bench.benchmark(lambda q, w, k, kernel=kernel: index_scores_cuda(q, w, k, kernel),
                                 make_inputs(small, small), warmup=1, reps=5)
        print(bench.report(f"kernel {number} {kernel:<8}       T=S={small} full  ",
                           timing, flops=small_flops, ceiling_tflops=ceilings.bf16_tflops, baseline=small_base))


if __name__ == "__main__":
    main()
