"""Benchmark the MLA kernels of chapters 1-3 against their torch baselines at V3.2 sizes.

    python benchmarks/mla.py            (from the repository root, on a GPU; about a minute)

Cases (one `bench.report` line each; bytes are what the kernel must move at least):
* compress: the wkv_a output of T = 131072 tokens [T, 576] -> latent cache entries [T, 576]
  (kv_norm on c^KV, k^R copied or rotated; a prefill of 128K tokens, 600 MB moved in float32: large
  enough to fill the chip). Memory-bound: bytes = read + write of T x 576 values. Kernels 1
  ("scalar") and 2 ("vector", the default at V3.2's dims).
* rope: q^R of T = 16384 tokens x 128 heads x 64 dims, both layouts, kernels 1 ("pairs") and 2
  ("vector", the default). Bytes = read + write.
* decode scores: B = 64 sequences, S = 8192 cached tokens, n_h = 128 heads, one new token:
  the cache [B, S, 576] is read once, scores [B, 128, S] float32 written. FLOPs 2 B n_h S 576.
  With 128 heads sharing each cache row this is 2 * 128 * 576 / (576 * 2 + 128 * 4) = 89 FLOP per
  byte in bf16: near the H200's bf16 ridge (~190 FLOP/B at 790 TFLOP/s / 4.2 TB/s), so both ceilings
  are printed; in float32 on CUDA cores (~60 TFLOP/s) it is compute-bound. Kernels: tiled (float32)
  against torch's float32 einsums; mma and pipelined (bf16) against one cuBLAS bf16 batched GEMM.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import bench, mla, rope  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402

ARGS = ModelArgs()


def torch_compress(kv: torch.Tensor, weight: torch.Tensor, positions=None, freqs_cis=None) -> torch.Tensor:
    """The official code's eager torch path: split, RMSNorm in float32, optional interleaved RoPE, concat."""
    d_c = ARGS.kv_lora_rank
    c, k_pe = kv[:, :d_c].float(), kv[:, d_c:]
    c_kv = (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + ARGS.norm_eps) * weight).to(kv.dtype)
    if positions is not None:
        k = torch.view_as_complex(k_pe.float().reshape(-1, k_pe.shape[-1] // 2, 2)) * freqs_cis[positions]
        k_pe = torch.view_as_real(k).flatten(-2).to(kv.dtype)
    return torch.cat([c_kv, k_pe], dim=-1)


def torch_rope(x: torch.Tensor, positions: torch.Tensor, freqs_cis: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The official `apply_rotary_emb` (x [T, H, d]), both layouts."""
    shape = x.shape
    if not interleaved:
        x = x.view(*shape[:-1], 2, -1).transpose(-1, -2).contiguous()
    z = torch.view_as_complex(x.float().reshape(*shape[:-1], -1, 2))
    y = torch.view_as_real(z * freqs_cis[positions][:, None, :]).flatten(-2)
    if not interleaved:
        y = torch.cat([y[..., 0::2], y[..., 1::2]], dim=-1)
    return y.to(x.dtype)


def torch_scores(q_abs, q_rope, latent):
    """The official MQA decode scores: two einsums over the cache (float32: no TF32)."""
    d_c = ARGS.kv_lora_rank
    return (torch.einsum("bthc,bsc->bths", q_abs, latent[..., :d_c])
            + torch.einsum("bthr,bsr->bths", q_rope, latent[..., d_c:])) * ARGS.softmax_scale


def torch_scores_bf16(q_abs, q_rope, latent):
    """One bf16 batched GEMM over the 576-dim latent (cuBLAS tensor cores), scores returned in float32."""
    q = torch.cat([q_abs, q_rope], dim=-1).flatten(1, 2)  # [B, T n_h, 576]
    return (torch.matmul(q, latent.transpose(1, 2)).float() * ARGS.softmax_scale).view(
        q_abs.shape[0], q_abs.shape[1], q_abs.shape[2], -1)


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda"
    ceilings = bench.measure_ceilings()
    print(ceilings)
    cos_sin = rope.cos_sin_table(ARGS, dev)  # built once, outside the timings
    freqs_cis = rope.precompute_freqs_cis(ARGS).to(torch.complex64).to(dev)
    del cos_sin

    # ---------------------------------------------------------------- compress, T = 131072
    n_tokens, width = 131072, ARGS.latent_dim
    weight = torch.rand(ARGS.kv_lora_rank, device=dev) + 0.5
    for dtype in (torch.float32, torch.bfloat16):
        nbytes = 2 * n_tokens * width * torch.finfo(dtype).bits // 8
        for with_rope in (False, True):
            def make(dtype=dtype, with_rope=with_rope):
                kv = torch.randn(n_tokens, width, device=dev).to(dtype)
                positions = torch.randint(0, ARGS.max_seq_len, (n_tokens,), device=dev) if with_rope else None
                return kv, positions
            base = bench.benchmark(lambda kv, p: torch_compress(kv, weight, p, freqs_cis), make)
            tag = f"compress{'+rope' if with_rope else ''} {str(dtype)[6:]:8s} T={n_tokens}"
            print(bench.report(f"{tag} torch       ", base, nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps))
            for kernel in ("scalar", "vector"):
                ours = bench.benchmark(lambda kv, p, kernel=kernel: mla.kv_compress_cuda(
                    kv, weight, ARGS, positions=p, check_positions=False, kernel=kernel), make)
                print(bench.report(f"{tag} cuda {kernel:6s}", ours, nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps,
                                   baseline=base))

    # ---------------------------------------------------------------- rope on q^R, 16384 x 128 x 64
    n_tokens, n_heads = 16384, ARGS.n_heads
    for dtype in (torch.float32, torch.bfloat16):
        nbytes = 2 * n_tokens * n_heads * ARGS.qk_rope_head_dim * torch.finfo(dtype).bits // 8
        for layout in rope.LAYOUTS:
            def make(dtype=dtype):
                return (torch.randn(n_tokens, n_heads, ARGS.qk_rope_head_dim, device=dev).to(dtype),
                        torch.randint(0, ARGS.max_seq_len, (n_tokens,), device=dev))
            base = bench.benchmark(lambda x, p: torch_rope(x, p, freqs_cis, layout == "interleaved"), make)
            tag = f"rope {layout:11s} {str(dtype)[6:]:8s} T={n_tokens} H={n_heads}"
            print(bench.report(f"{tag} torch       ", base, nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps))
            for kernel in ("pairs", "vector"):
                # without the position range check (a device-to-host sync), as a model that knows its positions
                ours = bench.benchmark(lambda x, p, kernel=kernel: rope.rope_cuda(
                    x, p, layout, ARGS, check_positions=False, kernel=kernel), make)
                print(bench.report(f"{tag} cuda {kernel:6s}", ours, nbytes=nbytes, ceiling_tbps=ceilings.copy_tbps,
                                   baseline=base))

    # ---------------------------------------------------------------- decode scores, B 64, S 8192, n_h 128
    batch, n_keys, n_q = 64, 8192, 1
    flops = 2 * batch * n_q * n_heads * n_keys * width
    for kernel, dtype in (("tiled", torch.float32), ("mma", torch.bfloat16), ("pipelined", torch.bfloat16)):
        size = torch.finfo(dtype).bits // 8
        nbytes = batch * n_keys * width * size + batch * n_q * n_heads * n_keys * 4 + batch * n_q * n_heads * width * size

        def make(dtype=dtype):
            return (torch.randn(batch, n_q, n_heads, ARGS.kv_lora_rank, device=dev).to(dtype),
                    torch.randn(batch, n_q, n_heads, ARGS.qk_rope_head_dim, device=dev).to(dtype),
                    torch.randn(batch, n_keys, width, device=dev).to(dtype))
        base_fn = torch_scores if dtype == torch.float32 else torch_scores_bf16
        base = bench.benchmark(base_fn, make, warmup=3, reps=20)
        ours = bench.benchmark(lambda q, r, c, kernel=kernel: mla.decode_scores_cuda(q, r, c, ARGS, kernel=kernel),
                               make, warmup=3, reps=20)
        ceiling = ceilings.bf16_tflops if dtype == torch.bfloat16 else None
        tag = f"decode scores {kernel:9s} {str(dtype)[6:]:8s} B={batch} S={n_keys} n_h={n_heads}"
        print(bench.report(f"{tag} torch", base, flops=flops, nbytes=nbytes, ceiling_tflops=ceiling,
                           ceiling_tbps=ceilings.copy_tbps))
        print(bench.report(f"{tag} cuda ", ours, flops=flops, nbytes=nbytes, ceiling_tflops=ceiling,
                           ceiling_tbps=ceilings.copy_tbps, baseline=base))
    # the naive kernel, for the progression, at a smaller batch (it is slow)
    small = 8
    make_small = lambda: (torch.randn(small, 1, n_heads, ARGS.kv_lora_rank, device=dev),  # noqa: E731
                          torch.randn(small, 1, n_heads, ARGS.qk_rope_head_dim, device=dev),
                          torch.randn(small, n_keys, width, device=dev))
    for kernel in ("naive", "tiled"):
        t = bench.benchmark(lambda q, r, c, kernel=kernel: mla.decode_scores_cuda(q, r, c, ARGS, kernel=kernel),
                            make_small, warmup=2, reps=10)
        print(bench.report(f"decode scores {kernel:9s} float32  B={small} S={n_keys} n_h={n_heads} cuda ", t,
                           flops=2 * small * n_heads * n_keys * width))


if __name__ == "__main__":
    main()
