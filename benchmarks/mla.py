"""Benchmark the kernels of chapters 0-3 (RMSNorm, MLA compression, RoPE, latent scores) at V3.2 sizes.

    python benchmarks/mla.py            (from the repository root, on a GPU; a few minutes)

Every line times the PUBLIC call as a user makes it (`bench.time_call`: default arguments, data
checks off as by default, the Python around the kernel included) and prints the launch alone beside
it; first with kernel=None (what a caller gets), then every version of the operation's kernel table
(kernel=v), then the torch baseline (dsa_tutorial.baselines). The ceilings (copy bandwidth, bf16
GEMM) are measured in the same run. Bytes are what the kernel must move at least. Every line is also
written to book/data/kernels/<operation>.json (bench.Results), which the chapters' figures read.

* rms_norm: 16384 rows of the 7168-wide hidden state, bf16 and float32 (chapter 0). Bytes = read
  + write of x.
* kv_compress: the wkv_a output of T = 131072 tokens [T, 576] -> latent cache entries [T, 576]
  (kv_norm on c^KV, k^R copied or rotated; a prefill of 128K tokens, 600 MB moved in float32: large
  enough to fill the chip). Memory-bound: bytes = read + write of T x 576 values.
* apply_rope: q^R of T = 16384 tokens x 128 heads x 64 dims, both layouts. Bytes = read + write.
* latent_scores: B = 64 sequences, S = 8192 cached tokens, n_h = 128 heads, one new token:
  the cache [B, S, 576] is read once, scores [B, 128, S] float32 written. FLOPs 2 B n_h S 576.
  With 128 heads sharing each cache row this is 2 * 128 * 576 / (576 * 2 + 128 * 4) = 89 FLOP per
  byte in bf16: near the H200's bf16 ridge (~190 FLOP/B at 790 TFLOP/s / 4.2 TB/s), so both ceilings
  are printed; in float32 on CUDA cores (~60 TFLOP/s) it is compute-bound. float32 (kernels 1, 2)
  against torch's float32 einsums; bf16 (kernels 3, 4) against one cuBLAS bf16 batched GEMM. Kernel
  1 (naive) also runs at B = 8, beside kernel 2 there: at B = 64 it takes tens of milliseconds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import baselines, bench, mla, norm, rope  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402

ARGS = ModelArgs()


def versions(results: bench.Results, table, case: str, call, make, skip=(), timer: dict | None = None,
             **rates) -> None:
    """kernel=None (the default a caller gets), then every version of `table` but those in `skip`
    (built for another dtype): the public call, with the launch alone beside it; printed and recorded."""
    timer = timer or {}
    print(results.add(case, "default", bench.time_call(call, make, **timer), **rates))
    for version in table.versions:
        if version not in skip:
            timed = bench.time_call(lambda *a, v=version: call(*a, kernel=v), make, **timer)
            print(results.add(case, "kernel", timed, version=version, **rates))


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda"
    ceilings = bench.measure_ceilings()
    print(ceilings)
    rope.cos_sin_table(ARGS, dev)  # built once, outside the timings
    freqs_cis = rope.precompute_freqs_cis(ARGS).to(torch.complex64).to(dev)

    # ---------------------------------------------------------------- rms_norm, 16384 x 7168
    rows, width = 16384, ARGS.dim
    results = bench.Results("rms_norm", ceilings)
    for dtype in (torch.bfloat16, torch.float32):
        nbytes = 2 * rows * width * torch.finfo(dtype).bits // 8

        def make(dtype=dtype):
            return (torch.randn(rows, width, device=dev).to(dtype),
                    (1 + 0.1 * torch.randn(width, device=dev)).to(dtype))
        base = bench.benchmark(lambda x, g: torch.nn.functional.rms_norm(x, (width,), g, 1e-6), make)
        case = f"{str(dtype)[6:]} {rows} x {width}"
        rates = dict(nbytes=nbytes, ceiling="copy")
        print(results.add(case, "baseline", base, label="torch rms_norm", **rates))
        versions(results, norm.RMS_NORM_KERNELS, case, lambda x, g, **k: norm.rms_norm_cuda(x, g, **k), make,
                 skip=(2,) if dtype == torch.float32 else (), baseline=base, **rates)
    print("wrote", results.write())

    # ---------------------------------------------------------------- kv_compress, T = 131072
    n_tokens, width = 131072, ARGS.latent_dim
    weight = torch.rand(ARGS.kv_lora_rank, device=dev) + 0.5
    results = bench.Results("kv_compress", ceilings)
    for dtype in (torch.float32, torch.bfloat16):
        nbytes = 2 * n_tokens * width * torch.finfo(dtype).bits // 8
        for with_rope in (False, True):
            def make(dtype=dtype, with_rope=with_rope):
                kv = torch.randn(n_tokens, width, device=dev).to(dtype)
                positions = torch.randint(0, ARGS.max_seq_len, (n_tokens,), device=dev) if with_rope else None
                return kv, positions
            base = bench.benchmark(lambda kv, p: baselines.kv_compress_torch(kv, weight, ARGS, p, freqs_cis), make)
            case = f"{'with RoPE' if with_rope else 'no RoPE'} {str(dtype)[6:]} T={n_tokens}"
            rates = dict(nbytes=nbytes, ceiling="copy")
            print(results.add(case, "baseline", base, label="torch (official eager path)", **rates))
            versions(results, mla.KV_COMPRESS_KERNELS, case,
                     lambda kv, p, **k: mla.kv_compress_cuda(kv, weight, ARGS, p, **k), make, baseline=base, **rates)
    print("wrote", results.write())

    # ---------------------------------------------------------------- apply_rope on q^R, 16384 x 128 x 64
    n_tokens, n_heads = 16384, ARGS.n_heads
    results = bench.Results("apply_rope", ceilings)
    for dtype in (torch.float32, torch.bfloat16):
        nbytes = 2 * n_tokens * n_heads * ARGS.qk_rope_head_dim * torch.finfo(dtype).bits // 8
        for layout in rope.LAYOUTS:
            def make(dtype=dtype):
                return (torch.randn(n_tokens, n_heads, ARGS.qk_rope_head_dim, device=dev).to(dtype),
                        torch.randint(0, ARGS.max_seq_len, (n_tokens,), device=dev))
            base = bench.benchmark(lambda x, p: baselines.apply_rope_torch(x, p, freqs_cis, layout == "interleaved"),
                                   make)
            case = f"{layout} {str(dtype)[6:]} T={n_tokens} H={n_heads}"
            rates = dict(nbytes=nbytes, ceiling="copy")
            print(results.add(case, "baseline", base, label="torch (official apply_rotary_emb)", **rates))
            versions(results, rope.APPLY_ROPE_KERNELS, case,
                     lambda x, p, layout=layout, **k: rope.apply_rope_cuda(x, p, layout, ARGS, **k),
                     make, baseline=base, **rates)
    print("wrote", results.write())

    # ---------------------------------------------------------------- latent_scores, B 64, S 8192, n_h 128
    table, width, n_keys, n_q = mla.LATENT_SCORES_KERNELS, ARGS.latent_dim, 8192, 1
    results = bench.Results("latent_scores", ceilings)
    for batch in (64, 8):
        flops = 2 * batch * n_q * n_heads * n_keys * width
        for dtype in (torch.float32, torch.bfloat16):
            size = torch.finfo(dtype).bits // 8
            nbytes = (batch * n_keys * width * size + batch * n_q * n_heads * n_keys * 4
                      + batch * n_q * n_heads * width * size)

            def make(dtype=dtype, batch=batch):
                return (torch.randn(batch, n_q, n_heads, ARGS.kv_lora_rank, device=dev).to(dtype),
                        torch.randn(batch, n_q, n_heads, ARGS.qk_rope_head_dim, device=dev).to(dtype),
                        torch.randn(batch, n_keys, width, device=dev).to(dtype))
            base = bench.benchmark(lambda q, r, c: baselines.latent_scores_torch(q, r, c, ARGS.softmax_scale), make,
                                   warmup=3, reps=20)
            # bf16: quoted against the bf16 GEMM ceiling; float32 (CUDA cores, no TF32): against the copy
            rates = dict(flops=flops, nbytes=nbytes, ceiling="bf16" if size == 2 else "copy")
            case = f"{str(dtype)[6:]} B={batch} S={n_keys} n_h={n_heads}"
            label = "torch einsums" if dtype == torch.float32 else "torch bf16 batched GEMM"
            print(results.add(case, "baseline", base, label=label, **rates))
            skip = {v for v in table.versions if (dtype == torch.bfloat16) != ("bf16" in table[v].entry)}
            if batch == 64:
                skip.add(1)  # the naive kernel runs at B = 8 only
            versions(results, table, case, lambda q, r, c, **k: mla.latent_scores_cuda(q, r, c, ARGS, **k), make,
                     skip=skip, timer=dict(warmup=3, reps=20), baseline=base, **rates)
    print("wrote", results.write())


if __name__ == "__main__":
    main()
