"""Benchmarks of chapter 7 on the GPU: act_quant, fp8_mqa_logits and fp8_paged_mqa_logits.

    python benchmarks/fp8_logits.py

Ceilings are measured first, in the same process; every kernel is quoted against them and against
a plain torch baseline. The launch alone is timed (inputs are checked once, outside the timed
region, as a serving loop would). Every kernel of each .cu file is timed, in the order of its
progression (the naive mqa kernel at fewer repetitions: it takes tens of milliseconds; the wgmma
kernels, kernel 4 of each file, only where they run: compute capability 9.0). Targets of
issue 5: mqa_logits >= 40% of the FP8 GEMM ceiling, paged >= 60% of copy bandwidth (DeepGEMM: about
67% and 90%, SPEC section 9).
"""
from __future__ import annotations

import torch

from dsa_tutorial import bench, fp8, kernels, paged


def torch_mqa_logits_bf16(q, k, w, ks, ke, chunk=1024):
    """The torch baseline of SPEC section 9: bf16 einsum, ReLU, weighted head sum, 1024-query chunks."""
    S_q, S_k = q.shape[0], k.shape[0]
    out = torch.empty(S_q, S_k, dtype=torch.float32, device=q.device)
    j = torch.arange(S_k, device=q.device)
    for start in range(0, S_q, chunk):
        rows = slice(start, start + chunk)
        scores = torch.einsum("ihd,jd->ihj", q[rows], k).relu_()  # [chunk, H, S_k] bf16
        logits = torch.einsum("ih,ihj->ij", w[rows].to(scores.dtype), scores).float()
        visible = (j >= ks[rows, None]) & (j < ke[rows, None])
        out[rows] = logits.masked_fill_(~visible, float("-inf"))
    return out


def bench_act_quant(ceilings):
    n_tokens, dim = 64 * 8192, 128  # the q of 8192 tokens x 64 heads
    make = lambda: (torch.randn(n_tokens, dim, device="cuda").bfloat16(),)  # noqa: E731
    nbytes = n_tokens * dim * (2 + 1) + n_tokens * 4  # bf16 read, e4m3 + scales written
    baseline = bench.benchmark(lambda x: fp8.act_quant_reference(x), make)
    print(bench.report("act_quant torch (reference on GPU)", baseline, nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps))
    for variant, label in (("blockwise", "kernel 1, a warp a block"), ("b128", "kernel 2, block_size 128")):
        kernel = bench.benchmark(lambda x, v=variant: fp8.act_quant_cuda(x, kernel=v), make)
        print(bench.report(f"act_quant cuda ({label})", kernel, nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps,
                           baseline=baseline))


def bench_mqa_logits(ceilings, S=8192, H=64, D=128):
    ks, ke = fp8.causal_ks_ke([S], device="cuda")
    flops = 2.0 * H * D * float((ke - ks).sum())  # causal work only

    def make():
        q, _ = fp8.act_quant(torch.randn(S, H, D, device="cuda").bfloat16())
        k, k_scale = fp8.act_quant(torch.randn(S, D, device="cuda").bfloat16())
        w = torch.randn(S, H, device="cuda")
        out = torch.empty(S, S, device="cuda")
        return q, k, k_scale.squeeze(-1), w, ks, ke, out

    inputs = make()
    fp8.check_mqa_logits_inputs(inputs[0], (inputs[1], inputs[2]), inputs[3], ks, ke, cuda=True)

    def make_bf16():
        return (torch.randn(S, H, D, device="cuda").bfloat16(), torch.randn(S, D, device="cuda").bfloat16(),
                torch.randn(S, H, device="cuda"), ks, ke)

    baseline = bench.benchmark(torch_mqa_logits_bf16, make_bf16, warmup=1, reps=3)
    name = f"mqa_logits S_q=S_k={S} H={H} D={D} causal"
    print(bench.report(f"{name}, torch bf16", baseline, flops=flops, ceiling_tflops=ceilings.fp8_tflops))
    labels = {"naive": "cuda naive (kernel 1)", "tensor_core": "cuda mma.sync e4m3 (kernel 2)",
              "tensor_core_f16": "cuda e4m3->f16 mma.sync (kernel 3)", "wgmma": "cuda wgmma e4m3 (kernel 4)"}
    for variant in fp8.MQA_KERNELS:
        if variant == "wgmma" and not kernels.wgmma_available():
            print(f"{name}, {labels[variant]}: skipped, needs compute capability 9.0 (sm_90a)")
            continue
        slow = variant == "naive"
        kernel = bench.benchmark(
            lambda q, k, s, w, ks_, ke_, out, v=variant: fp8._launch_mqa_logits(q, (k, s), w, ks_, ke_, out, True, v),
            make, warmup=1 if slow else 5, reps=3 if slow else 20)
        print(bench.report(f"{name}, {labels[variant]}", kernel, flops=flops, ceiling_tflops=ceilings.fp8_tflops,
                           baseline=baseline))


def torch_paged_logits_bf16(q, kv_cache, w, context_lens, block_table, max_context_len, chunk=16):
    """Baseline: gather each batch's blocks with torch, dequantise to bf16, einsum; equal context lengths."""
    B, next_n, H, D = q.shape
    n_blocks = (int(context_lens.max()) + 63) // 64
    flat = kv_cache.view(kv_cache.shape[0], -1)
    out = torch.empty(B * next_n, max_context_len, device=q.device)
    for start in range(0, B, chunk):
        blocks = flat[block_table[start:start + chunk, :n_blocks].long()]  # [c, n_blocks, 8448]
        values = blocks[..., : 64 * D].reshape(blocks.shape[0], -1, D).view(torch.float8_e4m3fn)
        scales = blocks[..., 64 * D:].contiguous().view(torch.float32).reshape(blocks.shape[0], -1)
        k = (values.to(torch.bfloat16) * scales.unsqueeze(-1).to(torch.bfloat16))  # [c, L, D]
        scores = torch.einsum("bjhd,bld->bjhl", q[start:start + chunk].to(torch.bfloat16), k).relu_()
        rows = slice(start * next_n, (start + scores.shape[0]) * next_n)
        logits = torch.einsum("bjh,bjhl->bjl", w[rows].view(-1, next_n, H).to(torch.bfloat16), scores)
        out[rows, : logits.shape[-1]] = logits.reshape(-1, logits.shape[-1]).float()
    return out


def bench_paged(ceilings, next_n, B=128, context=32768, H=64, D=128):
    n_blocks = context // 64
    context_lens = torch.full((B,), context, dtype=torch.int32, device="cuda")
    meta = paged.paged_mqa_logits_metadata(context_lens, 64, paged.schedule_size())
    nbytes = B * context * (D + 4) + B * next_n * context * 4 + B * next_n * H * (D + 4)
    flops = 2.0 * B * next_n * context * H * D

    def make():
        kv_cache = paged.new_kv_cache(B * n_blocks, D, device="cuda")
        flat = kv_cache.view(B * n_blocks, -1)  # a block: 64 D value bytes, then 64 float32 scales
        for start in range(0, B * n_blocks, 4096):  # random e4m3 values, scales 2^-4, in slices
            rows = slice(start, start + 4096)
            values = torch.randn(flat[rows].shape[0], 64 * D, device="cuda").to(torch.float8_e4m3fn)
            flat[rows, : 64 * D] = values.view(torch.uint8)
            flat[rows, 64 * D:] = torch.full((values.shape[0], 64), 2.0 ** -4, device="cuda").view(torch.uint8)
        block_table = torch.randperm(B * n_blocks, device="cuda").int().view(B, n_blocks)
        q, _ = fp8.act_quant(torch.randn(B, next_n, H, D, device="cuda").bfloat16())
        w = torch.randn(B * next_n, H, device="cuda")
        out = torch.empty(B * next_n, context, device="cuda")
        return q, kv_cache, w, context_lens, block_table, meta, out

    inputs = make()
    paged.check_paged_inputs(*inputs[:6], context, cuda=True)
    baseline = bench.benchmark(lambda q, c, w, cl, bt, m, out: torch_paged_logits_bf16(q, c, w, cl, bt, context),
                               make, warmup=1, reps=3)
    name = f"paged_mqa_logits B={B} context={context} next_n={next_n}"
    print(bench.report(f"{name}, torch bf16", baseline, nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps))
    labels = {"tensor_core": "cuda mma.sync e4m3 (kernel 1)", "tensor_core_f16": "cuda e4m3->f16 mma.sync (kernel 2)",
              "tensor_core_f16_v3": "cuda e4m3->f16, warp pipelines (kernel 3)",
              "wgmma": "cuda wgmma e4m3, warpgroup pipelines (kernel 4)"}
    for variant in paged.PAGED_KERNELS:
        if variant == "wgmma" and not kernels.wgmma_available():
            print(f"{name}, {labels[variant]}: skipped, needs compute capability 9.0 (sm_90a)")
            continue
        kernel = bench.benchmark(
            lambda q, c, w, cl, bt, m, out, v=variant: paged._launch_paged(q, c, w, cl, bt, m, context, True, out, v),
            make, warmup=3, reps=20)
        print(bench.report(f"{name}, {labels[variant]}", kernel, nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps,
                           baseline=baseline, flops=flops, ceiling_tflops=ceilings.fp8_tflops))


def main() -> None:
    ceilings = bench.measure_ceilings()
    print(ceilings)
    bench_act_quant(ceilings)
    bench_mqa_logits(ceilings)
    for next_n in (1, 2):
        bench_paged(ceilings, next_n)


if __name__ == "__main__":
    main()
