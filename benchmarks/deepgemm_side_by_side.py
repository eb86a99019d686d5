"""FP8 indexer logits: this package's public calls against DeepGEMM's kernels, in one process, on the same
inputs, timed in turn (one call of each per repetition, CUDA events around every call, median).

    PYTHONPATH=<folder holding an importable deep_gemm> LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 \\
        python benchmarks/deepgemm_side_by_side.py --commit <DeepGEMM commit>

DeepGEMM is not a dependency: build it from its source for sm_90a outside this repository and put it on
the path (its std::regex use needs the system libstdc++ ahead of torch's, hence LD_PRELOAD); without it
the script says so and exits. The cases are the ones chapter 7 quotes DeepGEMM on: mqa_logits causal at
8192 x 8192, 4096 x 65536 and 2048 x 8192 (the queries are the last S_q of S_k keys; H 64, D 128), and
paged_mqa_logits for B in {64, 128, 256}, contexts of about {8K, 32K, 64K} tokens (0.7 to 1.3 x the
mean, blocks shuffled), next_n 1 and 2; inputs from benchmarks/cases.py. DeepGEMM's current interface
takes the paged context lengths per draft row, [B, next_n] (row (b, j) sees p < context_lens[b, j]):
it gets the per-row form of the same lengths, this package the [B] form. Before timing, the two outputs
are compared: the same -inf pattern and calc_diff < 1e-6 over the finite entries (DeepGEMM's paged call
runs with clean_logits=False, which leaves the entries past each row's length unwritten: those are set to
-inf for the comparison; this package's call writes -inf there, a little more work).

Rates: mqa_logits against the FP8 GEMM ceiling (the causal work only: 2 H D per visible pair), paged
against the copy ceiling (cache read, logits written, q and weights read), both measured in the same run.
Writes book/data/kernels/deepgemm_side_by_side.json (role "baseline" = DeepGEMM, labelled with its
commit; "default" = this package's public call with its default arguments; the schedule of both paged
calls is computed outside the timed call, as a decode step computes it once for all layers).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import D, H, mqa_inputs, paged_inputs  # noqa: E402  (benchmarks/cases.py)
from dsa_tutorial import bench, checks, compare, fp8, paged  # noqa: E402

MQA_CASES = ((8192, 8192), (4096, 65536), (2048, 8192))
PAGED_CASES = tuple((B, context, next_n) for next_n in (1, 2) for B in (64, 128, 256) for context in (8192, 32768, 65536))


def agree(ours: torch.Tensor, theirs: torch.Tensor, case: str) -> float:
    """The same -inf pattern, and calc_diff over the finite entries < 1e-6 (compare.assert_close, no
    elementwise bound); returns calc_diff."""
    return compare.assert_close(ours, theirs, atol=float("inf"), max_calc_diff=1e-6, name=case).calc_diff


def side_by_side_mqa(results, deep_gemm, label, S_q: int, S_k: int) -> None:
    case = f"mqa_logits {S_q} x {S_k} causal, H={H}"
    sets = bench._input_sets(lambda: mqa_inputs(S_q, S_k), 20, 8 << 30)

    def theirs(q, kv, weights, ks, ke):
        return deep_gemm.fp8_mqa_logits(q, kv, weights, ks, ke, True, 0)

    def ours(q, kv, weights, ks, ke):
        return fp8.mqa_logits_cuda(q, kv, weights, ks, ke)

    diff = agree(ours(*sets[0]), theirs(*sets[0]), case)
    print(f"{case}: outputs agree, calc_diff {diff:.1e}")
    rates = dict(flops=2.0 * H * D * (S_q * S_k - S_q * (S_q - 1) / 2), ceiling="fp8")
    t_theirs, t_ours = bench._interleaved([(theirs, sets), (ours, sets)], 3, 20)
    print(results.add(case, "baseline", t_theirs, label=label, **rates))
    print(results.add(case, "default", t_ours, baseline=t_theirs, **rates))


def side_by_side_paged(results, deep_gemm, label, B: int, context: int, next_n: int) -> None:
    case = f"paged_mqa_logits B={B}, contexts ~{context // 1024}K, next_n={next_n}"
    num_sms = deep_gemm.get_num_sms()

    def make():
        q, kv_cache, w, lens, block_table, schedule, max_context_len = paged_inputs(B, context, next_n)
        rows = paged.row_lengths(lens, next_n).contiguous()  # the [B, next_n] form of the same lengths
        their_schedule = deep_gemm.get_paged_mqa_logits_metadata(rows, 64, num_sms)
        return q, kv_cache, w, lens, rows, block_table, schedule, their_schedule, max_context_len

    sets = bench._input_sets(make, 10, 8 << 30)
    q, _, _, lens, _, _, _, _, max_context_len = sets[0]

    def theirs(q, kv_cache, w, lens, rows, block_table, schedule, their_schedule, max_context_len):
        # clean_logits=False: at the commit this was written against, DeepGEMM asserts on True for the paged
        # call; it then leaves whatever is past each row's length, which the check below masks
        return deep_gemm.fp8_paged_mqa_logits(q, kv_cache, w, rows, block_table, their_schedule, max_context_len, False)

    def ours(q, kv_cache, w, lens, rows, block_table, schedule, their_schedule, max_context_len):
        return paged.paged_mqa_logits_cuda(q, kv_cache, w, lens, block_table, schedule, max_context_len)

    rows = sets[0][4]
    theirs_out = theirs(*sets[0])[:, :max_context_len]
    past = torch.arange(max_context_len, device=rows.device) >= rows.reshape(-1, 1)  # p >= len[b, j]
    diff = agree(ours(*sets[0]), theirs_out.masked_fill(past, float("-inf")), case)
    print(f"{case}: outputs agree (DeepGEMM's entries past each row's length set to -inf), calc_diff {diff:.1e}")
    tokens = float(lens.long().sum())
    rates = dict(nbytes=tokens * (D + 4) + B * next_n * max_context_len * 4 + B * next_n * H * (D + 4),
                 flops=2.0 * next_n * tokens * H * D, ceiling="copy")
    t_theirs, t_ours = bench._interleaved([(theirs, sets), (ours, sets)], 3, 30)
    print(results.add(case, "baseline", t_theirs, label=label, **rates))
    print(results.add(case, "default", t_ours, baseline=t_theirs, **rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="unknown commit", help="the DeepGEMM commit that was built (recorded)")
    args = parser.parse_args()
    try:
        import deep_gemm
    except ImportError:
        sys.exit("deep_gemm is not importable: build DeepGEMM for sm_90a and put it on PYTHONPATH")
    checks.set_data_checks(False)  # the default a user gets
    ceilings = bench.measure_ceilings()
    print(ceilings)
    results = bench.Results("deepgemm_side_by_side", ceilings)
    label = f"DeepGEMM {args.commit}"
    for S_q, S_k in MQA_CASES:
        side_by_side_mqa(results, deep_gemm, label, S_q, S_k)
        torch.cuda.empty_cache()
    for B, context, next_n in PAGED_CASES:
        side_by_side_paged(results, deep_gemm, label, B, context, next_n)
        torch.cuda.empty_cache()
    print("wrote", results.write())


if __name__ == "__main__":
    main()
