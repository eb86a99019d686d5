"""Benchmark the sparse MLA prefill kernels (cuda/sparse_mla_prefill.cu) against torch on an H200.

    python benchmarks/sparse_prefill.py     (from the repository root, on a GPU; a minute or two)

Prefill of the last T = 4096 tokens of an S = 32768-token prompt, DeepSeek-V3.2's shapes: k = 2048
selected latents a token (random, distinct, causal: token t picks from [0, S - T + t]), the bf16
latent cache kv [S, 1, 576], h = 128 heads and h = 64 (FlashMLA's two sizes). Timed:
* the public call `sparse_mla_prefill_cuda(q, kv, indices, softmax_scale)` with its default
  arguments (kernel=None; data checks off, the default: the indices are not read back), with its one
  launch replayed alone beside it (bench.time_call);
* every version of SPARSE_MLA_PREFILL_KERNELS that runs here (kernel 2 needs compute capability 9.0),
  each first checked once against the float32 reference on a few tokens;
* a torch baseline: gather each token's 2048 latents, then bf16 GEMMs and a float32 softmax, in chunks of
  256 tokens (dsa_tutorial.baselines.sparse_attention_gathered_torch, one chunk as a batch).
FLOPs are 2 T h k (576 + 512) (Q K^T over 576 values, P V over 512), quoted against the bf16 GEMM
ceiling measured in the same run, and printed against FlashMLA's published 640 TFLOP/s for its sparse
prefill (H800 SXM5, CUDA 12.8; the H200 has the same SMs at a slightly higher clock). Bytes: q, the
selected latents read once per token, out and the two statistics, against the copy bandwidth.
Every line is also written to book/data/kernels/sparse_mla_prefill.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import baselines, bench, checks, compare  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402
from dsa_tutorial.sparse_prefill import (SPARSE_MLA_PREFILL_KERNELS, sparse_mla_prefill,  # noqa: E402
                                         sparse_mla_prefill_cuda, wgmma_why_not)

T, S, K = 4096, 32768, 2048
HEADS = (128, 64)
SCALE = ModelArgs().softmax_scale
FLASHMLA_TFLOPS = 640.0  # FlashMLA's README: sparse prefill forward, H800 SXM5
CHUNK = 256  # tokens per torch-baseline step (gathered latents: CHUNK x 2048 x 576 bf16 = 0.6 GB)


def make_indices() -> torch.Tensor:
    """indices int32 [T, 1, K]: token t takes K distinct random positions of [0, S - T + t] (all valid)."""
    visible = S - T + torch.arange(T, device="cuda")[:, None]  # the last position token t may see
    keys = torch.rand(T, S, device="cuda").masked_fill(torch.arange(S, device="cuda") > visible, -1.0)
    return keys.topk(K, dim=-1).indices.int()[:, None].contiguous()


def make_inputs(h: int):
    def make():
        q = torch.randn(T, h, 576, device="cuda").to(torch.bfloat16)
        kv = torch.randn(S, 1, 576, device="cuda").to(torch.bfloat16)
        return q, kv, make_indices()
    return make


def public_call(q, kv, indices):
    return sparse_mla_prefill_cuda(q, kv, indices, SCALE)


def gathered_torch(q, kv, indices):
    """The torch baseline: per chunk of tokens, gather the selected latents and attend in bf16 GEMMs."""
    out = torch.empty(q.shape[0], q.shape[1], 512, dtype=torch.bfloat16, device=q.device)
    for start in range(0, q.shape[0], CHUNK):
        rows = slice(start, start + CHUNK)
        n = q[rows].shape[0]
        cache = kv[:, 0].expand(n, S, 576)  # one cache for every token of the chunk (a view)
        out[rows] = baselines.sparse_attention_gathered_torch(q[rows], cache, indices[rows, 0], SCALE)
    return out


def available(version: int) -> bool:
    return version != 2 or wgmma_why_not(torch.device("cuda")) is None


def check_once(h: int) -> None:
    """Every version against the float32 reference on 8 tokens of the full-size problem (a sanity check)."""
    q, kv, indices = make_inputs(h)()
    q, indices = q[-8:].contiguous(), indices[-8:].contiguous()
    ref_out, ref_max, ref_lse = sparse_mla_prefill(q.float(), kv.float(), indices, SCALE)
    for v in SPARSE_MLA_PREFILL_KERNELS.versions:
        if not available(v):
            print(f"h={h} kernel {v}: skipped, {wgmma_why_not(torch.device('cuda'))}")
            continue
        out, max_logits, lse = sparse_mla_prefill_cuda(q, kv, indices, SCALE, kernel=v)
        result = compare.assert_close(out.float(), ref_out, atol=1e-2 * ref_out.abs().max().item(), rtol=1e-2,
                                      max_calc_diff=1e-5, name=f"kernel {v} out")
        compare.assert_close(max_logits, ref_max, atol=1e-4, rtol=1e-5, name=f"kernel {v} max_logits")
        compare.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5, name=f"kernel {v} lse")
        print(f"h={h} kernel {v} vs float32 reference: {result} {result.measured()}")


def main() -> None:
    torch.manual_seed(0)
    checks.set_data_checks(False)  # what a user gets by default, whatever DSA_CHECK says: no indices read back
    for h in HEADS:
        check_once(h)
    ceilings = bench.measure_ceilings()
    print(ceilings)
    results = bench.Results("sparse_mla_prefill", ceilings)
    for h in HEADS:
        flops = 2 * T * h * K * (576 + 512)
        rates = dict(flops=flops, ceiling="bf16",
                     nbytes=T * h * 576 * 2 + T * K * 576 * 2 + T * h * 512 * 2 + 2 * T * h * 4)
        case = f"T={T} h={h} k={K} S={S}"
        baseline = bench.benchmark(gathered_torch, make_inputs(h), warmup=1, reps=5)
        print(results.add(case, "baseline", baseline, label="torch gathered, bf16 GEMMs", **rates))
        timed = bench.time_call(public_call, make_inputs(h), warmup=2, reps=20)
        print(results.add(case, "default", timed, baseline=baseline, **rates))
        print(f"    {timed.call.tflops(flops) / FLASHMLA_TFLOPS:.0%} of FlashMLA's published {FLASHMLA_TFLOPS:.0f} "
              f"TFLOP/s (H800)")
        for v in SPARSE_MLA_PREFILL_KERNELS.versions:
            if not available(v):
                continue
            timing = bench.benchmark(lambda q, kv, indices, v=v: sparse_mla_prefill_cuda(q, kv, indices, SCALE,
                                                                                         kernel=v),
                                     make_inputs(h), warmup=2, reps=20)
            print(results.add(case, "kernel", timing, version=v, baseline=baseline, **rates))
            print(f"    {timing.tflops(flops) / FLASHMLA_TFLOPS:.0%} of FlashMLA's published "
                  f"{FLASHMLA_TFLOPS:.0f} TFLOP/s (H800)")
    print("wrote", results.write())


if __name__ == "__main__":
    main()
