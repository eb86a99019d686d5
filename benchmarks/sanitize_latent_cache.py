"""Launch every kernel of cuda/sparse_mla_decode_fp8.cu at small ragged sizes, with wild and -1 indices, empty
rows, strided and unaligned caches and the data checks OFF (the default a user gets), and check the results:
the target for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_latent_cache.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_latent_cache.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_latent_cache.py --kernels 4   (some versions)

Every version of SPARSE_MLA_DECODE_FP8_KERNELS is launched (kernels 3 and 4, wgmma, where the GPU has it:
compute capability 9.0), or those given after --kernels, and kernels 2 to 4 both whole and split (then the
combine kernel runs too). Sizes are ragged
on purpose: k is not a multiple of the 64-slot tile, block_size is 64, 16, 7 or 1, s_q is 1, 2 or 3; the
caches are slices of bigger buffers (blocks farther apart than block_size * 656 bytes, the gaps filled with
NaN bytes), one of them 8 bytes past a 16-byte boundary (kernel 1 only: kernels 2 to 4 refuse it, which is
checked). Rows hold -1 slots, a row selects nothing, a row's first tiles (and for the split case whole splits)
are unused. With the data checks off nothing reads the indices back, so the kernels get them as they are:
indices outside [0, num_blocks * block_size) (the count itself, far past it, below -1, the int32 limits) must
be skipped like -1, never read. memcheck reports any access outside the tensors. Prints one line per launch
and "all FP8 latent cache kernels OK" at the end; exits non-zero on a mismatch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import checks, compare, fp8, kernels  # noqa: E402
from dsa_tutorial import latent_cache  # noqa: E402

TABLE, COMBINE_ENTRY = latent_cache.SPARSE_MLA_DECODE_FP8_KERNELS, latent_cache.COMBINE_ENTRY

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SCALE = 0.1
WGMMA_VERSIONS = (3, 4)  # compute capability 9.0 only (sm_90a)
SPLIT_VERSIONS = (2, 3, 4)  # split over several blocks when the batch leaves SMs idle, then combined


def strided_cache(num_blocks: int, block_size: int, extra_rows: int, shift: int = 0):
    """A quantised random cache inside a bigger NaN-filled buffer: blocks (block_size + extra_rows) * 656
    bytes apart, starting `shift` bytes past a 16-byte boundary."""
    kv = torch.randn(num_blocks, block_size, 1, 576, device="cuda")
    kv[..., :512] *= 2.0 ** torch.randint(-3, 4, (num_blocks, block_size, 1, 1), device="cuda")
    rows = block_size + extra_rows
    buffer = torch.full((num_blocks * rows * 656 + 16,), 0xFF, dtype=torch.uint8, device="cuda")
    cache = buffer[shift:shift + num_blocks * rows * 656].view(num_blocks, rows, 1, 656)[:, :block_size]
    cache = cache.view(torch.float8_e4m3fn)
    cache.copy_(latent_cache.quantize(kv.bfloat16()))
    return cache


def selection(B: int, s_q: int, k: int, n_tokens: int):
    """Distinct random indices [B, s_q, k] with -1 slots, an empty row, a row whose first slots are unused;
    and the same with those unused slots written as wild values."""
    rows = B * s_q
    indices = torch.stack([torch.randperm(n_tokens, device="cuda")[:k] for _ in range(rows)]).int()
    indices[0, -5:] = -1
    if rows > 1:
        indices[rows - 1] = -1  # nothing selected
    if rows > 2:
        indices[1, :min(k - 2, 200)] = -1  # the first tiles (with k = 700: the first split) unused
    wild = indices.clone()
    wild[0, -5:] = torch.tensor([n_tokens, n_tokens + 1000, -1000, INT32_MAX, INT32_MIN], dtype=torch.int32)
    wild[rows - 1, ::2] = n_tokens
    wild[rows - 1, 1::2] = INT32_MIN
    if rows > 2:
        wild[1, :min(k - 2, 200):3] = INT32_MAX
    return indices.view(B, s_q, k), wild.view(B, s_q, k)


def check_decode(wanted: list[int]) -> None:
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    no_wgmma = fp8.wgmma_why_not(torch.device("cuda"))
    if no_wgmma:
        print(f"kernels {WGMMA_VERSIONS} skipped: {no_wgmma}")
    versions = [v for v in wanted if not (v in WGMMA_VERSIONS and no_wgmma)]
    # (B, s_q, h, k, block_size, extra rows between blocks, bytes past a 16-byte boundary)
    for B, s_q, h, k, block_size, extra, shift in [(3, 1, 128, 700, 16, 3, 0), (3, 2, 64, 70, 1, 2, 0),
                                                   (2, 3, 64, 130, 7, 1, 0), (2, 1, 128, 64, 64, 1, 0),
                                                   (3, 1, 64, 45, 16, 2, 8)]:
        num_blocks = -(-max(2 * k, 200) // block_size)
        cache = strided_cache(num_blocks, block_size, extra, shift)
        q = torch.randn(B, s_q, h, 576, device="cuda").bfloat16()
        indices, wild = selection(B, s_q, k, num_blocks * block_size)
        ref_out, ref_lse = latent_cache.sparse_mla_decode_fp8(q, cache, indices, SCALE)
        scale = ref_out.abs().max().item()
        splits = latent_cache.decode_splits(B * s_q, h, k, n_sms)[0]
        for v in versions:
            if v in SPLIT_VERSIONS and shift % 16:  # refused (kernel 1 reads bytes: any alignment)
                try:
                    latent_cache.sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=v)
                except ValueError as refusal:
                    assert "16-byte boundary" in str(refusal), refusal
                    continue
                raise AssertionError(f"kernel {v} ran on a cache off a 16-byte boundary")
            # kernels 2 to 4 round p to bf16 before P V (see tests/test_latent_cache.py for the tolerances)
            out_tol = dict(atol=1e-4 * scale, rtol=2**-8) if v == 1 else dict(atol=1e-2 * scale, rtol=1e-2)
            lse_tol = dict(atol=1e-4, rtol=1e-5) if v == 1 else dict(atol=4e-3)
            for name, chosen in (("", indices), (", wild indices", wild)):
                out = compare.poisoned((B, s_q, h, 512), torch.bfloat16)
                lse = compare.poisoned((B, s_q, h), torch.float32)
                with kernels.recording_launches() as launches:
                    decode = latent_cache.sparse_mla_decode_fp8_cuda
                    decode(q, cache, chosen, SCALE, kernel=v, out=out, lse=lse)
                expected = [TABLE[v].entry]
                expected += [COMBINE_ENTRY] if v in SPLIT_VERSIONS and splits > 1 else []
                assert [launch.kernel for launch in launches] == expected, launches
                compare.assert_close(out.float(), ref_out, **out_tol, name=f"kernel {v}{name}: out")
                compare.assert_close(lse, ref_lse, **lse_tol, name=f"kernel {v}{name}: lse")
                empty = out.view(-1, h, 512)[B * s_q - 1]
                assert B * s_q == 1 or bool((empty == 0).all()), f"kernel {v}{name}: an empty row must give 0"
            split = f", {splits} splits + combine" if v in SPLIT_VERSIONS and splits > 1 else ""
            print(f"sparse_mla_decode_fp8 kernel {v} B={B} s_q={s_q} h={h} k={k} block_size={block_size} "
                  f"stride={cache.stride(0)} shift={shift}{split} (and wild indices): OK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", type=int, nargs="+", choices=TABLE.versions, default=list(TABLE.versions),
                        help="the versions to launch (default: all)")
    wanted = parser.parse_args().kernels
    torch.manual_seed(0)
    checks.set_data_checks(False)  # the default: indices reach the kernels unchecked
    check_decode(wanted)
    torch.cuda.synchronize()
    print("all FP8 latent cache kernels OK")


if __name__ == "__main__":
    main()
