"""Launch every kernel of cuda/sparse_mla_prefill.cu at small ragged sizes, with wild indices and the
data checks OFF (the default a user gets), and check the results: the target for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_sparse_prefill.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_sparse_prefill.py

Every version of SPARSE_MLA_PREFILL_KERNELS is launched (kernel 2, wgmma, only on a GPU of compute
capability 9.0; elsewhere it says so and goes on). Sizes are ragged on purpose: k is not a multiple of
the 64-latent tile, S is small (the causal selections of the first tokens are short), one token's first
64 slots are unused (a whole tile of -1), and one token selects nothing. With the data checks off nothing
reads the indices back, so the kernels get them as they are: indices outside [0, S) (S itself, past it,
below -1, the int32 limits) where the slots were unused must be skipped like -1, never read, and give
the same bits as -1. memcheck reports any access outside the tensors; racecheck any unordered pair of
shared-memory accesses (the barriers between the stages, P and the row exchange).
Prints one line per kernel and case and "all sparse prefill kernels OK" at the end; exits non-zero on a
mismatch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import checks, compare  # noqa: E402
from dsa_tutorial.sparse_prefill import (SPARSE_MLA_PREFILL_KERNELS, sparse_mla_prefill,  # noqa: E402
                                         sparse_mla_prefill_cuda, wgmma_why_not)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SCALE = 0.1352337788608801  # V3.2's softmax_scale


def selection(T: int, S: int, k: int) -> torch.Tensor:
    """indices [T, 1, k]: token t picks from [0, S - T + t] (causal), -1 in the slots it cannot fill;
    token 1's first 64 slots unused, the last token selects nothing."""
    rows = torch.full((T, k), -1, dtype=torch.int32)
    for t in range(T):
        visible = max(0, min(S, S - T + t + 1))
        n = min(k, visible)
        rows[t, torch.randperm(k)[:n]] = torch.randperm(visible)[:n].int()
    if T > 1:
        rows[1, :min(64, k - 2)] = -1
    rows[T - 1] = -1
    return rows[:, None].cuda()


def wild(indices: torch.Tensor, S: int) -> torch.Tensor:
    """The unused slots rewritten as indices outside [0, S)."""
    out = indices.clone()
    unused = out == -1
    values = torch.tensor([S, S + 1000, -1000, INT32_MAX, INT32_MIN], dtype=torch.int32, device="cuda")
    out[unused] = values[torch.arange(int(unused.sum()), device="cuda") % len(values)]
    return out


def check_sparse_mla_prefill() -> None:
    for T, S, h, k in [(5, 200, 64, 45), (3, 300, 128, 130), (4, 90, 64, 70), (2, 1, 128, 3)]:
        q = torch.randn(T, h, 576, device="cuda").to(torch.bfloat16)
        kv = torch.randn(S, 1, 576, device="cuda").to(torch.bfloat16)
        indices = selection(T, S, k)
        ref_out, ref_max, ref_lse = sparse_mla_prefill(q.float(), kv.float(), indices, SCALE)
        scale = ref_out.abs().max().item() or 1.0
        for v in SPARSE_MLA_PREFILL_KERNELS.versions:
            if v == 2 and wgmma_why_not(q.device) is not None:
                print(f"sparse_mla_prefill kernel 2 skipped: {wgmma_why_not(q.device)}")
                continue
            results = []
            for chosen in (indices, wild(indices, S)):
                out = compare.poisoned((T, h, 512), torch.bfloat16)
                max_logits, lse = compare.poisoned((T, h), torch.float32), compare.poisoned((T, h), torch.float32)
                sparse_mla_prefill_cuda(q, kv, chosen, SCALE, kernel=v, out=out, max_logits=max_logits, lse=lse)
                # p is rounded to bf16 before P V (tests/test_sparse_prefill.py says why 1e-2)
                compare.assert_close(out.float(), ref_out, atol=1e-2 * scale, rtol=1e-2, name=f"kernel {v} out")
                compare.assert_close(max_logits, ref_max, atol=1e-4, rtol=1e-5, name=f"kernel {v} max_logits")
                compare.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5, name=f"kernel {v} lse")
                assert bool((out[T - 1] == 0).all()) and bool(torch.isposinf(lse[T - 1]).all()), \
                    f"kernel {v}: an empty selection must give out 0 and lse +inf"
                results.append((out, max_logits, lse))
            assert all(torch.equal(a, b) for a, b in zip(*results)), f"kernel {v}: wild indices differ from -1"
            print(f"sparse_mla_prefill kernel {v} T={T} S={S} h={h} k={k} (and wild indices): OK")


def main() -> None:
    torch.manual_seed(0)
    checks.set_data_checks(False)  # the default: the indices reach the kernels unchecked
    check_sparse_mla_prefill()
    torch.cuda.synchronize()
    print("all sparse prefill kernels OK")


if __name__ == "__main__":
    main()
