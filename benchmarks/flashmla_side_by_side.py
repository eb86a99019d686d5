"""Sparse MLA decode (FP8 latent cache) and sparse MLA prefill: this package's public calls against FlashMLA's
kernels, in one process, on the same inputs, timed in turn (one call of each per repetition, CUDA events around
every call, median).

    PYTHONPATH=<folder holding an importable flash_mla> python benchmarks/flashmla_side_by_side.py

FlashMLA is not a dependency: build it from its source for sm_90a outside this repository and put it on the
path; without it the script says so and exits. The shapes are those of benchmarks/sparse_decode_fp8.py
(B 128, 128 heads, s_q 2 and 1, k 2048, pages of 64 tokens, 2.75 GB of FP8 latents) and
benchmarks/sparse_prefill.py (T 4096, S 32768, k 2048, h 128 and 64), built by their own input functions.
Both outputs are compared first (calc_diff). FLOPs are counted as FlashMLA counts them: 2 h s_q k (576 + 512) a
sequence for decode, 2 T h k (576 + 512) for prefill. Writes book/data/kernels/flashmla_side_by_side.json
(role "baseline" = FlashMLA, "default" = this package's public call with its default arguments).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dsa_tutorial import bench, checks, compare  # noqa: E402
from dsa_tutorial.latent_cache import sparse_mla_decode_fp8_cuda  # noqa: E402
from dsa_tutorial.sparse_prefill import sparse_mla_prefill_cuda  # noqa: E402

import sparse_decode_fp8 as decode  # noqa: E402
import sparse_prefill as prefill  # noqa: E402


def main() -> None:
    try:
        import flash_mla
    except ImportError:
        sys.exit("flash_mla is not importable: build FlashMLA for sm_90a and put it on PYTHONPATH")
    checks.set_data_checks(False)  # the default a user gets
    torch.manual_seed(0)
    ceilings = bench.measure_ceilings()
    print(ceilings)
    results = bench.Results("flashmla_side_by_side", ceilings)
    for s_q in (2, 1):
        q, cache, indices = decode.make_inputs(s_q)  # 2.75 GB of latents: one input set is far beyond L2
        schedule = flash_mla.get_mla_metadata()[0]

        def theirs(q, cache, indices, schedule=schedule):
            return flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, schedule, softmax_scale=decode.SCALE,
                                                    is_fp8_kvcache=True, indices=indices)

        def ours(q, cache, indices):
            return sparse_mla_decode_fp8_cuda(q, cache, indices, decode.SCALE)

        case = f"decode B={decode.B} h={decode.H} s_q={s_q} k={decode.K}"
        agree = compare.assert_close(ours(q, cache, indices)[0], theirs(q, cache, indices)[0], atol=float("inf"),
                                     max_calc_diff=1e-6, name=case).calc_diff
        print(f"{case}: outputs agree, calc_diff {agree:.1e}")
        flops = 2 * decode.B * decode.H * s_q * decode.K * (576 + 512)
        sets = [(q, cache, indices)]
        t_theirs, t_ours = bench._interleaved([(theirs, sets), (ours, sets)], 5, 30)
        print(results.add(case, "baseline", t_theirs, label="FlashMLA", flops=flops, ceiling="bf16"))
        print(results.add(case, "default", t_ours, flops=flops, ceiling="bf16", baseline=t_theirs))
        del q, cache, indices, sets
        torch.cuda.empty_cache()
    for h in (128, 64):
        def theirs(q, kv, indices):
            return flash_mla.flash_mla_sparse_fwd(q, kv, indices, prefill.SCALE, 512)

        def ours(q, kv, indices):
            return sparse_mla_prefill_cuda(q, kv, indices, prefill.SCALE)

        case = f"prefill T={prefill.T} S={prefill.S} h={h} k={prefill.K}"
        sets = bench._input_sets(prefill.make_inputs(h), 20, 8 << 30)
        agree = compare.assert_close(ours(*sets[0])[0], theirs(*sets[0])[0], atol=float("inf"), max_calc_diff=1e-6,
                                     name=case).calc_diff
        print(f"{case}: outputs agree, calc_diff {agree:.1e}")
        flops = 2 * prefill.T * h * prefill.K * (576 + 512)
        t_theirs, t_ours = bench._interleaved([(theirs, sets), (ours, sets)], 3, 20)
        print(results.add(case, "baseline", t_theirs, label="FlashMLA", flops=flops, ceiling="bf16"))
        print(results.add(case, "default", t_ours, flops=flops, ceiling="bf16", baseline=t_theirs))
        del sets
        torch.cuda.empty_cache()
    print("wrote", results.write())


if __name__ == "__main__":
    main()
