"""The public GPU calls are the fast path: no host synchronisation with default arguments.

Two proofs, on the GPU:

* every public GPU entry point runs, with its default arguments and data checks off (the default),
  under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising torch call
  (``.item()``, a device-to-host copy, ``nonzero``...): a future change that adds one fails here;
* one whole decode step of the indexer and the sparse attention (paged FP8 logits -> top-k ->
  sparse MLA decode) is captured in a CUDA graph and replayed on new inputs, equal to the same
  calls made eagerly. A capture fails on any synchronisation, CuPy's included, and on any
  allocation or launch that does not go to the capturing stream.

And on the CPU: with data checks off, what the switch controls is really skipped for GPU tensors
(emulated by a device-less check of the rule), and always done for CPU tensors.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from dsa_tutorial import checks, compare, fp8, latent_cache, paged
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.indexer import index_scores_cuda
from dsa_tutorial.mla import kv_compress_cuda, latent_scores_cuda
from dsa_tutorial.norm import rms_norm_cuda
from dsa_tutorial.rope import apply_rope_cuda
from dsa_tutorial.sparse_attention import sparse_mla_attention, sparse_mla_attention_cuda
from dsa_tutorial.sparse_prefill import sparse_mla_prefill_cuda
from dsa_tutorial.topk import select_topk, select_topk_cuda

V32 = ModelArgs()


@contextlib.contextmanager
def no_sync():
    """Data checks off (the default a user gets) and any synchronising torch call an error."""
    with checks.data_checks(False):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


def paged_batch(context_lens, next_n=1, H=64, D=128, seed=0, max_context_len=8192):
    """A paged FP8 indexer-key cache with shuffled blocks, and its queries (all on the GPU). Its
    shapes depend on len(context_lens) and max_context_len only (each row maps max_context_len tokens)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    B = len(context_lens)
    max_blocks = -(-max_context_len // 64)
    num_blocks = B * max_blocks + 3
    block_table = torch.randperm(num_blocks, device="cuda", generator=g)[:B * max_blocks].int().view(B, max_blocks)
    values = torch.randn(num_blocks * 64, D, device="cuda", generator=g).to(torch.float8_e4m3fn)
    scales = torch.rand(num_blocks * 64, device="cuda", generator=g) + 0.5
    flat = torch.cat([values.view(torch.uint8).view(num_blocks, 64 * D),
                      scales.view(torch.uint8).view(num_blocks, 64 * 4)], dim=1)
    kv_cache = flat.view(num_blocks, 64, 1, D + 4).contiguous()
    q = torch.randn(B, next_n, H, D, device="cuda", generator=g).to(torch.float8_e4m3fn)
    weights = torch.randn(B * next_n, H, device="cuda", generator=g)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    return q, kv_cache, weights, lens, block_table


def public_calls():
    """(name, thunk) for every public GPU entry point, at realistic shapes, default arguments."""
    g = torch.Generator(device="cuda").manual_seed(1)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    calls = []
    # RMSNorm, MLA compression (+ RoPE), decode scores, RoPE
    x = randn(4096, 7168, dtype=torch.bfloat16)
    calls.append(("rms_norm_cuda", lambda: rms_norm_cuda(x, randn(7168, dtype=torch.bfloat16))))
    kv = randn(4096, V32.latent_dim, dtype=torch.bfloat16)
    weight = randn(V32.kv_lora_rank)
    positions = torch.randint(0, V32.max_seq_len, (4096,), device="cuda", generator=g)
    calls.append(("kv_compress_cuda", lambda: kv_compress_cuda(kv, weight, V32)))
    calls.append(("kv_compress_cuda + RoPE", lambda: kv_compress_cuda(kv, weight, V32, positions)))
    x_rope = randn(4096, 128, 64, dtype=torch.bfloat16)
    calls.append(("apply_rope_cuda", lambda: apply_rope_cuda(x_rope, positions, "interleaved", V32)))
    q_abs4 = randn(8, 1, 128, 512, dtype=torch.bfloat16)
    q_rope4 = randn(8, 1, 128, 64, dtype=torch.bfloat16)
    latent = randn(8, 4096, 576, dtype=torch.bfloat16)
    calls.append(("latent_scores_cuda", lambda: latent_scores_cuda(q_abs4, q_rope4, latent, V32)))
    # the lightning indexer: bf16 scores, FP8 quantisation, FP8 logits (prefill), paged logits (decode)
    q_idx, w, k_idx = randn(1024, 64, 128, dtype=torch.bfloat16), randn(1024, 64), randn(4096, 128, dtype=torch.bfloat16)
    calls.append(("index_scores_cuda", lambda: index_scores_cuda(q_idx, w, k_idx, causal=True)))
    x_q = randn(8192, 128)
    calls.append(("act_quant_cuda", lambda: fp8.act_quant_cuda(x_q)))
    q8 = randn(2048, 64, 128).to(torch.float8_e4m3fn)
    k8, k_scale = randn(8192, 128).to(torch.float8_e4m3fn), torch.rand(8192, device="cuda", generator=g) + 0.5
    ks, ke = fp8.causal_ks_ke([2048], device="cuda")
    ke = ke + (8192 - 2048)  # the 2048 queries are the last tokens of an 8192-token sequence
    calls.append(("mqa_logits_cuda", lambda: fp8.mqa_logits_cuda(q8, (k8, k_scale), randn(2048, 64), ks, ke)))
    for next_n in (1, 2):
        lens = [int(n) for n in torch.randint(1, 8192, (64,), generator=torch.Generator().manual_seed(next_n))]
        q, kv_cache, weights, context_lens, block_table = paged_batch(lens, next_n)
        num_sms = paged.schedule_size(q.device)
        schedule = paged.paged_mqa_logits_metadata(context_lens, 64, num_sms)
        calls.append((f"paged_mqa_logits_metadata next_n={next_n}",
                      lambda c=context_lens, n=num_sms: paged.paged_mqa_logits_metadata(c, 64, n)))
        calls.append((f"paged_mqa_logits_cuda next_n={next_n}",
                      lambda a=(q, kv_cache, weights, context_lens, block_table, schedule):
                      paged.paged_mqa_logits_cuda(*a, 8192)))
    # top-k over decode rows with their positions, and the sparse MLA decode
    scores = randn(64, 32768)
    last = torch.randint(0, 32768, (64,), device="cuda", generator=g)
    calls.append(("select_topk_cuda", lambda: select_topk_cuda(scores, 2048, last)))
    calls.append(("select_topk_cuda causal", lambda: select_topk_cuda(scores[:, :4096].contiguous(), 2048)))
    q_abs, q_rope = randn(16, 128, 512, dtype=torch.bfloat16), randn(16, 128, 64, dtype=torch.bfloat16)
    cache = randn(16, 8192, 576, dtype=torch.bfloat16)
    indices = torch.stack([torch.randperm(8192, device="cuda", generator=g)[:2048] for _ in range(16)]).int()
    calls.append(("sparse_mla_attention_cuda",
                  lambda: sparse_mla_attention_cuda(q_abs, q_rope, cache, indices, V32.softmax_scale)))
    # sparse decode over the FP8 latent cache: 2 draft tokens, 64-token pages, one split per SM row
    fp8_cache = latent_cache.quantize(randn(16 * 128, 64, 1, 576, dtype=torch.bfloat16))
    q_fp8 = randn(16, 2, 128, 576, dtype=torch.bfloat16)
    fp8_indices = torch.stack([torch.randperm(16 * 128 * 64, device="cuda", generator=g)[:2048]
                               for _ in range(32)]).int().view(16, 2, 2048)  # distinct in each row
    calls.append(("sparse_mla_decode_fp8_cuda",
                  lambda: latent_cache.sparse_mla_decode_fp8_cuda(q_fp8, fp8_cache, fp8_indices, V32.softmax_scale)))
    # sparse prefill: 512 tokens of one sequence, each its own 2048 of the 8192 cached
    q_prefill = randn(512, 128, 576, dtype=torch.bfloat16)
    kv_prefill = randn(8192, 1, 576, dtype=torch.bfloat16)
    prefill_indices = torch.stack([torch.randperm(8192, device="cuda", generator=g)[:2048]
                                   for _ in range(512)]).int().view(512, 1, 2048)  # distinct in each row
    calls.append(("sparse_mla_prefill_cuda",
                  lambda: sparse_mla_prefill_cuda(q_prefill, kv_prefill, prefill_indices, V32.softmax_scale)))
    return calls


@pytest.mark.gpu
def test_every_public_call_makes_no_host_synchronisation():
    calls = public_calls()
    for _, call in calls:
        call()  # compile and load each kernel first: that is a one-time cost, not the call's
    torch.cuda.synchronize()
    synchronised = []
    for name, call in calls:
        try:
            with no_sync():
                call()
        except RuntimeError as exc:
            if "synchroniz" not in str(exc):
                raise
            synchronised.append(f"{name}: {exc}")
    torch.cuda.synchronize()
    assert not synchronised, "public calls that synchronise with the host:\n" + "\n".join(synchronised)


@pytest.mark.gpu
def test_the_sync_detector_detects():
    # the guard above is only worth something if it fires: a data check on a GPU tensor must raise
    positions = torch.arange(8, device="cuda")
    with pytest.raises(RuntimeError, match="synchroniz"):
        with no_sync(), checks.data_checks(True):
            checks.check_range(positions, "positions", 0, 7)


def decode_step(q_idx, kv_cache, w_idx, context_lens, block_table, schedule, max_context_len,
                q_abs, q_rope, latent, topk, softmax_scale):
    """One decode step of DSA's sparse path: paged FP8 index logits -> top-k -> sparse MLA decode."""
    logits = paged.paged_mqa_logits_cuda(q_idx, kv_cache, w_idx, context_lens, block_table, schedule,
                                         max_context_len)  # [B, max_context_len]
    last = context_lens.long() - 1  # the new token's position: it sees its whole context
    indices = select_topk_cuda(logits, topk, last)  # [B, topk]
    return logits, indices, sparse_mla_attention_cuda(q_abs, q_rope, latent, indices, softmax_scale)


@pytest.mark.gpu
def test_a_decode_step_runs_as_a_cuda_graph():
    B, S, topk = 8, 4096, 512

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        lens = [int(n) for n in torch.randint(topk // 2, S + 1, (B,), generator=g)]
        q_idx, kv_cache, w_idx, context_lens, block_table = paged_batch(lens, 1, seed=seed, max_context_len=S)
        gd = torch.Generator(device="cuda").manual_seed(seed)
        q_abs = torch.randn(B, 128, 512, device="cuda", generator=gd).bfloat16()
        q_rope = torch.randn(B, 128, 64, device="cuda", generator=gd).bfloat16()
        latent = torch.randn(B, S, 576, device="cuda", generator=gd).bfloat16()
        return dict(q_idx=q_idx, kv_cache=kv_cache, w_idx=w_idx, context_lens=context_lens,
                    block_table=block_table, q_abs=q_abs, q_rope=q_rope, latent=latent)

    static = inputs(0)
    num_sms = paged.schedule_size()

    def step():
        schedule = paged.paged_mqa_logits_metadata(static["context_lens"], 64, num_sms)
        return decode_step(static["q_idx"], static["kv_cache"], static["w_idx"], static["context_lens"],
                           static["block_table"], schedule, S, static["q_abs"], static["q_rope"],
                           static["latent"], topk, V32.softmax_scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # warm-up: compile, load, size the allocator's pools
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with no_sync(), torch.cuda.graph(graph):
        graph_out = step()

    for seed in (1, 2):  # new data in the same buffers, as an engine does from step to step
        fresh = inputs(seed)
        for name, tensor in fresh.items():
            static[name].copy_(tensor)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for name, got, want in zip(("logits", "indices", "output"), graph_out, eager):
            assert torch.equal(got, want), f"graph replay differs from the eager calls in {name} (seed {seed})"
        # and the chain is right: top-k of the logits, and the sparse attention over what it chose
        with checks.data_checks(True):
            last = static["context_lens"].long() - 1
            assert torch.equal(eager[1], select_topk(eager[0], topk, last).to(eager[1].device))
            c_kv, k_rope = static["latent"].float().split([512, 64], dim=-1)
            ref = sparse_mla_attention(static["q_abs"].float()[:, None], static["q_rope"].float()[:, None],
                                       c_kv, k_rope, eager[1][:, None], V32.softmax_scale)[:, 0]
            scale = ref.abs().max().item()
            compare.assert_close(eager[2].float(), ref, atol=1e-2 * scale, rtol=1e-2, max_calc_diff=1e-5,
                                 name="decode step output")
