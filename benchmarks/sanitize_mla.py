"""Launch every kernel of cuda/apply_rope.cu, cuda/kv_compress.cu and cuda/latent_scores.cu (every
version of their tables) at small ragged sizes and check the results: the target for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_mla.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_mla.py
    compute-sanitizer --tool initcheck python benchmarks/sanitize_mla.py

Sizes are ragged on purpose (T, H, S, rows not multiples of any tile; the latent width 48 leaves the
last 32-dim step of the tiled kernels half full, and the single 64-dim stage of the pipelined kernel
half empty). Every version of apply_rope and kv_compress runs (kernel 2 of kv_compress at V3.2's
dims); latent_scores kernel 4 runs with more 128 x 128 tiles than SMs, so that a block's range of
tiles crosses batch entries and reloads its query tile (the path racecheck must see). Every apply_rope
and kv_compress kernel is also launched with wild positions (far outside the rotary table, negative,
+-2^62) with the package's data checks OFF, as by default: the call reads nothing back, and the
kernel must write NaN for those tokens and read nothing out of bounds.
Prints one line per kernel and "all MLA kernels OK" at the end; exits non-zero on a mismatch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import checks, compare, mla, rope  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402
from dsa_tutorial.norm import rms_norm  # noqa: E402

U32 = 2.0**-24


def wild_positions(args: ModelArgs, n_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """Positions in the table, except a few far outside it; returns them and the rows that are wild."""
    positions = torch.randint(0, args.max_seq_len, (n_tokens,), device="cuda")
    wild = {3: args.max_seq_len, 5: -1, 11: 2**62, 20: -(2**62), n_tokens - 1: args.max_seq_len + 7}
    for row, value in wild.items():
        positions[row] = value
    return positions, sorted(wild)


def check_rope(args: ModelArgs) -> None:
    table = rope.APPLY_ROPE_KERNELS
    for kernel in table.versions:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in rope.LAYOUTS:
                chunk = 4 if dtype == torch.float32 else 8
                if kernel == 2 and (args.qk_rope_head_dim // (1 if layout == "interleaved" else 2)) % chunk:
                    continue  # d_R (or d_R/2) not a multiple of the 16-byte chunk
                x = torch.randn(37, 3, args.qk_rope_head_dim, device="cuda").to(dtype)
                positions = torch.randint(0, args.max_seq_len, (37,), device="cuda")
                out = rope.apply_rope_cuda(x, positions, layout, args, out=compare.poisoned(x.shape, dtype, "cuda"),
                                           kernel=kernel)
                want = rope.apply_rope(x.double(), positions, layout, args)
                tol = (10 * U32 if dtype == torch.float32 else 2**-8) * x.double().abs().max().item()
                compare.assert_close(out, want, atol=tol, name=f"apply_rope kernel {kernel} {layout} {dtype}")
                # wild positions, data checks off: NaN rows, no out-of-bounds read
                bad, rows = wild_positions(args, 37)
                with checks.data_checks(False):
                    out = rope.apply_rope_cuda(x, bad, layout, args, kernel=kernel)
                good = [r for r in range(37) if r not in rows]
                assert out[rows].isnan().all() and not out[good].isnan().any()
                name = table.entry(kernel, layout=layout, dtype="f32" if dtype == torch.float32 else "bf16")
                print(f"{name} (d_R {args.qk_rope_head_dim}): OK, wild positions too")


def check_compress(args: ModelArgs, kernel: int) -> None:
    n_tokens = 29
    for dtype in (torch.float32, torch.bfloat16):
        for with_rope in (False, True):
            kv = (torch.randn(n_tokens, args.latent_dim, device="cuda") * 3).to(dtype)
            weight = torch.rand(args.kv_lora_rank, device="cuda") + 0.5
            positions = torch.randint(0, args.max_seq_len, (n_tokens,), device="cuda") if with_rope else None
            out = mla.kv_compress_cuda(kv, weight, args, positions, out=compare.poisoned(kv.shape, dtype, "cuda"),
                                       kernel=kernel)
            kv64 = kv.double()
            k_rope = kv64[:, args.kv_lora_rank:]
            if with_rope:
                k_rope = rope.apply_rope(k_rope, positions, "interleaved", args)
            want = torch.cat([rms_norm(kv64[:, : args.kv_lora_rank], weight.double(), args.norm_eps), k_rope], -1)
            amax = want.abs().max().item()
            atol = (8 * U32 if dtype == torch.float32 else 2**-8) * amax
            compare.assert_close(out, want, atol=atol, rtol=300 * U32, name=f"compress rope={with_rope} {dtype}")
            if with_rope:  # wild positions, data checks off
                bad, rows = wild_positions(args, n_tokens)
                with checks.data_checks(False):
                    out = mla.kv_compress_cuda(kv, weight, args, bad, kernel=kernel)
                good = [r for r in range(n_tokens) if r not in rows]
                assert out[rows, args.kv_lora_rank:].isnan().all() and not out[good].isnan().any()
                assert not out[:, : args.kv_lora_rank].isnan().any()
            name = mla.KV_COMPRESS_KERNELS.entry(kernel, rope="_rope" if with_rope else "",
                                                 dtype="f32" if dtype == torch.float32 else "bf16")
            print(f"{name} (d_c {args.kv_lora_rank}): OK{', wild positions too' if with_rope else ''}")


def check_latent_scores() -> None:
    small = ModelArgs.tiny(kv_lora_rank=32, qk_rope_head_dim=16)
    cases = [(1, ModelArgs.tiny(), 2, 3, 77), (2, ModelArgs.tiny(), 2, 17, 77),
             (2, small, 3, 23, 130), (3, small, 3, 23, 130), (3, ModelArgs(), 2, 1, 67),
             (4, small, 3, 23, 131),   # 92 rows, 2 key tiles (the second 3 keys), odd S
             (4, small, 45, 1, 700),   # 270 tiles, 2 or 3 per SM: ranges cross batch entries
             (4, ModelArgs(), 2, 2, 129)]  # V3.2 dims, 256 rows = 2 row blocks
    assert {case[0] for case in cases} == set(mla.LATENT_SCORES_KERNELS.versions)
    for kernel, args, batch, n_q, n_keys in cases:
        dtype = torch.bfloat16 if "bf16" in mla.LATENT_SCORES_KERNELS[kernel].entry else torch.float32
        q_abs = torch.randn(batch, n_q, args.n_heads, args.kv_lora_rank, device="cuda").to(dtype)
        q_rope = torch.randn(batch, n_q, args.n_heads, args.qk_rope_head_dim, device="cuda").to(dtype)
        latent = torch.randn(batch, n_keys, args.latent_dim, device="cuda").to(dtype)
        out = compare.poisoned((batch, n_q, args.n_heads, n_keys), torch.float32, "cuda")
        got = mla.latent_scores_cuda(q_abs, q_rope, latent, args, out=out, kernel=kernel)
        d_c = args.kv_lora_rank
        l64 = latent.double()
        want = mla.latent_scores(q_abs.double(), q_rope.double(), l64[..., :d_c], l64[..., d_c:], args)
        q = torch.cat([q_abs, q_rope], -1).double().abs()
        dot_bound = (torch.einsum("bthd,bsd->bths", q, l64.abs()) * args.softmax_scale).max().item()
        n = args.latent_dim + 1
        atol = 2 * n * U32 / (1 - n * U32) * dot_bound
        compare.assert_close(got, want, atol=atol, name=f"latent_scores kernel {kernel}")
        print(f"{mla.LATENT_SCORES_KERNELS.entry(kernel)} (d_c {d_c}, d_R {args.qk_rope_head_dim}, B {batch}, "
              f"rows {n_q * args.n_heads}, S {n_keys}): OK")


def main() -> None:
    torch.manual_seed(0)
    check_rope(ModelArgs.tiny())
    check_rope(ModelArgs())
    for kernel in mla.KV_COMPRESS_KERNELS.versions:
        if kernel == 1:
            check_compress(ModelArgs.tiny(), kernel)
        check_compress(ModelArgs(), kernel)  # kernel 2 is compiled for V3.2's dims
    check_latent_scores()
    torch.cuda.synchronize()
    print("all MLA kernels OK")


if __name__ == "__main__":
    main()
