"""Launch every kernel of cuda/indexer_logits.cu, cuda/topk.cu and cuda/sparse_mla.cu at small ragged
sizes and check the results: the target for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_dsa.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_dsa.py

Sizes are ragged on purpose: T, S and n_h are not multiples of any tile, the causal case has fully
masked tiles (skipped) and partly masked ones, top-k rows are shorter than k, hold NaN, ties and
-inf, and the sparse decode (both kernels) has k not a multiple of any tile, unused (-1) slots, a
sequence whose first 64 slots are unused, indices outside the cache with the range check off (the
kernel must ignore them, not read them) and a sequence with nothing selected.
Prints one line per kernel and "all DSA kernels OK" at the end; exits non-zero on a mismatch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import compare  # noqa: E402
from dsa_tutorial import causal
from dsa_tutorial.indexer import INDEXER_KERNELS, index_scores, index_scores_cuda  # noqa: E402
from dsa_tutorial.sparse_attention import SPARSE_KERNELS, sparse_mla_attention, sparse_mla_decode_cuda  # noqa: E402
from dsa_tutorial.topk import TOPK_KERNELS, select_topk, select_topk_cuda  # noqa: E402


def check_indexer() -> None:
    for T, S, H, D, causal in [(70, 150, 3, 48, True), (9, 133, 5, 16, False), (70, 333, 9, 128, True),
                               (9, 270, 5, 128, False)]:
        q = torch.randn(T, H, D, device="cuda").to(torch.bfloat16)
        k = torch.randn(S, D, device="cuda").to(torch.bfloat16)
        w = torch.randn(T, H, device="cuda")
        ref = index_scores(q.float(), w, k.float())
        if causal:
            ref = ref.masked_fill(~causal.visible(T, S, ref.device), float("-inf"))
        scale = ref[torch.isfinite(ref)].abs().max().item()
        for kernel in INDEXER_KERNELS:
            if kernel == "mma_keys" and D != 128:  # kernel 4 is compiled for D = 128 only
                continue
            out = index_scores_cuda(q, w, k, kernel=kernel, causal=causal)
            compare.assert_close(out, ref, atol=1e-5 * scale, rtol=1e-5, name=f"indexer_logits_{kernel}")
            print(f"indexer_logits_{kernel} T={T} S={S} H={H} D={D} causal={causal}: OK")


def check_topk() -> None:
    scores = torch.randint(-3, 4, (2, 45, 5001), device="cuda").float()  # S % 4 == 1: unaligned rows
    scores[..., 3::101] = float("nan")
    scores[..., 5::203] = float("-inf")
    for kernel in TOPK_KERNELS:
        for k in (300, 1):
            ref = select_topk(scores, k)  # causal: query t sees 4956 + t + 1 positions
            out = compare.poisoned((2, 45, k), torch.int32)
            out.copy_(select_topk_cuda(scores, k, kernel=kernel))
            assert torch.equal(out, ref), f"topk {kernel} k={k} differs"
            print(f"topk {kernel} k={k}: OK")
        short = torch.randn(5, 3000, device="cuda")
        positions = torch.tensor([0, 17, 2999, 1000, 2046], device="cuda")
        assert torch.equal(select_topk_cuda(short, 2048, positions, kernel=kernel), select_topk(short, 2048, positions))
        print(f"topk {kernel} short rows: OK")
    ties = torch.zeros(2, 30000, device="cuda")  # 30000 equal keys: kernel 2's list overflows, it falls back
    ties[1, 7::5] = 1.0
    for kernel in TOPK_KERNELS:
        assert torch.equal(select_topk_cuda(ties, 2048, kernel=kernel), select_topk(ties, 2048))
        print(f"topk {kernel} long ties: OK")


def check_sparse_mla() -> None:
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
        # an index past the cache and one below -1 with the check off: ignored like -1, never read
        bad = indices.clone()
        bad[0, -1] = S + 1000
        bad[0, -2] = -1000
        for kernel in SPARSE_KERNELS:
            # kernel 2 rounds p to bf16 before P V (see tests/test_sparse_attention.py for the tolerance)
            tol = dict(atol=1e-4, rtol=1e-4) if kernel == "simt" else dict(atol=1e-2 * ref.abs().max().item(), rtol=1e-2)
            out = compare.poisoned((B, n_h, 512), torch.float32)
            out.copy_(sparse_mla_decode_cuda(q_abs, q_rope, kv, indices, 0.1, kernel=kernel))
            compare.assert_close(out, ref, **tol, name=f"sparse_mla_decode {kernel}")
            assert bool((out[B - 1] == 0).all()), f"sparse_mla_decode {kernel}: an empty selection must give 0"
            out = sparse_mla_decode_cuda(q_abs, q_rope, kv, bad, 0.1, check_indices=False, kernel=kernel)
            compare.assert_close(out, ref, **tol, name=f"sparse_mla_decode {kernel}, index out of range")
            print(f"sparse_mla_decode {kernel} B={B} S={S} n_h={n_h} k={k}: OK")


def main() -> None:
    torch.manual_seed(0)
    check_indexer()
    check_topk()
    check_sparse_mla()
    torch.cuda.synchronize()
    print("all DSA kernels OK")


if __name__ == "__main__":
    main()
