"""Kernel 5 of cuda/mqa_logits.cu (TMA, warp-specialised, persistent) on the GPU: checked, then timed
against kernel 4.

    python benchmarks/mqa_logits_kernel5_check.py            (from the repository root, on an H100 / H200)
    python benchmarks/mqa_logits_kernel5_check.py --no-time  (the checks only)

1. Checks: kernel 5 against the reference fp8.mqa_logits (float64, on the GPU) on ragged packed prefills
   with more blocks of queries than SMs (the persistent loop), some rows with wild ranges (negative, past
   S_k, reversed, int32 extremes: data checks off, the kernel clips them), keys nobody sees, H = 64 and 32,
   float32 and bfloat16 logits, clean_logits both ways, into outputs poisoned with NaN and guarded by a
   NaN row on each side. compare.assert_close with the tolerances of tests/test_fp8.py. It also says
   whether kernel 5's logits equal kernel 4's bit for bit (the same wgmma and epilogue: they should;
   informative only). Exits with status 1 on any mismatch.
2. Timing (bench.time_call: the public call, and its launch replayed alone) of kernels 4 and 5 on issue
   10's causal cases, 8192 x 8192 and 4096 x 65536 (the queries are the last S_q of S_k keys), H = 64,
   D = 128, float32 logits: microseconds, TFLOP/s of the causal work, and the ratio kernel 4 / kernel 5
   (above 1: kernel 5 is faster).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import D, H, mqa_inputs  # noqa: E402  (benchmarks/cases.py)
from dsa_tutorial import bench, checks, compare, fp8  # noqa: E402

BF16_RTOL = 2.0 ** -7  # bfloat16 logits: the float32 tolerance plus one bf16 ulp (tests/test_fp8.assert_bf16_logits)


def ragged_inputs(seq_lens, heads: int, extra_keys: int, seed: int):
    """q [S, heads, 128], k [S + extra_keys, 128] (e4m3, act_quant), k_scale, w, causal ks/ke of the
    packed prefills with every 7th row given a wild range."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    S = sum(seq_lens)
    q, q_s = fp8.act_quant_cuda(torch.randn(S, heads, D, device="cuda", generator=g))
    k, k_s = fp8.act_quant_cuda(torch.randn(S + extra_keys, D, device="cuda", generator=g))
    w = torch.randn(S, heads, device="cuda", generator=g) * q_s.squeeze(-1)
    ks, ke = fp8.causal_ks_ke(seq_lens, device="cuda")
    n_wild = len(ks[::7])
    ks[::7] = torch.randint(-3 * S, 3 * S, (n_wild,), device="cuda", generator=g, dtype=torch.int32)
    ke[::7] = ks[::7] + torch.randint(-2 * S, 2 * S, (n_wild,), device="cuda", generator=g, dtype=torch.int32)
    ks[1::35], ke[1::35] = -(2 ** 31), 2 ** 31 - 1
    ks[2::35], ke[2::35] = 2 ** 31 - 1, -(2 ** 31)
    return q, k, k_s.squeeze(-1), w, ks, ke


def check() -> list[str]:
    failures = []
    cases = [([1, 700, 3, 1500, 129, 2, 477], 64, 17), ([5000, 3, 900], 64, 0), ([2, 1300, 61, 2000], 32, 100),
             ([37], 64, 5), ([3], 32, 1)]
    for seq_lens, heads, extra in cases:
        q, k, k_scale, w, ks, ke = ragged_inputs(seq_lens, heads, extra, seed=sum(seq_lens) + heads)
        S_q, S_k = q.shape[0], k.shape[0]
        clipped_ks = ks.long().clamp(0, S_k)
        clipped_ke = torch.maximum(ke.long().clamp(max=S_k), clipped_ks)
        ref_f32 = fp8.mqa_logits(q, (k, k_scale), w, clipped_ks.int(), clipped_ke.int())
        visible = torch.isfinite(ref_f32)
        scale = ref_f32[visible].abs().max().item()
        for logits_dtype in fp8.LOGITS_DTYPES:
            ref = ref_f32.to(logits_dtype)
            rtol = BF16_RTOL if logits_dtype == torch.bfloat16 else 0.0
            for clean in (True, False):
                name = f"kernel 5, S_q {S_q}, S_k {S_k}, H {heads}, {logits_dtype}, clean_logits={clean}"
                guard = compare.poisoned((S_q + 2, S_k), logits_dtype, "cuda")
                out = guard[1:-1]
                with checks.data_checks(False):
                    fp8.mqa_logits_cuda(q, (k, k_scale), w, ks, ke, clean, kernel=5, out=out,
                                        logits_dtype=logits_dtype)
                    four = fp8.mqa_logits_cuda(q, (k, k_scale), w, ks, ke, clean, kernel=4, logits_dtype=logits_dtype)
                torch.cuda.synchronize()
                try:
                    assert torch.isnan(guard[0]).all() and torch.isnan(guard[-1]).all(), "wrote outside out"
                    if clean:
                        result = compare.assert_close(out, ref, atol=1e-3 * scale, rtol=rtol, max_calc_diff=1e-6,
                                                      name=name)
                    else:
                        result = compare.assert_close(out[visible], ref[visible], atol=1e-3 * scale, rtol=rtol,
                                                      max_calc_diff=1e-6, name=name)
                except AssertionError as error:
                    print(f"FAIL {name}: {error}")
                    failures.append(name)
                    continue
                where = visible if not clean else torch.ones_like(visible)
                same = torch.equal(out[where].view(-1), four[where].view(-1)) if logits_dtype == torch.float32 else \
                    torch.equal(out[where].view(torch.int16), four[where].view(torch.int16))
                print(f"ok   {name}: {result.measured()}; bit for bit kernel 4: {'yes' if same else 'no'}")
    return failures


def time_kernels() -> None:
    checks.set_data_checks(False)  # as a user gets the package
    for S_q, S_k in ((8192, 8192), (4096, 65536)):
        flops = 2.0 * H * D * (S_q * S_k - S_q * (S_q - 1) / 2)  # the causal work only
        make = lambda S_q=S_q, S_k=S_k: mqa_inputs(S_q, S_k)  # noqa: E731
        timed = {}
        for version in (4, 5):
            timed[version] = bench.time_call(lambda *args, v=version: fp8.mqa_logits_cuda(*args, kernel=v), make,
                                             reps=30)
            t = timed[version]
            print(f"{S_q} x {S_k} causal, H={H}, kernel {version}: launch alone {t.launch} "
                  f"= {t.launch.tflops(flops):.0f} TFLOP/s; public call {t.call.median_us:.1f} us")
        ratio = timed[4].launch.median_us / timed[5].launch.median_us
        print(f"{S_q} x {S_k} causal: kernel 4 / kernel 5 = {ratio:.2f} (launch alone; > 1: kernel 5 faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-time", action="store_true", help="the checks only")
    args = parser.parse_args()
    reason = fp8.wgmma_why_not(torch.device("cuda"))
    if reason:
        sys.exit(f"kernel 5 does not run here: it {reason}")
    failures = check()
    if failures:
        print(f"{len(failures)} mismatches: {failures}")
        sys.exit(1)
    print("kernel 5 matches the reference on every case")
    if not args.no_time:
        time_kernels()


if __name__ == "__main__":
    main()
