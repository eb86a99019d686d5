"""Launch every kernel of chapter 7 at small ragged sizes, and again with wild inputs, for compute-sanitizer:

    compute-sanitizer --tool memcheck python benchmarks/sanitize_fp8.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_fp8.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_fp8.py --only paged --kernels 5   (a part)

Kernels: every version of fp8.ACT_QUANT_KERNELS (cuda/act_quant.cu), fp8.MQA_LOGITS_KERNELS
(cuda/mqa_logits.cu) and paged.PAGED_MQA_LOGITS_KERNELS (cuda/paged_mqa_logits.cu), for each H (64, 32)
and next_n (1, 2) they are compiled for, each logits kernel storing float32 and bfloat16 (logits_dtype), the
paged ones with context_lens [B] and the per-row [B, next_n]. Kernel 4 of the logits files (wgmma, sm_90a)
and kernel 5 of the mqa logits (TMA) run only on compute capability 9.0; elsewhere they are skipped, with a note.
Kernel 5 also runs at a size with more blocks of queries than SMs (its persistent loop). Sizes are not multiples of any
tile; outputs are poisoned first; clean_logits both ways.

Then, with data checks off (the default of the package), every logits kernel is launched on invalid
device data: ks/ke negative, past S_k, reversed and at the int32 extremes; context lengths (both forms)
negative, past max_context_len and longer than their table row; block ids negative and past the cache; schedules
that do not match the lengths or hold random int32 values; an empty cache. memcheck must stay clean:
the kernels clip every such value (see the .cu headers), whatever the result is worth.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dsa_tutorial import checks, compare, fp8, paged  # noqa: E402
from test_paged import call_args, make_batch  # noqa: E402

MQA = fp8.MQA_LOGITS_KERNELS
PAGED = paged.PAGED_MQA_LOGITS_KERNELS
BF16_RTOL = 2.0 ** -7  # bfloat16 logits: the float32 tolerance plus one bf16 ulp (tests/test_fp8.assert_bf16_logits)


def check_act_quant() -> None:
    for kernel in fp8.ACT_QUANT_KERNELS.versions:
        for dtype, block_size in ((torch.float32, 128), (torch.bfloat16, 96), (torch.bfloat16, 128)):
            if kernel == 2 and block_size != 128:
                continue
            x = (torch.randn(13, 3 * 384, device="cuda") * 4).to(dtype)  # 1152 = 9 x 128 = 12 x 96; 117 blocks
            for scale_fmt in ("ue8m0", None):
                out = (compare.poisoned(x.shape, torch.float8_e4m3fn), compare.poisoned((13, 1152 // block_size),
                                                                                       torch.float32))
                x_q, s = fp8.act_quant_cuda(x, block_size, scale_fmt, kernel=kernel, out=out)
                ref_q, ref_s = fp8.act_quant(x.cpu(), block_size, scale_fmt)
                assert torch.equal(x_q.view(torch.uint8).cpu(), ref_q.view(torch.uint8)) and torch.equal(s.cpu(), ref_s)


def runs_here(table, kernel: int) -> bool:
    """False, with a note, for a kernel that cannot run on this GPU (kernels 4 and 5: compute capability 9.0)."""
    reason = fp8.wgmma_why_not(torch.device("cuda")) if "compute capability 9.0" in table[kernel].needs else None
    if reason:
        print(f"sanitize_fp8: kernel {kernel} of cuda/{table.source}.cu skipped, it {reason}")
    return reason is None


def check_mqa_logits(kernels) -> None:
    for kernel in kernels:
        for H in MQA.variants["H"]:
            if not runs_here(MQA, kernel):
                continue
            seq_lens = [5, 70, 1, 27]  # S = 103
            S = sum(seq_lens)
            q, q_s = fp8.act_quant_cuda(torch.randn(S, H, 128, device="cuda"))
            k, k_s = fp8.act_quant_cuda(torch.randn(S + 9, 128, device="cuda"))  # 9 keys nobody sees
            w = torch.randn(S, H, device="cuda") * q_s.squeeze(-1)
            ks, ke = fp8.causal_ks_ke(seq_lens, device="cuda")
            for logits_dtype in fp8.LOGITS_DTYPES:
                ref = fp8.mqa_logits(q, (k, k_s.squeeze(-1)), w, ks, ke, logits_dtype=logits_dtype)
                scale = ref[torch.isfinite(ref)].abs().max().item()
                rtol = BF16_RTOL if logits_dtype == torch.bfloat16 else 0.0
                name = f"mqa_logits kernel {kernel} H={H} {logits_dtype}"
                for clean in (True, False):
                    out = compare.poisoned((S, S + 9), logits_dtype, "cuda")
                    fp8.mqa_logits_cuda(q, (k, k_s.squeeze(-1)), w, ks, ke, clean, kernel=kernel, out=out,
                                        logits_dtype=logits_dtype)
                    if clean:
                        compare.assert_close(out, ref, atol=1e-3 * scale, rtol=rtol, max_calc_diff=1e-6, name=name)
                    else:
                        visible = torch.isfinite(ref)
                        compare.assert_close(out[visible], ref[visible], atol=1e-3 * scale, rtol=rtol,
                                             name=f"{name} unclean")
            if kernel == 5:  # more blocks of queries than SMs: several rounds a block, many laps of the ring
                check_many_query_blocks(H)
            # wild ranges, data checks off: clipped by the kernels, nothing out of bounds
            g = torch.Generator().manual_seed(kernel * 100 + H)
            ks = torch.randint(-3 * S, 3 * S, (S,), generator=g)
            ke = ks + torch.randint(-2 * S, 2 * S, (S,), generator=g)
            ks[::7], ke[::7] = -(2 ** 31), 2 ** 31 - 1
            ks[1::7], ke[1::7] = 2 ** 31 - 1, -(2 ** 31)
            with checks.data_checks(False):
                for clean in (True, False):
                    for logits_dtype in fp8.LOGITS_DTYPES:
                        fp8.mqa_logits_cuda(q, (k, k_s.squeeze(-1)), w, ks.int().cuda(), ke.int().cuda(), clean,
                                            kernel=kernel, logits_dtype=logits_dtype)


def check_many_query_blocks(H: int) -> None:
    seq_lens = [3, 1100, 1, 700, 450]  # S = 2254: 282 (H = 64) or 141 (H = 32) blocks of queries
    S = sum(seq_lens)
    q, q_s = fp8.act_quant_cuda(torch.randn(S, H, 128, device="cuda"))
    k, k_s = fp8.act_quant_cuda(torch.randn(S + 5, 128, device="cuda"))
    w = torch.randn(S, H, device="cuda") * q_s.squeeze(-1)
    ks, ke = fp8.causal_ks_ke(seq_lens, device="cuda")
    ref = fp8.mqa_logits(q, (k, k_s.squeeze(-1)), w, ks, ke)
    scale = ref[torch.isfinite(ref)].abs().max().item()
    out = compare.poisoned((S, S + 5), torch.float32, "cuda")
    fp8.mqa_logits_cuda(q, (k, k_s.squeeze(-1)), w, ks, ke, kernel=5, out=out)
    compare.assert_close(out, ref, atol=1e-3 * scale, max_calc_diff=1e-6, name=f"mqa_logits kernel 5 H={H} S={S}")


def check_paged(kernels) -> None:
    for kernel in kernels:
        for H in PAGED.variants["H"]:
            for next_n in PAGED.variants["next_n"]:
                if not runs_here(PAGED, kernel):
                    continue
                # every schedule size with context_lens [B] and float32 logits; then, at one size, the per-row
                # form [B, next_n] (ragged rows, zeros among them) and bfloat16 logits
                variants = [(num_sms, form, torch.float32) for num_sms in (1, 3, 5) for form in ("[B]",)]
                variants += [(3, "[B, next_n]", torch.float32), (3, "[B]", torch.bfloat16),
                             (3, "[B, next_n]", torch.bfloat16)]
                for num_sms, form, logits_dtype in variants:
                    batch = make_batch([65, 0, 300, 2, 129], next_n=next_n, H=H, seed=next_n + H + num_sms)
                    q, kv_cache, w, ctx, bt, _, _ = call_args(batch, num_sms=num_sms, device="cuda")
                    if form == "[B, next_n]":  # row (b, 0) a ragged length of its own: 0, shorter, the same
                        ctx = torch.stack([torch.tensor([0, 0, 17, 2, 129], dtype=torch.int32, device="cuda"), ctx],
                                          dim=1)[:, 2 - next_n:].contiguous()
                    meta = paged.paged_mqa_logits_metadata(ctx, 64, num_sms)
                    ref = paged.paged_mqa_logits(q, kv_cache, w, ctx, bt, meta, 307, logits_dtype=logits_dtype)
                    scale = ref[torch.isfinite(ref)].abs().max().item()
                    rtol = BF16_RTOL if logits_dtype == torch.bfloat16 else 0.0
                    name = f"paged kernel {kernel} H={H} next_n={next_n} num_sms={num_sms} {form} {logits_dtype}"
                    longest = ctx.amax(1) if ctx.dim() == 2 else ctx
                    for clean in (True, False):
                        out = compare.poisoned((5 * next_n, 307), logits_dtype, "cuda")
                        paged.paged_mqa_logits_cuda(q, kv_cache, w, ctx, bt, meta, 307, clean, out=out, kernel=kernel,
                                                    logits_dtype=logits_dtype)
                        if clean:
                            compare.assert_close(out, ref, atol=1e-3 * scale, rtol=rtol, max_calc_diff=1e-6, name=name)
                        else:
                            inside = torch.arange(307, device="cuda") < longest.repeat_interleave(next_n).unsqueeze(-1)
                            compare.assert_close(out[inside], ref[inside], atol=1e-3 * scale, rtol=rtol,
                                                 name=f"{name} unclean")
                check_paged_wild(kernel, H, next_n)


def check_paged_wild(kernel: int, H: int, next_n: int) -> None:
    """Invalid context lengths, block ids and schedules, data checks off: launches only (memcheck judges)."""
    batch = make_batch([65, 0, 300, 2, 129], next_n=next_n, H=H, seed=kernel)
    q, kv_cache, w, ctx, bt, meta, _ = call_args(batch, num_sms=3, device="cuda")
    num_blocks, max_blocks, max_len = kv_cache.shape[0], bt.shape[1], 307
    g = torch.Generator().manual_seed(kernel * 10 + next_n)
    wild_lens = torch.tensor([-7, 2 ** 31 - 1, 100000, -(2 ** 31), 64 * max_blocks + 1], dtype=torch.int32).cuda()
    # the per-row form: wild values in either row, next to valid ones
    other = torch.tensor([2 ** 31 - 1, -1, 64 * max_blocks, 5, -(2 ** 31)], dtype=torch.int32).cuda()
    wild_rows = torch.stack([other, wild_lens], dim=1)[:, 2 - next_n:].contiguous()
    per_row_ctx = paged.row_lengths(ctx, next_n).contiguous()
    wild_table = torch.randint(-(2 ** 31), 2 ** 31 - 1, bt.shape, generator=g, dtype=torch.int64).int().cuda()
    wild_table[0::2, 0], wild_table[1::2, 0] = -1, num_blocks  # just past either end, in a used block
    wild_metas = [torch.randint(-(2 ** 31), 2 ** 31 - 1, (4, 2), generator=g, dtype=torch.int64).int().cuda(),
                  torch.randint(-3, 12, (6, 2), generator=g).int().cuda(),
                  paged.paged_mqa_logits_metadata(torch.full((5,), 5000, dtype=torch.int32, device="cuda"), 64, 3),
                  meta]
    empty_cache = torch.zeros(0, 64, 1, 132, dtype=torch.uint8, device="cuda")
    with checks.data_checks(False):
        for lens, table in ((wild_lens, bt), (ctx, wild_table), (wild_lens, wild_table), (wild_rows, bt),
                            (per_row_ctx, wild_table), (wild_rows, wild_table)):
            for schedule in wild_metas:
                for clean in (True, False):
                    for logits_dtype in fp8.LOGITS_DTYPES:
                        paged.paged_mqa_logits_cuda(q, kv_cache, w, lens, table, schedule, max_len, clean,
                                                    kernel=kernel, logits_dtype=logits_dtype)
        for lens in (wild_lens, wild_rows):
            for logits_dtype in fp8.LOGITS_DTYPES:
                paged.paged_mqa_logits_cuda(q, empty_cache, w, lens, wild_table, meta, max_len, kernel=kernel,
                                            logits_dtype=logits_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=("act_quant", "mqa", "paged"),
                        default=["act_quant", "mqa", "paged"], help="the parts to launch (default: all)")
    parser.add_argument("--kernels", type=int, nargs="+", choices=sorted(set(MQA.versions) | set(PAGED.versions)),
                        help="the logits kernel versions to launch (default: every one)")
    args = parser.parse_args()
    if "act_quant" in args.only:
        check_act_quant()
    if "mqa" in args.only:
        check_mqa_logits([k for k in MQA.versions if args.kernels is None or k in args.kernels])
    if "paged" in args.only:
        check_paged([k for k in PAGED.versions if args.kernels is None or k in args.kernels])
    torch.cuda.synchronize()
    print("sanitize_fp8: all launches checked")


if __name__ == "__main__":
    main()
