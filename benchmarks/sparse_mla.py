"""Benchmark the sparse MLA decode kernel (cuda/sparse_mla.cu) against torch on an H200.

    python benchmarks/sparse_mla.py     (from the repository root, on a GPU; under a minute)

Decode, one new token per sequence: batch 64, 128 heads, k = 2048 selected of S = 32768 cached
tokens (bf16 latent cache [B, S, 576]). Baselines:
* dense masked torch attention: bf16 bmm over the whole cache, -inf outside the selection, float32
  softmax, bf16 bmm with c_kv (what "dense attention with -inf outside the set" costs);
* gathered torch attention: gather the 2048 selected latents, then the same over them only;
and both kernels of cuda/sparse_mla.cu: kernel 1 ("simt", float32 CUDA cores) and kernel 2 ("mma",
bf16 tensor cores), each first checked once against the float32 reference.
FLOPs are those of the sparse work, 2 B n_h k (576 + 512), quoted against the bf16 ceiling; bytes
are the selected latents read once plus q and the float32 output.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import bench, compare  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402
from dsa_tutorial.sparse_attention import sparse_mla_attention, sparse_mla_decode_cuda  # noqa: E402

B, N_H, K, S = 64, 128, 2048, 32768
SCALE = ModelArgs().softmax_scale


def make():
    q = torch.randn(B, N_H, 576, device="cuda").to(torch.bfloat16)
    kv = torch.randn(B, S, 576, device="cuda").to(torch.bfloat16)
    indices = torch.rand(B, S, device="cuda").argsort(dim=-1)[:, :K].sort(dim=-1).values.int().contiguous()
    # the dense baseline's additive mask: 0 on the selection, -inf elsewhere
    mask = torch.full((B, 1, S), float("-inf"), device="cuda").scatter_(-1, indices[:, None].long(), 0.0)
    return q, kv, indices, mask


def dense_masked(q, kv, indices, mask):
    scores = torch.bmm(q, kv.transpose(1, 2)).float() * SCALE + mask  # [B, n_h, S]
    p = torch.softmax(scores, dim=-1).to(torch.bfloat16)
    return torch.bmm(p, kv[..., :512])  # [B, n_h, 512]


def gathered(q, kv, indices, mask):
    selected = torch.gather(kv, 1, indices.long()[..., None].expand(-1, -1, 576))  # [B, k, 576]
    p = torch.softmax(torch.bmm(q, selected.transpose(1, 2)).float() * SCALE, dim=-1).to(torch.bfloat16)
    return torch.bmm(p, selected[..., :512])


def kernel_simt(q, kv, indices, mask):
    return sparse_mla_decode_cuda(q[..., :512], q[..., 512:], kv, indices, SCALE, check_indices=False, kernel="simt")


def kernel_mma(q, kv, indices, mask):
    return sparse_mla_decode_cuda(q[..., :512], q[..., 512:], kv, indices, SCALE, check_indices=False, kernel="mma")


def check_once() -> None:
    """Both kernels against the float32 reference on one full-size sequence batch (a sanity check)."""
    q, kv, indices, _ = make()
    q, kv, indices = q[:4], kv[:4].contiguous(), indices[:4].contiguous()
    ref = sparse_mla_attention(q.float()[:, None, :, :512], q.float()[:, None, :, 512:], kv.float()[..., :512],
                               kv.float()[..., 512:], indices[:, None], SCALE)[:, 0]
    for name, fn, tol in [("simt", kernel_simt, dict(atol=1e-4, rtol=1e-4)),
                          ("mma", kernel_mma, dict(atol=1e-2 * ref.abs().max().item(), rtol=1e-2))]:
        result = compare.assert_close(fn(q, kv, indices, None), ref, **tol, name=f"sparse_mla_decode {name}")
        print(f"sparse_mla_decode {name} vs float32 reference: {result} {result.measured()}")


def main() -> None:
    torch.manual_seed(0)
    check_once()
    ceilings = bench.measure_ceilings()
    print(ceilings)
    flops = 2 * B * N_H * K * (576 + 512)
    nbytes = B * K * 576 * 2 + B * N_H * 576 * 2 + B * N_H * 512 * 4
    dense = bench.benchmark(dense_masked, make, warmup=2, reps=10, max_input_bytes=8 << 30)
    gather = bench.benchmark(gathered, make, warmup=2, reps=10)
    simt = bench.benchmark(kernel_simt, make, warmup=2, reps=10)
    mma = bench.benchmark(kernel_mma, make, warmup=2, reps=10)
    label = f"B={B} n_h={N_H} k={K} S={S}"
    print(bench.report(f"torch dense masked  {label}", dense, flops=flops, ceiling_tflops=ceilings.bf16_tflops))
    print(bench.report(f"torch gathered      {label}", gather, flops=flops, ceiling_tflops=ceilings.bf16_tflops,
                       nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps, baseline=dense))
    print(bench.report(f"kernel 1 simt       {label}", simt, flops=flops, ceiling_tflops=ceilings.bf16_tflops,
                       nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps, baseline=dense))
    print(bench.report(f"kernel 2 mma        {label}", mma, flops=flops, ceiling_tflops=ceilings.bf16_tflops,
                       nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps, baseline=dense))
    print(bench.report("kernel 1 simt vs gathered torch", simt, baseline=gather))
    print(bench.report("kernel 2 mma  vs gathered torch", mma, baseline=gather))


if __name__ == "__main__":
    main()
