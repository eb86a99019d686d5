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

from dsa_tutorial import bench, checks, fp8, paged  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402
from dsa_tutorial.sparse_attention import sparse_mla_attention_cuda  # noqa: E402
from dsa_tutorial.topk import select_topk_cuda  # noqa: E402

V32 = ModelArgs()
H, D = 64, 128


def paged_inputs(B: int, mean_context: int, next_n: int, seed: int = 0):
    """A paged indexer-key cache holding B contexts of 0.7-1.3 x mean_context tokens, blocks shuffled."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = ((0.7 + 0.6 * torch.rand(B, generator=g, device="cuda")) * mean_context).int()
    max_context_len = int(lens.max())
    max_blocks = -(-max_context_len // 64)
    num_blocks = B * max_blocks
    block_table = torch.randperm(num_blocks, device="cuda", generator=g).int().view(B, max_blocks)
    values = torch.randn(num_blocks * 64, D, device="cuda", generator=g).to(torch.float8_e4m3fn)
    scales = torch.rand(num_blocks * 64, device="cuda", generator=g) + 0.5
    kv_cache = torch.cat([values.view(torch.uint8).view(num_blocks, 64 * D),
                          scales.view(torch.uint8).view(num_blocks, 256)], 1).view(num_blocks, 64, 1, D + 4)
    q = torch.randn(B, next_n, H, D, device="cuda", generator=g).to(torch.float8_e4m3fn)
    weights = torch.randn(B * next_n, H, device="cuda", generator=g)
    schedule = paged.paged_mqa_logits_metadata(lens, 64, paged.schedule_size())
    return (q, kv_cache, weights, lens, block_table, schedule, max_context_len)


def paged_torch(q, kv_cache, weights, lens, block_table, schedule, max_context_len):
    """The same logits with torch: gather every sequence's blocks, dequantise to bf16, one batched product."""
    B, next_n = q.shape[:2]
    blocks = kv_cache.view(kv_cache.shape[0], -1)[block_table.long()]  # [B, max_blocks, 64 (D + 4)]
    k = blocks[..., : 64 * D].reshape(B, -1, D).view(torch.float8_e4m3fn).to(torch.bfloat16)  # [B, L, D]
    k_scale = blocks[..., 64 * D:].contiguous().view(torch.float32).reshape(B, -1)  # [B, L]
    scores = torch.einsum("bnhd,bld->bnhl", q.to(torch.bfloat16), k).float().relu_()  # [B, next_n, H, L]
    logits = torch.einsum("bnhl,bnh->bnl", scores, weights.view(B, next_n, H)) * k_scale[:, None]
    position = torch.arange(logits.shape[-1], device=q.device)
    limit = lens[:, None, None] - next_n + torch.arange(next_n, device=q.device)[None, :, None]
    return logits.masked_fill(position > limit, float("-inf"))[..., :max_context_len]


def mqa_inputs(S_q: int, S_k: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(S_q, H, D, device="cuda", generator=g).to(torch.float8_e4m3fn)
    k = torch.randn(S_k, D, device="cuda", generator=g).to(torch.float8_e4m3fn)
    k_scale = torch.rand(S_k, device="cuda", generator=g) + 0.5
    weights = torch.randn(S_q, H, device="cuda", generator=g)
    ks = torch.zeros(S_q, dtype=torch.int32, device="cuda")
    ke = torch.arange(S_k - S_q + 1, S_k + 1, dtype=torch.int32, device="cuda")  # the last S_q tokens, causal
    return (q, (k, k_scale), weights, ks, ke)


def mqa_torch(q, kv, weights, ks, ke, chunk=1024):
    k, k_scale = kv
    k = k.to(torch.bfloat16)
    out = torch.empty(q.shape[0], k.shape[0], device=q.device)
    position = torch.arange(k.shape[0], device=q.device)
    for start in range(0, q.shape[0], chunk):
        rows = slice(start, start + chunk)
        scores = torch.einsum("thd,sd->ths", q[rows].to(torch.bfloat16), k).float().relu_()
        logits = torch.einsum("ths,th->ts", scores, weights[rows]) * k_scale
        out[rows] = logits.masked_fill((position < ks[rows, None]) | (position >= ke[rows, None]), float("-inf"))
    return out


def sparse_inputs(B=64, S=32768, k=2048, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q_abs = torch.randn(B, 128, 512, device="cuda", generator=g).bfloat16()
    q_rope = torch.randn(B, 128, 64, device="cuda", generator=g).bfloat16()
    kv = torch.randn(B, S, 576, device="cuda", generator=g).bfloat16()
    indices = torch.argsort(torch.rand(B, S, device="cuda", generator=g), dim=-1)[:, :k].int()
    return (q_abs, q_rope, kv, indices, V32.softmax_scale)


def sparse_torch(q_abs, q_rope, kv, indices, softmax_scale):
    """Gather the selected latents, then two batched products and a softmax (bf16 operands)."""
    chosen = torch.gather(kv, 1, indices.long()[..., None].expand(-1, -1, kv.shape[-1]))  # [B, k, 576]
    q = torch.cat([q_abs, q_rope], dim=-1)  # [B, n_h, 576]
    p = torch.softmax((q @ chosen.transpose(1, 2)).float() * softmax_scale, dim=-1)  # [B, n_h, k]
    return p.to(torch.bfloat16) @ chosen[..., :512]


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
        base = bench.benchmark(mqa_torch, make, reps=5, warmup=1)
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
