"""The public calls, timed as a user makes them, against their launches alone, a baseline and a ceiling.

    python benchmarks/public_calls.py      (from the repository root, on a GPU; about a minute)

For each call (default arguments, data checks off as a user gets them): the public call, the kernel
launches it made replayed alone (bench.time_call, one of each in turn), the overhead between the two,
the host's own time per call (Python, checks, launch: hidden while it is below the GPU time), a torch baseline
doing the same work, and the fraction of the ceiling measured in the same run (copy bandwidth for
the memory-bound calls, FP8 or bf16 GEMM rate for the others). Then one decode step of the sparse
path (paged logits -> top-k -> sparse decode), called eagerly and replayed as a CUDA graph.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cases import D, H, mqa_inputs, paged_inputs, sparse_inputs  # noqa: E402  (benchmarks/cases.py)
from dsa_tutorial import baselines, bench, checks, fp8, paged  # noqa: E402
from dsa_tutorial.sparse_attention import sparse_mla_attention_cuda  # noqa: E402
from dsa_tutorial.topk import select_topk_cuda  # noqa: E402


def paged_torch(q, kv_cache, weights, lens, block_table, schedule, max_context_len):
    return baselines.paged_mqa_logits_torch(q, kv_cache, weights, lens, block_table, max_context_len)


def sparse_torch(q_abs, q_rope, kv, indices, softmax_scale):
    return baselines.sparse_attention_gathered_torch(torch.cat([q_abs, q_rope], dim=-1), kv, indices, softmax_scale)


def row(name, timed: bench.CallTiming, baseline: bench.Timing, *, flops=None, nbytes=None, ceiling=None, unit=""):
    rate = ""
    if flops is not None:
        achieved = timed.call.tflops(flops)
        rate = f"{achieved:7.1f} TFLOP/s = {100 * achieved / ceiling:4.1f}% of {unit}"
    if nbytes is not None:
        achieved = timed.call.tbps(nbytes)
        rate = f"{achieved:5.2f} TB/s = {100 * achieved / ceiling:4.1f}% of copy"
    overhead = timed.call.median_us - timed.launch.median_us
    return (f"| {name} | {timed.call.median_us:8.1f} | {timed.launch.median_us:8.1f} | {overhead:+6.1f} "
            f"({100 * overhead / timed.launch.median_us:+5.1f}%) | {timed.host_us:5.1f} | {baseline.median_us:8.1f} "
            f"({baseline.median_us / timed.call.median_us:5.2f}x) | {rate} |")


def main() -> None:
    torch.manual_seed(0)
    checks.set_data_checks(False)  # what a user gets by default (made explicit: DSA_CHECK may be set)
    ceilings = bench.measure_ceilings()
    print(ceilings)
    print("| call (default arguments) | public call us | launch alone us | overhead us | host us a call "
          "| baseline us (speed-up) | rate |")
    print("|---|---|---|---|---|---|---|")
    for B, context, next_n in ((128, 32768, 1), (256, 8192, 2)):
        make = lambda B=B, context=context, next_n=next_n: paged_inputs(B, context, next_n)  # noqa: E731
        inputs = make()
        nbytes = inputs[3].sum().item() * (D + 4) + inputs[0].shape[0] * next_n * inputs[6] * 4
        timed = bench.time_call(paged.paged_mqa_logits_cuda, make, reps=30)
        base = bench.benchmark(paged_torch, make, reps=5, warmup=1)
        print(row(f"paged_mqa_logits_cuda B={B} ctx~{context // 1024}K next_n={next_n}", timed, base,
                  nbytes=nbytes, ceiling=ceilings.copy_tbps))
    for S_q, S_k in ((8192, 8192), (2048, 8192)):
        make = lambda S_q=S_q, S_k=S_k: mqa_inputs(S_q, S_k)  # noqa: E731
        causal_pairs = S_q * S_k - S_q * (S_q - 1) / 2
        timed = bench.time_call(fp8.mqa_logits_cuda, make, reps=30)
        base = bench.benchmark(baselines.mqa_logits_torch, make, reps=5, warmup=1)
        print(row(f"mqa_logits_cuda {S_q} x {S_k} causal H={H}", timed, base, flops=2 * H * D * causal_pairs,
                  ceiling=ceilings.fp8_tflops, unit="FP8 GEMM"))
    rows, length, k = 128, 131072, 2048
    positions = torch.full((rows,), length - 1, device="cuda")
    make = lambda: (torch.randn(rows, length, device="cuda"), k, positions)  # noqa: E731
    timed = bench.time_call(select_topk_cuda, make)
    base = bench.benchmark(lambda s, k, p: s.topk(k, dim=-1, sorted=False), make)
    print(row(f"select_topk_cuda {rows} x {length}, k={k}", timed, base, nbytes=rows * (length + k) * 4,
              ceiling=ceilings.copy_tbps))
    make = sparse_inputs
    timed = bench.time_call(sparse_mla_attention_cuda, make, reps=30)
    base = bench.benchmark(sparse_torch, make, reps=10)
    flops = 2 * 64 * 128 * 2048 * (576 + 512)
    print(row("sparse_mla_attention_cuda B=64 h=128 k=2048 S=32K", timed, base, flops=flops,
              ceiling=ceilings.bf16_tflops, unit="bf16 GEMM"))
    decode_step_as_a_graph(ceilings)


def decode_step_as_a_graph(ceilings) -> None:
    """paged logits -> top-k -> sparse decode, B = 64 sequences of ~32K tokens, eager and as a CUDA graph."""
    B, context, k = 64, 32768, 2048
    q, kv_cache, weights, lens, block_table, _, max_context_len = paged_inputs(B, context, 1)
    q_abs, q_rope, latent, _, scale = sparse_inputs(B, max_context_len, k)
    num_sms = paged.schedule_size()

    def step():
        schedule = paged.paged_mqa_logits_metadata(lens, 64, num_sms)
        logits = paged.paged_mqa_logits_cuda(q, kv_cache, weights, lens, block_table, schedule, max_context_len)
        indices = select_topk_cuda(logits, k, lens.long() - 1)
        return sparse_mla_attention_cuda(q_abs, q_rope, latent, indices, scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step()), "the graph replay must equal the eager step"
    eager = bench.benchmark(step, lambda: (), reps=30)
    replay = bench.benchmark(graph.replay, lambda: (), reps=30)
    print(f"\ndecode step B={B}, contexts ~{context // 1024}K, k={k} (metadata, paged logits, top-k, sparse decode): "
          f"eager public calls {eager.median_us:.1f} us, CUDA graph replay {replay.median_us:.1f} us "
          f"({eager.median_us / replay.median_us:.2f}x); same inputs each call (L2 holds part of them)")


if __name__ == "__main__":
    main()
