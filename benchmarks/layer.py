"""Does DSA pay? The attention of one V3.2 layer, dense against DSA, from 4K to 128K tokens, on an H200.

    python benchmarks/layer.py            (from the repository root, on a GPU; a few minutes)

Writes book/data/layer.json: the ceilings and environment of the run, and for each context length L
the time per token of

* prefill, one sequence of L tokens:
  - dense: torch's scaled_dot_product_attention with its flash backend on the explicit MHA form of
    MLA (128 heads, q and k of 192 = 128 + 64 dims, v padded from 128 to 192 because the flash
    backend takes one head dim), causal: the best dense prefill torch offers here;
  - DSA, with this package's kernels, query chunks of CHUNK tokens: the indexer's FP8 logits
    (fp8.mqa_logits_cuda, causal key ranges), top-k (topk.select_topk_cuda, k = 2048) and sparse
    MLA prefill over the selected latents (sparse_prefill.sparse_mla_prefill_cuda), each timed over
    the whole sequence, and the three chained;
* decode, a batch of DECODE_BATCH sequences of L tokens each, one new token each:
  - dense: absorbed MLA over the bf16 latent cache (scores q [576] . every cached latent, float32
    softmax, p . c^KV: two cuBLAS batched GEMMs), what a dense decode reads: the whole cache;
  - DSA: the schedule and the indexer's FP8 logits over its paged key cache
    (paged.paged_mqa_logits_metadata + paged_mqa_logits_cuda), top-k with each sequence's last
    position, the positions turned into cache slots through the block table (one torch gather),
    and sparse MLA decode over the FP8 latent cache (latent_cache.sparse_mla_decode_fp8_cuda);
  both decode steps (and DSA's components) are timed as CUDA-graph replays, as an engine runs a
  decode step (a step's GPU work is a few hundred microseconds, less than the Python that launches
  it eagerly); the eager call is recorded beside it as eager_us;
and the peak GPU memory of each (torch.cuda.max_memory_allocated, inputs included). Beside the
measured dense times, bound_us is what dense attention would cost at this run's ceilings (prefill:
its FLOPs at the bf16 GEMM rate; decode: the bf16 cache read once at the copy bandwidth), since
torch's dense decode is far from its bound (it writes and re-reads float32 scores).

Only the attention is timed: the projections (wq_a, wq_b, wkv_a, wkv_b, wo, the indexer's own
projections) cost the same per token in both and are left out. The paper's Figure 3 prices the
whole model per million tokens on H800s; the ratios here are for the part DSA changes.
"""
from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import bench, checks, fp8, latent_cache, paged  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402
from dsa_tutorial.topk import select_topk_cuda  # noqa: E402

V32 = ModelArgs()
LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
TOPK = V32.index_topk  # 2048
N_H, D_QK, D_V, D_LATENT = V32.n_heads, V32.qk_nope_head_dim + V32.qk_rope_head_dim, V32.v_head_dim, V32.latent_dim
H_I, D_I = V32.index_n_heads, V32.index_head_dim
CHUNK = 4096  # prefill queries per indexer call: the logits of a chunk are CHUNK x L float32
DECODE_BATCH = 32
OUT = bench.RESULTS_DIR.parent / "layer.json"  # book/data/layer.json, where figures.layer_results reads it


def timed(fn, reps: int) -> float:
    """Median microseconds of fn() over `reps` calls after one warm-up (bench.benchmark, no inputs)."""
    return bench.benchmark(fn, lambda: (), warmup=1, reps=reps).median_us


def graph_timed(fn, reps: int) -> float:
    """Median microseconds of one replay of fn() captured as a CUDA graph: what an engine that
    replays its decode step pays, without the Python of the calls (every call here is capturable:
    none waits for the GPU)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench.benchmark(graph.replay, lambda: (), warmup=2, reps=reps).median_us


def peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


# ----------------------------------------------------------------------------------------- prefill

def dense_prefill(L: int, reps: int) -> dict:
    q, k, v = (torch.randn(1, N_H, L, D_QK, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def run():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=V32.softmax_scale)

    result = {"total_us": timed(run, reps), "peak_bytes": peak_bytes(run)}
    return result


def dsa_prefill(L: int, reps: int, sparse_prefill) -> dict:
    g = torch.Generator(device="cuda").manual_seed(L)
    q_idx = torch.randn(L, H_I, D_I, device="cuda", generator=g).to(torch.float8_e4m3fn)
    k_idx = torch.randn(L, D_I, device="cuda", generator=g).to(torch.float8_e4m3fn)
    k_scale = torch.rand(L, device="cuda", generator=g) + 0.5
    weights = torch.randn(L, H_I, device="cuda", generator=g)
    ks = torch.zeros(L, dtype=torch.int32, device="cuda")
    ke = torch.arange(1, L + 1, dtype=torch.int32, device="cuda")  # token t sees keys 0 .. t
    q = torch.randn(L, N_H, D_LATENT, device="cuda", generator=g).bfloat16()
    kv = torch.randn(L, 1, D_LATENT, device="cuda", generator=g).bfloat16()
    chunks = [(start, min(start + CHUNK, L)) for start in range(0, L, CHUNK)]
    logits = torch.empty(CHUNK, L, device="cuda")
    positions = torch.arange(L, device="cuda")
    # a causal selection for every token, as top-k would give it (random among the visible tokens)
    indices = (torch.rand(L, TOPK, device="cuda", generator=g) * (positions[:, None] + 1)).int()
    indices = torch.where(torch.arange(TOPK, device="cuda")[None, :] <= positions[:, None], indices, -1)[:, None]

    def indexer():
        for a, b in chunks:
            fp8.mqa_logits_cuda(q_idx[a:b], (k_idx, k_scale), weights[a:b], ks[a:b], ke[a:b], out=logits[:b - a])

    def topk():
        for a, b in chunks:
            select_topk_cuda(logits[:b - a], TOPK, positions[a:b])

    def attention():
        for a, b in chunks:
            sparse_prefill(q[a:b], kv, indices[a:b], V32.softmax_scale)

    def chained():
        for a, b in chunks:
            chunk_logits = fp8.mqa_logits_cuda(q_idx[a:b], (k_idx, k_scale), weights[a:b], ks[a:b], ke[a:b],
                                               out=logits[:b - a])
            selected = select_topk_cuda(chunk_logits, TOPK, positions[a:b])
            sparse_prefill(q[a:b], kv, selected[:, None], V32.softmax_scale)

    result = {"indexer_us": timed(indexer, reps), "topk_us": timed(topk, reps),
              "attention_us": timed(attention, reps), "total_us": timed(chained, reps),
              "peak_bytes": peak_bytes(chained)}
    return result


# ----------------------------------------------------------------------------------------- decode

def dense_decode(L: int, reps: int) -> dict:
    B = DECODE_BATCH
    latent = torch.randn(B, L, D_LATENT, device="cuda").bfloat16()  # [c^KV | k^R] of every cached token
    q = torch.randn(B, N_H, D_LATENT, device="cuda").bfloat16()  # [q_abs | q_rope] of the new token

    def run():
        p = torch.softmax(torch.bmm(q, latent.transpose(1, 2)).float() * V32.softmax_scale, dim=-1)
        return torch.bmm(p.bfloat16(), latent[..., :512])

    result = {"total_us": graph_timed(run, reps), "eager_us": timed(run, reps), "peak_bytes": peak_bytes(run)}
    return result


def dsa_decode(L: int, reps: int) -> dict:
    B = DECODE_BATCH
    g = torch.Generator(device="cuda").manual_seed(L + 1)
    blocks_per_seq = L // paged.BLOCK_KV
    num_blocks = B * blocks_per_seq
    block_table = torch.randperm(num_blocks, device="cuda", generator=g).int().view(B, blocks_per_seq)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    # the indexer's key cache: e4m3 keys and float32 scales, DeepGEMM's paged layout
    values = torch.randint(0, 0x78, (num_blocks, paged.BLOCK_KV * D_I), device="cuda", generator=g, dtype=torch.uint8)
    scales = (torch.rand(num_blocks, paged.BLOCK_KV, device="cuda", generator=g) + 0.5).view(torch.uint8)
    index_cache = torch.cat([values, scales], dim=1).view(num_blocks, paged.BLOCK_KV, 1, D_I + 4)
    q_idx = torch.randn(B, 1, H_I, D_I, device="cuda", generator=g).to(torch.float8_e4m3fn)
    weights = torch.randn(B, H_I, device="cuda", generator=g)
    # the FP8 latent cache, 656 bytes a token, in the same blocks as the indexer keys
    cache = latent_cache.quantize(torch.randn(num_blocks, paged.BLOCK_KV, 1, D_LATENT, device="cuda",
                                              generator=g).bfloat16())
    q = torch.randn(B, 1, N_H, D_LATENT, device="cuda", generator=g).bfloat16()
    num_sms = paged.schedule_size()
    last = (lens - 1).long()
    rows = torch.arange(B, device="cuda")[:, None]

    def step():
        schedule = paged.paged_mqa_logits_metadata(lens, paged.BLOCK_KV, num_sms)
        logits = paged.paged_mqa_logits_cuda(q_idx, index_cache, weights, lens, block_table, schedule, L)
        selected = select_topk_cuda(logits, TOPK, last)  # [B, k] positions, -1 where unused
        slots = block_table[rows, selected.clamp(min=0) // paged.BLOCK_KV] * paged.BLOCK_KV + selected % paged.BLOCK_KV
        slots = torch.where(selected >= 0, slots, -1).int()[:, None]  # [B, 1, k] cache slots
        return latent_cache.sparse_mla_decode_fp8_cuda(q, cache, slots, V32.softmax_scale)

    schedule = paged.paged_mqa_logits_metadata(lens, paged.BLOCK_KV, num_sms)
    logits = paged.paged_mqa_logits_cuda(q_idx, index_cache, weights, lens, block_table, schedule, L)
    selected = select_topk_cuda(logits, TOPK, last)
    slots = (block_table[rows, selected // paged.BLOCK_KV] * paged.BLOCK_KV + selected % paged.BLOCK_KV).int()[:, None]
    result = {
        "indexer_us": graph_timed(lambda: paged.paged_mqa_logits_cuda(q_idx, index_cache, weights, lens,
                                                                       block_table, schedule, L), reps),
        "topk_us": graph_timed(lambda: select_topk_cuda(logits, TOPK, last), reps),
        "attention_us": graph_timed(lambda: latent_cache.sparse_mla_decode_fp8_cuda(q, cache, slots,
                                                                                     V32.softmax_scale), reps),
        "total_us": graph_timed(step, reps),
        "eager_us": timed(step, reps),
        "peak_bytes": peak_bytes(step),
    }
    return result


def main() -> None:
    torch.manual_seed(0)
    checks.set_data_checks(False)  # as a user gets the package: nothing read back from the GPU
    try:
        from dsa_tutorial.sparse_prefill import sparse_mla_prefill_cuda
    except ImportError:
        sparse_mla_prefill_cuda = None
        print("no sparse prefill kernel in this checkout: DSA prefill is skipped")
    ceilings = bench.measure_ceilings()
    print(ceilings)
    rows = []
    for L in LENGTHS:
        reps = 3 if L >= 65536 else 5
        row = {"L": L, "prefill": {"dense": dense_prefill(L, reps)}, "decode": {}}
        # what dense attention would cost at the ceilings of this run: the prefill's MHA FLOPs (q k^T over
        # 192 dims, p v over 128, causal pairs) at the bf16 GEMM rate; the decode's bf16 cache read once
        pairs = L * (L + 1) / 2
        row["prefill"]["dense"]["bound_us"] = 2 * pairs * N_H * (D_QK + D_V) / (ceilings.bf16_tflops * 1e12) * 1e6
        if sparse_mla_prefill_cuda is not None:
            row["prefill"]["dsa"] = dsa_prefill(L, reps, sparse_mla_prefill_cuda)
        torch.cuda.empty_cache()
        row["decode"]["dense"] = dense_decode(L, reps)
        row["decode"]["dense"]["bound_us"] = DECODE_BATCH * L * D_LATENT * 2 / (ceilings.copy_tbps * 1e12) * 1e6
        torch.cuda.empty_cache()
        row["decode"]["dsa"] = dsa_decode(L, reps)
        torch.cuda.empty_cache()
        for phase, per in (("prefill", L), ("decode", DECODE_BATCH)):
            parts = row[phase]
            line = ", ".join(f"{name} {parts[name]['total_us'] / per:8.2f} us/token" for name in parts)
            ratio = (f" -> dense / DSA = {parts['dense']['total_us'] / parts['dsa']['total_us']:.2f}x"
                     if "dsa" in parts else "")
            print(f"L = {L:6d} {phase:7s}: {line}{ratio}")
        rows.append(row)
    payload = {
        "what": "attention of one DeepSeek-V3.2 layer, dense vs DSA (k = 2048); times in microseconds for the "
                "whole prefill of one sequence of L tokens, or one decode step of a batch",
        "decode_batch": DECODE_BATCH, "prefill_chunk": CHUNK, "topk": TOPK,
        "ceilings": {"copy_tbps": round(ceilings.copy_tbps, 4), "bf16_tflops": round(ceilings.bf16_tflops, 2),
                     "fp8_tflops": round(ceilings.fp8_tflops, 2)},
        "environment": {"device": ceilings.device, "torch": torch.__version__, "cuda": torch.version.cuda,
                        "python": platform.python_version(),
                        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")},
        "lengths": rows,
    }
    OUT.write_text(json.dumps(payload, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
