"""Launch every kernel of chapter 7 at small ragged sizes and check each result, for compute-sanitizer:

    compute-sanitizer --tool memcheck python benchmarks/sanitize_fp8.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_fp8.py

Kernels: act_quant_f32 / _bf16 / _b128_f32 / _b128_bf16 (cuda/act_quant.cu), fp8_mqa_logits_naive /
_h64 / _h32 / _f16_h64 / _f16_h32 / _wgmma_h64 / _wgmma_h32 (cuda/fp8_mqa_logits.cu),
fp8_paged_mqa_logits_h64 / _h32 / _f16_h64 / _f16_h32 / _v3_h{64,32}_n{1,2} / _wgmma_h{64,32}_n{1,2}
(cuda/fp8_paged_mqa_logits.cu), the f16 paged kernels at every block size (next_n 1 and 2, H 64 and 32).
The wgmma kernels (sm_90a) run only on compute capability 9.0; elsewhere they are skipped, with a note.
Sizes are not multiples of any tile; outputs are poisoned first; clean_logits both ways.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dsa_tutorial import compare, fp8, kernels, paged  # noqa: E402
from test_paged import call_args, make_batch  # noqa: E402


def check_act_quant() -> None:
    cases = ((torch.float32, 128, "blockwise"), (torch.bfloat16, 96, "blockwise"), (torch.float32, 128, "b128"),
             (torch.bfloat16, 128, "b128"))
    for dtype, block_size, kernel in cases:
        x = (torch.randn(13, 3 * 384, device="cuda") * 4).to(dtype)  # 1152 = 9 x 128 = 12 x 96; 117 blocks of 128
        x_q, s = fp8.act_quant_cuda(x, block_size, kernel=kernel)
        ref_q, ref_s = fp8.act_quant_reference(x.cpu(), block_size)
        assert torch.equal(x_q.view(torch.uint8).cpu(), ref_q.view(torch.uint8)) and torch.equal(s.cpu(), ref_s)


def runs_here(kernel: str) -> bool:
    """False, with a note, for the wgmma kernels on a GPU that is not compute capability 9.0."""
    if kernel == "wgmma" and not kernels.wgmma_available():
        print(f"sanitize_fp8: {kernel} skipped, it needs compute capability 9.0 (sm_90a)")
        return False
    return True


def check_mqa_logits() -> None:
    for H, kernel in ((64, "tensor_core"), (32, "tensor_core"), (64, "naive"), (64, "tensor_core_f16"),
                      (32, "tensor_core_f16"), (64, "wgmma"), (32, "wgmma")):
        if not runs_here(kernel):
            continue
        seq_lens = [5, 70, 1, 27]  # S = 103
        S = sum(seq_lens)
        q, q_s = fp8.act_quant(torch.randn(S, H, 128, device="cuda"))
        k, k_s = fp8.act_quant(torch.randn(S + 9, 128, device="cuda"))  # 9 keys nobody sees
        w = torch.randn(S, H, device="cuda") * q_s.squeeze(-1)
        ks, ke = fp8.causal_ks_ke(seq_lens, device="cuda")
        ref = fp8.mqa_logits_reference(q, (k, k_s.squeeze(-1)), w, ks, ke)
        scale = ref[torch.isfinite(ref)].abs().max().item()
        for clean in (True, False):
            out = compare.poisoned((S, S + 9), torch.float32, "cuda")
            fp8.mqa_logits_cuda(q, (k, k_s.squeeze(-1)), w, ks, ke, clean, kernel=kernel, out=out)
            if clean:
                compare.assert_close(out, ref, atol=1e-3 * scale, max_calc_diff=1e-6, name=f"{kernel} H={H}")
            else:
                visible = torch.isfinite(ref)
                compare.assert_close(out[visible], ref[visible], atol=1e-3 * scale, name=f"{kernel} H={H} unclean")


def check_paged() -> None:
    cases = [("tensor_core", 64, 1, 3), ("tensor_core", 64, 2, 5), ("tensor_core", 32, 2, 1),
             ("tensor_core_f16", 64, 1, 3), ("tensor_core_f16", 64, 2, 5), ("tensor_core_f16", 32, 1, 2),
             ("tensor_core_f16", 32, 2, 1), ("tensor_core_f16_v3", 64, 1, 3), ("tensor_core_f16_v3", 64, 2, 5),
             ("tensor_core_f16_v3", 32, 1, 2), ("tensor_core_f16_v3", 32, 2, 1), ("tensor_core_f16_v3", 64, 1, 1),
             ("wgmma", 64, 1, 3), ("wgmma", 64, 2, 5), ("wgmma", 32, 1, 2), ("wgmma", 32, 2, 1), ("wgmma", 64, 1, 1)]
    for kernel, H, next_n, num_sms in cases:
        if not runs_here(kernel):
            continue
        batch = make_batch([65, 0, 300, 2, 129], next_n=next_n, H=H, seed=next_n + H)
        q, kv_cache, w, ctx, bt, meta, _ = call_args(batch, num_sms=num_sms, device="cuda")
        ref = paged.paged_mqa_logits_reference(q, kv_cache, w, ctx, bt, meta, 307)
        scale = ref[torch.isfinite(ref)].abs().max().item()
        name = f"paged {kernel} H={H} next_n={next_n}"
        for clean in (True, False):
            out = compare.poisoned((5 * next_n, 307), torch.float32, "cuda")
            paged.paged_mqa_logits_cuda(q, kv_cache, w, ctx, bt, meta, 307, clean, out=out, kernel=kernel)
            if clean:
                compare.assert_close(out, ref, atol=1e-3 * scale, max_calc_diff=1e-6, name=name)
            else:
                inside = torch.arange(307, device="cuda") < ctx.repeat_interleave(next_n).unsqueeze(-1)
                compare.assert_close(out[inside], ref[inside], atol=1e-3 * scale, name=f"{name} unclean")


def main() -> None:
    check_act_quant()
    check_mqa_logits()
    check_paged()
    torch.cuda.synchronize()
    print("sanitize_fp8: all launches checked")


if __name__ == "__main__":
    main()
