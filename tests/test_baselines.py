"""The torch baselines compute what the references compute (on the CPU, float32 unless the
baseline's dtype says otherwise): a kernel measured against a baseline that computes something
else would be a meaningless speed-up."""
from __future__ import annotations

import pytest
import torch

from dsa_tutorial import baselines, compare, fp8, mla, paged, rope
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.indexer import index_scores
from dsa_tutorial.norm import rms_norm
from dsa_tutorial.sparse_attention import sparse_mla_attention

ARGS = ModelArgs.tiny()


@pytest.mark.parametrize("with_rope", [False, True])
def test_kv_compress_torch(with_rope):
    g = torch.Generator().manual_seed(0)
    T, d_c = 37, ARGS.kv_lora_rank
    kv = torch.randn(T, ARGS.latent_dim, generator=g)
    weight = 1 + 0.2 * torch.randn(d_c, generator=g)
    positions = torch.randint(0, ARGS.max_seq_len, (T,), generator=g) if with_rope else None
    freqs_cis = rope.precompute_freqs_cis(ARGS).to(torch.complex64)
    got = baselines.kv_compress_torch(kv, weight, ARGS, positions, freqs_cis)
    k_rope = kv[:, d_c:].double()
    if with_rope:
        k_rope = rope.apply_rope(k_rope, positions, "interleaved", ARGS)
    want = torch.cat([rms_norm(kv[:, :d_c].double(), weight.double(), ARGS.norm_eps), k_rope], dim=-1)
    compare.assert_close(got, want, atol=1e-5, rtol=1e-5, name="kv_compress_torch")


@pytest.mark.parametrize("layout", rope.LAYOUTS)
def test_apply_rope_torch(layout):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 3, ARGS.qk_rope_head_dim, generator=g)
    positions = torch.randint(0, ARGS.max_seq_len, (23,), generator=g)
    freqs_cis = rope.precompute_freqs_cis(ARGS).to(torch.complex64)
    got = baselines.apply_rope_torch(x, positions, freqs_cis, layout == "interleaved")
    compare.assert_close(got, rope.apply_rope(x.double(), positions, layout, ARGS), atol=1e-5, rtol=1e-5,
                         name=f"apply_rope_torch {layout}")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_latent_scores_torch(dtype, tol):
    g = torch.Generator().manual_seed(2)
    B, T, S, n_h, d_c, d_r = 2, 1, 29, ARGS.n_heads, ARGS.kv_lora_rank, ARGS.qk_rope_head_dim
    q_abs, q_rope = torch.randn(B, T, n_h, d_c, generator=g), torch.randn(B, T, n_h, d_r, generator=g)
    latent = torch.randn(B, S, d_c + d_r, generator=g)
    want = mla.latent_scores(q_abs.double(), q_rope.double(), latent[..., :d_c].double(), latent[..., d_c:].double(),
                             ARGS)
    got = baselines.latent_scores_torch(q_abs.to(dtype), q_rope.to(dtype), latent.to(dtype), ARGS.softmax_scale)
    assert got.dtype == torch.float32 and got.shape == want.shape
    compare.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol, name="latent_scores_torch")


def test_index_scores_torch_in_chunks():
    g = torch.Generator().manual_seed(3)
    T, S, H, D = 37, 41, 4, 16
    q, w, k = torch.randn(T, H, D, generator=g), torch.randn(T, H, generator=g), torch.randn(S, D, generator=g)
    got = baselines.index_scores_torch(q, w, k, chunk=8)  # 5 chunks, the last one ragged
    compare.assert_close(got, index_scores(q.double(), w.double(), k.double()), atol=1e-4, rtol=1e-5,
                         name="index_scores_torch")


def test_sparse_attention_torch_dense_and_gathered():
    g = torch.Generator().manual_seed(4)
    B, S, k, n_h, d_c, d_r, scale = 2, 50, 7, 3, 16, 8, 0.3
    q, kv = torch.randn(B, n_h, d_c + d_r, generator=g), torch.randn(B, S, d_c + d_r, generator=g)
    indices = torch.stack([torch.randperm(S, generator=g)[:k] for _ in range(B)]).int()
    mask = torch.full((B, 1, S), float("-inf")).scatter_(-1, indices[:, None].long(), 0.0)
    want = sparse_mla_attention(q[:, None, :, :d_c].double(), q[:, None, :, d_c:].double(), kv[..., :d_c].double(),
                                kv[..., d_c:].double(), indices[:, None], scale)[:, 0]
    for got, name in ((baselines.sparse_attention_dense_torch(q, kv, mask, scale, d_c), "dense"),
                      (baselines.sparse_attention_gathered_torch(q, kv, indices, scale, d_c), "gathered")):
        compare.assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"sparse_attention_{name}_torch")


def test_mqa_logits_torch():
    g = torch.Generator().manual_seed(5)
    S_q, S_k, H, D = 19, 45, 4, 32
    q = torch.randn(S_q, H, D, generator=g).to(torch.float8_e4m3fn)
    k = torch.randn(S_k, D, generator=g).to(torch.float8_e4m3fn)
    k_scale, weights = torch.rand(S_k, generator=g) + 0.5, torch.randn(S_q, H, generator=g)
    ks = torch.randint(0, 20, (S_q,), generator=g).int()
    ke = (ks + torch.randint(0, 30, (S_q,), generator=g)).clamp(max=S_k).int()
    want = fp8.mqa_logits(q, (k, k_scale), weights, ks, ke)
    got = baselines.mqa_logits_torch(q, (k, k_scale), weights, ks, ke, chunk=8)
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    # bf16 GEMMs: each head's score is rounded to bf16 (2^-9 relative) before the weighted sum
    compare.assert_close(got[finite], want[finite], atol=1e-2 * want[finite].abs().max().item(), rtol=1e-2,
                         name="mqa_logits_torch")


@pytest.mark.parametrize("next_n", [1, 2])
def test_paged_mqa_logits_torch(next_n):
    g = torch.Generator().manual_seed(6)
    B, H, D, block = 3, 4, 32, paged.BLOCK_KV
    lens = torch.tensor([5, 130, 64], dtype=torch.int32)
    max_blocks, num_blocks = 3, 9
    kv_cache = paged.new_kv_cache(num_blocks, D)
    block_table = torch.randperm(num_blocks, generator=g)[:B * max_blocks].view(B, max_blocks).int()
    for b in range(B):
        n = int(lens[b])
        k_fp8, k_scale = fp8.act_quant(torch.randn(n, D, generator=g), block_size=D)
        slots = block_table[b, torch.arange(n) // block].long() * block + torch.arange(n) % block
        paged.store_kv(kv_cache, k_fp8, k_scale, slots)
    q = torch.randn(B, next_n, H, D, generator=g).to(torch.float8_e4m3fn)
    weights = torch.randn(B * next_n, H, generator=g)
    want = paged.paged_mqa_logits(q, kv_cache, weights, lens, block_table, None, 130)
    got = baselines.paged_mqa_logits_torch(q, kv_cache, weights, lens, block_table, 130, chunk=2)
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    compare.assert_close(got[finite], want[finite], atol=1e-2 * want[finite].abs().max().item(), rtol=1e-2,
                         name="paged_mqa_logits_torch")


def test_sparse_mla_decode_fp8_torch():
    from dsa_tutorial import latent_cache

    g = torch.Generator().manual_seed(7)
    num_blocks, block_size, B, s_q, h, k = 6, 16, 2, 2, 4, 10
    kv = torch.randn(num_blocks, block_size, 1, 576, generator=g).bfloat16()
    cache = latent_cache.quantize(kv)
    indices = torch.stack([torch.randperm(num_blocks * block_size, generator=g)[:k] for _ in range(B * s_q)])
    indices = indices.view(B, s_q, k).int()
    q = torch.randn(B, s_q, h, 576, generator=g).bfloat16()
    want, _ = latent_cache.sparse_mla_decode_fp8(q, cache, indices, 0.1)
    got = baselines.sparse_mla_decode_fp8_torch(q, cache, indices, 0.1)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # bf16 scores and probabilities: a few 2^-8 of the output's scale
    compare.assert_close(got.float(), want, atol=3e-2 * want.abs().max().item(), rtol=3e-2,
                         name="sparse_mla_decode_fp8_torch")
