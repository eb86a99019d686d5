"""Benchmark sparse MLA decoding over the FP8 latent cache (cuda/sparse_mla_decode_fp8.cu) on an H200.

    python benchmarks/sparse_decode_fp8.py     (from the repository root, on a GPU; about a minute)
    python benchmarks/sparse_decode_fp8.py --kernels 3 4   (some versions only: printed, not written)

DeepSeek-V3.2's decode step as FlashMLA benchmarks it: batch 128, 128 heads, s_q query tokens a sequence
(2, then 1), k = 2048 selected tokens a query, each sequence's context 32K tokens in pages of 64 tokens
(blocks scattered over a cache of 128 x 512 blocks, 2.75 GB of FP8 latents), the selection random and
distinct within each context. Timed:
* the public call `sparse_mla_decode_fp8_cuda(q, kv_cache, indices, softmax_scale)` with its default
  arguments (kernel=None: kernel 3 on an H200, kernel 2 elsewhere; data checks off, the default), as a user
  calls it, with its launches replayed alone beside it (bench.time_call);
* every version of SPARSE_MLA_DECODE_FP8_KERNELS (or those after --kernels) through the same call, each
  first checked against the float32 reference on a few rows;
* a torch baseline: gather the selected tokens' 656-byte rows, dequantise them to bf16, then bf16 attention
  over them (batched matmuls, float32 softmax).
FLOPs are 2 h s_q k (576 + 512) a sequence (q . kv over 576 dims, p . v over 512), quoted against the bf16
GEMM ceiling measured in the same run and against FlashMLA's published 410 TFLOP/s for this shape (s_q 2,
k 2048, on an H800, whose bf16 dense peak is the H200's). Bytes are the selected rows read once (656 each)
plus q and out, against the copy ceiling. The baseline is dsa_tutorial.baselines.sparse_mla_decode_fp8_torch;
every line is also written to book/data/kernels/sparse_mla_decode_fp8.json (bench.Results).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import baselines, bench, checks, compare  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402
from dsa_tutorial.latent_cache import (SPARSE_MLA_DECODE_FP8_KERNELS, sparse_mla_decode_fp8,  # noqa: E402
                                       sparse_mla_decode_fp8_cuda)

B, H, K, CONTEXT, BLOCK = 128, 128, 2048, 32768, 64
SCALE = ModelArgs().softmax_scale
FLASHMLA_TFLOPS = 410.0  # FlashMLA's sparse FP8 decoding, H800, s_q 2, k 2048 (its README)
BLOCKS_PER_SEQUENCE = CONTEXT // BLOCK


def make_inputs(s_q: int):
    """q [B, s_q, H, 576], the paged FP8 cache and indices [B, s_q, K] into it (block * 64 + row)."""
    num_blocks = B * BLOCKS_PER_SEQUENCE
    # random bytes make random e4m3 values; the scales (bytes 512..527 of a token) are set to powers of two
    # and k^R to bf16 N(0, 1): what quantize() would write, without quantising 2.75 GB first
    cache = torch.randint(0, 256, (num_blocks, BLOCK, 1, 656), dtype=torch.uint8, device="cuda")
    cache[..., :512] &= 0xF7  # clears the top mantissa bit: no NaN (0x7F, 0xFF), |value| <= 0x77 = 240
    exponents = torch.randint(-9, -5, (num_blocks, BLOCK, 1, 4), device="cuda", dtype=torch.int32)
    cache[..., 512:528] = torch.ldexp(torch.ones(exponents.shape, device="cuda"), exponents).view(torch.uint8)
    cache[..., 528:] = torch.randn(num_blocks, BLOCK, 1, 64, device="cuda").bfloat16().view(torch.uint8)
    cache = cache.view(torch.float8_e4m3fn)
    # sequence b owns blocks block_table[b] (scattered); each query picks K distinct tokens of its context
    block_table = torch.randperm(num_blocks, device="cuda").view(B, BLOCKS_PER_SEQUENCE)
    tokens = torch.rand(B * s_q, CONTEXT, device="cuda").argsort(dim=-1)[:, :K].view(B, s_q, K)
    blocks = torch.gather(block_table, 1, (tokens // BLOCK).view(B, -1)).view(B, s_q, K)
    indices = (blocks * BLOCK + tokens % BLOCK).int().contiguous()
    q = torch.randn(B, s_q, H, 576, device="cuda").bfloat16()
    return q, cache, indices


def torch_baseline(q, kv_cache, indices):
    return baselines.sparse_mla_decode_fp8_torch(q, kv_cache, indices, SCALE)


def check_once(s_q: int, versions) -> None:
    """The versions and the baseline against the float32 reference on 2 full-size sequences."""
    q, cache, indices = make_inputs(s_q)
    q, indices = q[:2].contiguous(), indices[:2].contiguous()
    ref_out, ref_lse = sparse_mla_decode_fp8(q, cache, indices, SCALE)
    scale = ref_out.abs().max().item()
    for v in versions:
        out, lse = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=v)
        tol = dict(atol=1e-4 * scale, rtol=2**-8) if v == 1 else dict(atol=1e-2 * scale, rtol=1e-2)
        result = compare.assert_close(out.float(), ref_out, **tol, name=f"kernel {v}")
        compare.assert_close(lse, ref_lse, atol=1e-4 if v == 1 else 4e-3, name=f"kernel {v} lse")
        print(f"s_q={s_q} kernel {v} vs float32 reference: {result} {result.measured()}")
    # the baseline's bmm returns the scores in bf16 (2^-9 relative: ~0.05 absolute on scores ~30): 5e-2
    baseline = torch_baseline(q, cache, indices).float()
    result = compare.assert_close(baseline, ref_out, atol=5e-2 * scale, rtol=5e-2, name="torch baseline")
    print(f"s_q={s_q} torch baseline vs float32 reference: {result} {result.measured()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", type=int, nargs="+", choices=SPARSE_MLA_DECODE_FP8_KERNELS.versions,
                        default=list(SPARSE_MLA_DECODE_FP8_KERNELS.versions),
                        help="the versions to time (default: all, and the results are written)")
    versions = parser.parse_args().kernels
    every = sorted(versions) == list(SPARSE_MLA_DECODE_FP8_KERNELS.versions)
    torch.manual_seed(0)
    checks.set_data_checks(False)  # what a user gets by default, whatever DSA_CHECK says: no index read back
    ceilings = bench.measure_ceilings()
    print(ceilings)
    results = bench.Results("sparse_mla_decode_fp8", ceilings)
    for s_q in (2, 1):
        check_once(s_q, versions)
        flops = 2 * B * H * s_q * K * (576 + 512)
        rates = dict(flops=flops, ceiling="bf16", nbytes=B * s_q * K * 656 + B * s_q * H * 576 * 2 + B * s_q * H * 512 * 2)
        case = f"B={B} h={H} s_q={s_q} k={K}"

        def inputs(s_q=s_q):
            return make_inputs(s_q)

        def public_call(q, kv_cache, indices):
            return sparse_mla_decode_fp8_cuda(q, kv_cache, indices, SCALE)

        baseline = bench.benchmark(torch_baseline, inputs, warmup=2, reps=10)
        print(results.add(case, "baseline", baseline, label="torch gather + dequantise + bf16", **rates))
        timed = bench.time_call(public_call, inputs, warmup=3, reps=30)
        print(results.add(case, "default", timed, baseline=baseline, **rates))
        rate = timed.call.tflops(flops)
        print(f"    {rate:.0f} TFLOP/s = {rate / FLASHMLA_TFLOPS:.2f} x FlashMLA's published "
              f"{FLASHMLA_TFLOPS:.0f} TFLOP/s (H800, s_q 2, k 2048)")
        for v in versions:
            timing = bench.benchmark(lambda q, kv_cache, indices, v=v:
                                     sparse_mla_decode_fp8_cuda(q, kv_cache, indices, SCALE, kernel=v),
                                     inputs, warmup=2, reps=10 if v == 1 else 30)
            print(results.add(case, "kernel", timing, version=v, baseline=baseline, **rates))
            print(f"    {timing.tflops(flops) / FLASHMLA_TFLOPS:.2f} x FlashMLA's published "
                  f"{FLASHMLA_TFLOPS:.0f} TFLOP/s")
    if every:
        print("wrote", results.write())
    else:  # the stored results keep every version of one run
        print(f"not written: only kernels {versions} were timed")

if __name__ == "__main__":
    main()
