"""Launch every kernel of cuda/index_scores.cu, cuda/select_topk.cu and cuda/sparse_mla_attention.cu at
small ragged sizes, with wild positions and indices and the data checks OFF (the default a user gets),
and check the results: the target for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_dsa.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_dsa.py

Every version of each kernel table is launched. Sizes are ragged on purpose: T, S and n_h are not
multiples of any tile, the causal index scores have fully masked tiles (skipped) and partly masked
ones, top-k rows are shorter than k, hold NaN, ties and -inf, and the sparse decode has k not a
multiple of any tile, unused (-1) slots, a sequence whose first 64 slots are unused and a sequence
with nothing selected. With the data checks off nothing reads the positions or indices back, so the
kernels get them as they are: positions far outside [0, S) (negative, past S, near the int64
limits) must be clamped to the row, and indices outside [0, S) (below -1, S itself, near the int32
limits) must be skipped like -1, never read. memcheck reports any access outside the tensors.
Prints one line per kernel and "all DSA kernels OK" at the end; exits non-zero on a mismatch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import checks, compare  # noqa: E402
from dsa_tutorial.causal import visible  # noqa: E402
from dsa_tutorial.indexer import INDEX_SCORES_KERNELS, index_scores, index_scores_cuda  # noqa: E402
from dsa_tutorial.sparse_attention import (SPARSE_MLA_ATTENTION_KERNELS, sparse_mla_attention,  # noqa: E402
                                           sparse_mla_attention_cuda)
from dsa_tutorial.topk import (SELECT_TOPK_KERNELS, select_topk, select_topk_cuda,  # noqa: E402
                               select_topk_why_not)

INT32_MIN, INT32_MAX, INT64_MIN, INT64_MAX = -(2**31), 2**31 - 1, -(2**63), 2**63 - 1


def check_index_scores() -> None:
    # no index or position is read from memory here: every address follows from T, S, H, D
    for T, S, H, D, is_causal in [(70, 150, 3, 48, True), (9, 133, 5, 16, False), (70, 333, 9, 128, True),
                                  (9, 270, 5, 128, False), (3, 300, 2, 256, True)]:
        q = torch.randn(T, H, D, device="cuda").to(torch.bfloat16)
        k = torch.randn(S, D, device="cuda").to(torch.bfloat16)
        w = torch.randn(T, H, device="cuda")
        ref = index_scores(q.float(), w, k.float())
        if is_causal:
            ref = ref.masked_fill(~visible(T, S, ref.device), float("-inf"))
        scale = ref[torch.isfinite(ref)].abs().max().item()
        for v in INDEX_SCORES_KERNELS.versions:
            if v == 5 and D != INDEX_SCORES_KERNELS.defines()["KEYS_D"]:  # kernel 5 is compiled for D = 128 only
                continue
            out = compare.poisoned((T, S), torch.float32)
            index_scores_cuda(q, w, k, kernel=v, causal=is_causal, out=out)
            compare.assert_close(out, ref, atol=1e-5 * scale, rtol=1e-5, name=f"index_scores kernel {v}")
            print(f"index_scores kernel {v} T={T} S={S} H={H} D={D} causal={is_causal}: OK")


def check_select_topk() -> None:
    scores = torch.randint(-3, 4, (2, 45, 5001), device="cuda").float()  # S % 4 == 1: unaligned rows
    scores[..., 3::101] = float("nan")
    scores[..., 5::203] = float("-inf")
    short = torch.randn(5, 3000, device="cuda")
    positions = torch.tensor([0, 17, 2999, 1000, 2046], device="cuda")
    ties = torch.zeros(2, 30000, device="cuda")  # 30000 equal keys: kernel 2's list overflows, it falls back
    ties[1, 7::5] = 1.0
    # wild positions: the kernels clamp each row's visible end to [0, S]
    wild_rows = torch.randn(8, 777, device="cuda")
    wild = torch.tensor([-1, -5, 776, 777, 10**9, INT64_MIN, INT64_MAX, 300], device="cuda")
    clamped = wild.clamp(-1, 776)
    wild_ref = select_topk(wild_rows, 40, clamped.clamp(min=0)).masked_fill(clamped[:, None] < 0, -1)
    for v in SELECT_TOPK_KERNELS.versions:
        for k in (300, 1):
            ref = select_topk(scores, k)  # causal: query t sees 4956 + t + 1 positions
            out = compare.poisoned((2, 45, k), torch.int32)
            select_topk_cuda(scores, k, kernel=v, out=out)
            assert torch.equal(out, ref), f"select_topk kernel {v} k={k} differs"
            print(f"select_topk kernel {v} k={k}: OK")
        assert torch.equal(select_topk_cuda(short, 2048, positions, kernel=v), select_topk(short, 2048, positions))
        print(f"select_topk kernel {v} short rows: OK")
        if select_topk_why_not(ties.shape[-1])[v] is None:  # kernel 3: rows up to one block's shared memory
            assert torch.equal(select_topk_cuda(ties, 2048, kernel=v), select_topk(ties, 2048))
            print(f"select_topk kernel {v} long ties: OK")
        # kernel 3 holds the row in shared memory, kernel 4 a list after a sample: rows ragged at
        # kernel 3's limit and past it (rows start off the 16-byte grid), wild positions, causal
        # rows; row 1's sampled float4s (one in 16) high and row 3's low: kernel 4's guess is wrong
        # and it falls back to kernel 2's answer
        stride = 4 * SELECT_TOPK_KERNELS.defines()["TOPK_SAMPLE_STRIDE"]
        for S in (24575, 40001):
            if select_topk_why_not(S)[v] is not None:
                continue
            rows = torch.randint(-3, 4, (9, S), device="cuda").float()
            rows[:, 3::101] = float("nan")
            rows[::2] = torch.randn(5, S, device="cuda")
            rows[1, ::stride] = 50.0
            rows[3, :: stride // 4] = -50.0
            ends = torch.tensor([S // 3, S // 2 + 1, S - 2, S - 1, 0, -3, S, INT64_MAX, INT64_MIN], device="cuda")
            kept = ends.clamp(-1, S - 1)
            ref = select_topk(rows, 2048, kept.clamp(min=0)).masked_fill(kept[:, None] < 0, -1)
            out = compare.poisoned((9, 2048), torch.int32)
            select_topk_cuda(rows, 2048, ends, kernel=v, out=out)
            assert torch.equal(out, ref), f"select_topk kernel {v} S={S} differs"
            causal = rows[:, : S - 2].reshape(1, 9, S - 2)[:, :7]
            assert torch.equal(select_topk_cuda(causal.contiguous(), 1000, kernel=v), select_topk(causal, 1000))
            print(f"select_topk kernel {v} S={S} (wild and causal positions, misleading samples): OK")
        for dtype in (torch.int64, torch.int32):
            as_dtype = wild.clamp(INT32_MIN, INT32_MAX).to(dtype) if dtype == torch.int32 else wild
            out = select_topk_cuda(wild_rows, 40, as_dtype, kernel=v)
            assert torch.equal(out, wild_ref), f"select_topk kernel {v}: wild {dtype} positions not clamped"
        print(f"select_topk kernel {v} wild positions (int64, int32): OK")


def check_sparse_mla_attention() -> None:
    # k not a multiple of kernel 2's 64-latent tile, n_h not a multiple of 64 (or of 32), -1 padding,
    # a sequence whose first tile is all -1, a sequence with nothing selected
    for B, S, n_h, k in [(3, 200, 40, 45), (4, 300, 128, 130), (2, 90, 16, 70)]:
        q_abs = torch.randn(B, n_h, 512, device="cuda").to(torch.bfloat16)
        q_rope = torch.randn(B, n_h, 64, device="cuda").to(torch.bfloat16)
        kv = torch.randn(B, S, 576, device="cuda").to(torch.bfloat16)
        indices = torch.stack([torch.randperm(S, device="cuda")[:k] for _ in range(B)]).int()
        indices[0, -5:] = -1
        indices[1, :min(64, k - 2)] = -1
        indices[B - 1] = -1
        ref = sparse_mla_attention(q_abs.float()[:, None], q_rope.float()[:, None], kv.float()[..., :512],
                                   kv.float()[..., 512:], indices[:, None], 0.1)[:, 0]
        # wild indices where the slots were unused: past the cache, S itself, below -1, the int32 limits
        wild = indices.clone()
        wild[0, -5:] = torch.tensor([S + 1000, S, -1000, INT32_MAX, INT32_MIN], dtype=torch.int32)
        wild[B - 1, ::2] = S
        wild[B - 1, 1::2] = INT32_MIN
        for v in SPARSE_MLA_ATTENTION_KERNELS.versions:
            # kernel 2 rounds p to bf16 before P V (see tests/test_sparse_attention.py for the tolerance)
            tol = dict(atol=1e-4, rtol=1e-4) if v == 1 else dict(atol=1e-2 * ref.abs().max().item(), rtol=1e-2)
            for name, chosen in (("", indices), (", wild indices", wild)):
                out = compare.poisoned((B, n_h, 512), torch.float32)
                sparse_mla_attention_cuda(q_abs, q_rope, kv, chosen, 0.1, kernel=v, out=out)
                compare.assert_close(out, ref, **tol, name=f"sparse_mla_attention kernel {v}{name}")
                assert bool((out[B - 1] == 0).all()), f"kernel {v}{name}: an empty selection must give 0"
            print(f"sparse_mla_attention kernel {v} B={B} S={S} n_h={n_h} k={k} (and wild indices): OK")


def main() -> None:
    torch.manual_seed(0)
    checks.set_data_checks(False)  # the default: positions and indices reach the kernels unchecked
    check_index_scores()
    check_select_topk()
    check_sparse_mla_attention()
    torch.cuda.synchronize()
    print("all DSA kernels OK")


if __name__ == "__main__":
    main()
