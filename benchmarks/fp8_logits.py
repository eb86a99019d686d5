"""Benchmarks of chapter 7 on the GPU: act_quant, mqa_logits and paged_mqa_logits.

    python benchmarks/fp8_logits.py                            (from the repository root, on a GPU)
    python benchmarks/fp8_logits.py --logits-dtype bfloat16    (the logits kernels storing bfloat16)

Ceilings are measured first, in the same process; every kernel is quoted against them and against
a plain torch baseline. Each line times the PUBLIC call as a user makes it (`act_quant_cuda`,
`mqa_logits_cuda`, `paged_mqa_logits_cuda`, data checks off as a user gets them), first with its
default arguments (kernel=None: the best kernel that runs here), then with every version of its
kernel table (`kernel=v`), and prints beside it the kernel launches it made, replayed alone
(bench.time_call): the difference is what the Python around the kernels costs. The shapes are
issue 10's: mqa_logits 8192 x 8192 causal and 2048 x 8192 causal (the queries are the last 2048 of
8192 keys), H = 64; paged_mqa_logits B = 128 contexts of ~32K tokens with next_n = 1 and B = 256
contexts of ~8K tokens with next_n = 2 (0.7 to 1.3 x the mean, blocks shuffled). The naive mqa kernel
(kernel 1) runs at fewer repetitions: it takes tens of milliseconds; kernel 4 of each logits file
(wgmma) only where it runs (compute capability 9.0). Targets of issue 5: mqa_logits >= 40% of the FP8
GEMM ceiling, paged >= 60% of copy bandwidth (DeepGEMM: about 67% and 90% on an H200); of issue
10: the public call within 5% of its launch alone (10 us under 200 us). The torch baselines are in
dsa_tutorial.baselines, the inputs in benchmarks/cases.py; every line is also written to
book/data/kernels/{act_quant,mqa_logits,paged_mqa_logits}.json (bench.Results) for chapter 7's figures.

--logits-dtype bfloat16 times the mqa and paged logits storing bfloat16 (DeepGEMM's logits_dtype: half the
bytes of the logits written, counted so in the rates) against the same torch baselines; it prints its
lines only (chapter 7's figures and JSON files are the float32 runs) and skips act_quant.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cases import D, H, mqa_inputs, paged_inputs  # noqa: E402  (benchmarks/cases.py)
from dsa_tutorial import baselines, bench, checks, fp8, paged  # noqa: E402



def runs_here(table, version: int, name: str) -> bool:
    # kernel 4 of both tables and kernel 5 of the logits are sm_90a kernels
    reason = fp8.wgmma_why_not(torch.device("cuda")) if version >= 4 else None
    if reason:
        print(f"{name}, kernel {version} ({table[version].summary}): skipped, it {reason}")
    return reason is None


def bench_act_quant(ceilings):
    results = bench.Results("act_quant", ceilings)
    n_tokens = 64 * 8192  # the q of 8192 tokens x 64 heads
    make = lambda: (torch.randn(n_tokens, D, device="cuda").bfloat16(),)  # noqa: E731
    rates = dict(nbytes=n_tokens * D * (2 + 1) + n_tokens * 4, ceiling="copy")  # bf16 read, e4m3 + scales written
    case = f"bf16 [{n_tokens}, {D}], blocks of 128"
    baseline = bench.benchmark(lambda x: fp8.act_quant(x), make)
    print(results.add(case, "baseline", baseline, label="torch (the reference on the GPU)", **rates))
    print(results.add(case, "default", bench.time_call(fp8.act_quant_cuda, make), baseline=baseline, **rates))
    for version in fp8.ACT_QUANT_KERNELS.versions:
        timed = bench.time_call(lambda x, v=version: fp8.act_quant_cuda(x, kernel=v), make)
        print(results.add(case, "kernel", timed, version=version, baseline=baseline, **rates))
    print("wrote", results.write())


def bench_mqa_logits(results, S_q=8192, S_k=8192, logits_dtype=torch.float32):
    """Causal: the S_q queries are the last S_q of S_k keys (query i sees keys 0 .. S_k - S_q + i)."""
    make = lambda: mqa_inputs(S_q, S_k)  # noqa: E731
    logit_bytes = torch.finfo(logits_dtype).bits // 8
    rates = dict(flops=2.0 * H * D * (S_q * S_k - S_q * (S_q - 1) / 2), ceiling="fp8",  # causal work only
                 nbytes=S_q * H * (D + 4) + S_k * (D + 4) + S_q * S_k * logit_bytes)  # q, w, k, k_scale; logits
    case = f"{S_q} x {S_k} causal, H={H}" + ("" if logits_dtype == torch.float32 else f", {logits_dtype} logits")
    baseline = bench.benchmark(baselines.mqa_logits_torch, make, warmup=1, reps=3)
    print(results.add(case, "baseline", baseline, label="torch bf16 chunks", **rates))
    table = fp8.MQA_LOGITS_KERNELS
    call = lambda *args, v=None: fp8.mqa_logits_cuda(*args, kernel=v, logits_dtype=logits_dtype)  # noqa: E731
    print(results.add(case, "default", bench.time_call(call, make, reps=30), baseline=baseline, **rates))
    for version in table.versions:
        if not runs_here(table, version, case):
            continue
        slow = version == 1
        timed = bench.time_call(lambda *args, v=version: call(*args, v=v), make,
                                warmup=1 if slow else 5, reps=3 if slow else 30)
        print(results.add(case, "kernel", timed, version=version, baseline=baseline, **rates))


def bench_paged(results, B: int, mean_context: int, next_n: int, logits_dtype=torch.float32):
    make = lambda: paged_inputs(B, mean_context, next_n)  # noqa: E731
    q, kv_cache, w, lens, block_table, schedule, max_context_len = make()
    tokens = float(lens.long().sum())
    del kv_cache  # make() gives each timing its own copy
    # the cache read, the logits written (every row to max_context_len) and q, w read
    logit_bytes = torch.finfo(logits_dtype).bits // 8
    rates = dict(nbytes=tokens * (D + 4) + B * next_n * max_context_len * logit_bytes + B * next_n * H * (D + 4),
                 flops=2.0 * next_n * tokens * H * D, ceiling="copy")
    case = f"B={B}, contexts ~{mean_context // 1024}K, next_n={next_n}" + (
        "" if logits_dtype == torch.float32 else f", {logits_dtype} logits")
    baseline = bench.benchmark(lambda q, c, w, lens, bt, _, m: baselines.paged_mqa_logits_torch(q, c, w, lens, bt, m),
                               make, warmup=1, reps=3)
    print(results.add(case, "baseline", baseline, label="torch bf16 gather + GEMM", **rates))
    table = paged.PAGED_MQA_LOGITS_KERNELS
    call = lambda *args, v=None: paged.paged_mqa_logits_cuda(*args, kernel=v, logits_dtype=logits_dtype)  # noqa: E731
    timed = bench.time_call(call, make, reps=30)
    print(results.add(case, "default", timed, baseline=baseline, **rates))
    num_sms = paged.schedule_size()
    timed = bench.time_call(  # a decode step computes its schedule too: metadata (torch ops) + logits
        lambda q_, c, w_, lens_, bt, _, m: call(q_, c, w_, lens_, bt,
                                                paged.paged_mqa_logits_metadata(lens_, 64, num_sms), m),
        make, reps=30)
    print(f"{case} | paged_mqa_logits_metadata + paged_mqa_logits_cuda: {timed}")
    for version in table.versions:
        if not runs_here(table, version, case):
            continue
        timed = bench.time_call(lambda *args, v=version: call(*args, v=v), make, reps=30)
        print(results.add(case, "kernel", timed, version=version, baseline=baseline, **rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logits-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="what the logits kernels store (bfloat16: lines printed, no JSON written)")
    logits_dtype = getattr(torch, parser.parse_args().logits_dtype)
    write = logits_dtype == torch.float32  # chapter 7's figures are the float32 runs
    checks.set_data_checks(False)  # as a user gets the package (whatever DSA_CHECK says)
    ceilings = bench.measure_ceilings()
    print(ceilings)
    if write:
        bench_act_quant(ceilings)
    results = bench.Results("mqa_logits", ceilings)
    bench_mqa_logits(results, 8192, 8192, logits_dtype)
    bench_mqa_logits(results, 2048, 8192, logits_dtype)
    if write:
        print("wrote", results.write())
    results = bench.Results("paged_mqa_logits", ceilings)
    bench_paged(results, 128, 32768, 1, logits_dtype)
    bench_paged(results, 256, 8192, 2, logits_dtype)
    if write:
        print("wrote", results.write())


if __name__ == "__main__":
    main()
