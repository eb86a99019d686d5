"""Launch every kernel of cuda/rope.cu, cuda/mla_compress.cu and cuda/mla_decode_scores.cu once or
twice at small ragged sizes and check the results: the target for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_mla.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_mla.py
    compute-sanitizer --tool initcheck python benchmarks/sanitize_mla.py

Sizes are ragged on purpose (T, H, S, rows not multiples of any tile; the latent width 48 leaves the
last 32-dim step of the tiled kernels half full, and the single 64-dim stage of the pipelined kernel
half empty). Both versions of rope and compress run (the vector ones at V3.2's dims); the pipelined
decode kernel runs with more 128 x 128 tiles than SMs, so that a block's range of tiles crosses batch
entries and reloads its query tile (the path racecheck must see). One launch per rope / compress kernel
also passes positions outside the rotary table with the range check off, which must write NaN and read
nothing out of bounds.
Prints one line per kernel and "all MLA kernels OK" at the end; exits non-zero on a mismatch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import compare, mla, rope  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402
from dsa_tutorial.norm import rms_norm  # noqa: E402

U32 = 2.0**-24


def check_rope(args: ModelArgs) -> None:
    for kernel in ("pairs", "vector"):
        for dtype in (torch.float32, torch.bfloat16):
            for layout in rope.LAYOUTS:
                chunk = 4 if dtype == torch.float32 else 8
                if kernel == "vector" and (args.qk_rope_head_dim // (1 if layout == "interleaved" else 2)) % chunk:
                    continue  # d_R (or d_R/2) not a multiple of the 16-byte chunk
                x = torch.randn(37, 3, args.qk_rope_head_dim, device="cuda").to(dtype)
                positions = torch.randint(0, args.max_seq_len, (37,), device="cuda")
                out = rope.rope_cuda(x, positions, layout, args, out=compare.poisoned(x.shape, dtype, "cuda"),
                                     kernel=kernel)
                want = rope.apply_rope(x.double(), positions, layout, args)
                tol = (10 * U32 if dtype == torch.float32 else 2**-8) * x.double().abs().max().item()
                compare.assert_close(out, want, atol=tol, name=f"rope {kernel} {layout} {dtype}")
                # out-of-table positions with the check off: NaN rows, no out-of-bounds read
                bad = positions.clone()
                bad[3], bad[20] = args.max_seq_len, -1
                out = rope.rope_cuda(x, bad, layout, args, check_positions=False, kernel=kernel)
                assert out[[3, 20]].isnan().all() and not out[[0, 1, 2, 4, 36]].isnan().any()
                name = f"rope_{layout}{'_vec' if kernel == 'vector' else ''}_{'f32' if dtype == torch.float32 else 'bf16'}"
                print(f"{name} (d_R {args.qk_rope_head_dim}): OK")


def check_compress(args: ModelArgs, kernel: str) -> None:
    n_tokens = 29
    for dtype in (torch.float32, torch.bfloat16):
        for with_rope in (False, True):
            kv = (torch.randn(n_tokens, args.latent_dim, device="cuda") * 3).to(dtype)
            weight = torch.rand(args.kv_lora_rank, device="cuda") + 0.5
            positions = torch.randint(0, args.max_seq_len, (n_tokens,), device="cuda") if with_rope else None
            out = mla.kv_compress_cuda(kv, weight, args, positions=positions,
                                       out=compare.poisoned(kv.shape, dtype, "cuda"), kernel=kernel)
            kv64 = kv.double()
            k_rope = kv64[:, args.kv_lora_rank:]
            if with_rope:
                k_rope = rope.apply_rope(k_rope, positions, "interleaved", args)
            want = torch.cat([rms_norm(kv64[:, : args.kv_lora_rank], weight.double(), args.norm_eps), k_rope], -1)
            amax = want.abs().max().item()
            atol = (8 * U32 if dtype == torch.float32 else 2**-8) * amax
            compare.assert_close(out, want, atol=atol, rtol=300 * U32, name=f"compress rope={with_rope} {dtype}")
            if with_rope:
                bad = positions.clone()
                bad[5] = args.max_seq_len + 7
                out = mla.kv_compress_cuda(kv, weight, args, positions=bad, check_positions=False, kernel=kernel)
                assert out[5, args.kv_lora_rank:].isnan().all() and not out[4].isnan().any()
            print(f"mla_compress{'_rope' if with_rope else ''}{'_vec' if kernel == 'vector' else ''}_"
                  f"{'f32' if dtype == torch.float32 else 'bf16'} (d_c {args.kv_lora_rank}): OK")


def check_decode_scores() -> None:
    small = ModelArgs.tiny(kv_lora_rank=32, qk_rope_head_dim=16)
    cases = [("naive", ModelArgs.tiny(), 2, 3, 77), ("tiled", ModelArgs.tiny(), 2, 17, 77),
             ("tiled", small, 3, 23, 130), ("mma", small, 3, 23, 130), ("mma", ModelArgs(), 2, 1, 67),
             ("pipelined", small, 3, 23, 131),   # 92 rows, 2 key tiles (the second 3 keys), odd S
             ("pipelined", small, 45, 1, 700),   # 270 tiles, 2 or 3 per SM: ranges cross batch entries
             ("pipelined", ModelArgs(), 2, 2, 129)]  # V3.2 dims, 256 rows = 2 row blocks
    for kernel, args, batch, n_q, n_keys in cases:
        dtype = torch.bfloat16 if kernel in ("mma", "pipelined") else torch.float32
        q_abs = torch.randn(batch, n_q, args.n_heads, args.kv_lora_rank, device="cuda").to(dtype)
        q_rope = torch.randn(batch, n_q, args.n_heads, args.qk_rope_head_dim, device="cuda").to(dtype)
        latent = torch.randn(batch, n_keys, args.latent_dim, device="cuda").to(dtype)
        out = compare.poisoned((batch, n_q, args.n_heads, n_keys), torch.float32, "cuda")
        got = mla.decode_scores_cuda(q_abs, q_rope, latent, args, kernel=kernel, out=out)
        d_c = args.kv_lora_rank
        l64 = latent.double()
        want = mla.latent_scores(q_abs.double(), q_rope.double(), l64[..., :d_c], l64[..., d_c:], args)
        q = torch.cat([q_abs, q_rope], -1).double().abs()
        dot_bound = (torch.einsum("bthd,bsd->bths", q, l64.abs()) * args.softmax_scale).max().item()
        n = args.latent_dim + 1
        atol = 2 * n * U32 / (1 - n * U32) * dot_bound
        compare.assert_close(got, want, atol=atol, name=f"decode scores {kernel}")
        print(f"decode_scores_{kernel} (d_c {d_c}, d_R {args.qk_rope_head_dim}, B {batch}, "
              f"rows {n_q * args.n_heads}, S {n_keys}): OK")


def main() -> None:
    torch.manual_seed(0)
    check_rope(ModelArgs.tiny())
    check_rope(ModelArgs())
    check_compress(ModelArgs.tiny(), "scalar")
    check_compress(ModelArgs(), "scalar")
    check_compress(ModelArgs(), "vector")
    check_decode_scores()
    torch.cuda.synchronize()
    print("all MLA kernels OK")


if __name__ == "__main__":
    main()
