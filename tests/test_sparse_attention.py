"""Sparse MLA attention and the DSA layer: equal to masked dense MLA, causal, cached, the kernel."""
import pytest
import torch

from dsa_tutorial import compare
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.kernels import gpu_available
from dsa_tutorial.sparse_attention import DSACache, DSAttention, sparse_mla_attention, sparse_mla_decode_cuda
from dsa_tutorial.topk import select_topk

TINY = ModelArgs.tiny()


def random_latents(B, T, S, n_h, d_c, d_r, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_abs = torch.randn(B, T, n_h, d_c, generator=gen, dtype=dtype)
    q_rope = torch.randn(B, T, n_h, d_r, generator=gen, dtype=dtype)
    c_kv = torch.randn(B, S, d_c, generator=gen, dtype=dtype)
    k_rope = torch.randn(B, S, d_r, generator=gen, dtype=dtype)
    return q_abs, q_rope, c_kv, k_rope


def dense_masked(q_abs, q_rope, c_kv, k_rope, indices, scale):
    """Dense MQA-mode attention over all S latents with -inf outside each row's selection."""
    scores = (torch.einsum("bthc,bsc->bths", q_abs, c_kv) + torch.einsum("bthr,bsr->bths", q_rope, k_rope)) * scale
    S = c_kv.shape[1]
    slots = torch.where(indices >= 0, indices, S).long()  # unused slots -> an extra column, dropped
    selected = torch.zeros(*indices.shape[:2], S + 1, dtype=torch.bool).scatter_(-1, slots, True)[..., :S]
    scores = scores.masked_fill(~selected[:, :, None, :], float("-inf"))
    return torch.einsum("bths,bsc->bthc", torch.softmax(scores, dim=-1), c_kv)


def test_sparse_equals_dense_with_minus_inf_outside_the_set():
    B, T, S, n_h, d_c, d_r, k = 2, 9, 30, 3, 16, 8, 6
    q_abs, q_rope, c_kv, k_rope = random_latents(B, T, S, n_h, d_c, d_r)
    index_scores = torch.randn(B, T, S, generator=torch.Generator().manual_seed(1))
    indices = select_topk(index_scores, k, torch.arange(T) * 3)  # query t sees 3t + 1 positions
    assert bool((indices == -1).any()) and bool((indices >= 0).any())
    out = sparse_mla_attention(q_abs, q_rope, c_kv, k_rope, indices, 0.3)
    assert out.shape == (B, T, n_h, d_c) and out.dtype == torch.float64
    compare.assert_close(out, dense_masked(q_abs, q_rope, c_kv, k_rope, indices, 0.3), atol=1e-12, rtol=1e-12)


def test_slot_order_does_not_matter_and_empty_rows_give_zero():
    q_abs, q_rope, c_kv, k_rope = random_latents(1, 2, 10, 2, 8, 4)
    indices = torch.tensor([[[4, 1, 7, -1], [-1, -1, -1, -1]]], dtype=torch.int32)
    out = sparse_mla_attention(q_abs, q_rope, c_kv, k_rope, indices, 1.0)
    shuffled = torch.tensor([[[-1, 7, 4, 1], [-1, -1, -1, -1]]], dtype=torch.int32)
    compare.assert_close(sparse_mla_attention(q_abs, q_rope, c_kv, k_rope, shuffled, 1.0), out, atol=1e-12)
    assert torch.equal(out[0, 1], torch.zeros(2, 8, dtype=torch.float64))


@pytest.mark.parametrize("bad, match", [
    (dict(indices=torch.tensor([[[0, 10]]], dtype=torch.int32)), "<= 9"),
    (dict(indices=torch.tensor([[[0, -2]]], dtype=torch.int32)), ">= -1"),
    (dict(indices=torch.tensor([[[3, 3]]], dtype=torch.int32)), "repeat"),
    (dict(indices=torch.tensor([[[0, 1]]])), "int32"),
    (dict(q_rope=torch.randn(1, 1, 3, 4, dtype=torch.float64)), "n_h = 3"),
    (dict(k_rope=torch.randn(1, 10, 5, dtype=torch.float64)), "d_R = 5"),
    (dict(c_kv=torch.randn(1, 10, 8)), "float64"),
    (dict(softmax_scale=0.0), "positive"),
])
def test_bad_input(bad, match):
    q_abs, q_rope, c_kv, k_rope = random_latents(1, 1, 10, 2, 8, 4)
    args = dict(q_abs=q_abs, q_rope=q_rope, c_kv=c_kv, k_rope=k_rope,
                indices=torch.tensor([[[0, 1]]], dtype=torch.int32), softmax_scale=1.0)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        sparse_mla_attention(**args)


def test_dsa_with_k_at_least_the_length_is_dense_mla():
    torch.manual_seed(1)
    layer = DSAttention(TINY)
    h = torch.randn(2, 14, TINY.dim)
    with torch.no_grad():
        out, aux = layer(h, topk=14, return_aux=True)
        dense = layer.mla(h)
        out_big = layer(h, topk=1000)
    compare.assert_close(out, dense, atol=1e-5, rtol=1e-4)
    compare.assert_close(out_big, dense, atol=1e-5, rtol=1e-4)
    assert aux["indices"].shape == (2, 14, 14) and aux["indices"].dtype == torch.int32
    assert aux["index_scores"].shape == (2, 14, 14) and aux["index_scores"].dtype == torch.float32
    assert aux["attn_probs"].shape == (2, 14, TINY.n_heads, 14) and aux["attn_probs"].dtype == torch.float32


def test_dsa_is_causal_and_sparse_for_small_k():
    torch.manual_seed(2)
    layer = DSAttention(TINY)
    h = torch.randn(2, 20, TINY.dim)
    with torch.no_grad():
        out, aux = layer(h, topk=5, return_aux=True)
        dense = layer.mla(h)
    t = torch.arange(20)[:, None]
    assert not bool((aux["indices"] > t).any())
    assert ((aux["indices"] == -1).sum(-1) == (4 - torch.arange(20)).clamp(min=0)).all()
    future = torch.ones(20, 20, dtype=torch.bool).triu(1)
    assert bool(torch.isneginf(aux["index_scores"][:, future]).all())
    probs = aux["attn_probs"]
    assert bool((probs[:, future[:, None, :].expand(20, TINY.n_heads, 20)] == 0).all())
    compare.assert_close(probs.sum(-1), torch.ones(2, 20, TINY.n_heads), atol=1e-5)
    # the first 5 queries see at most 5 tokens: all of them, so they match dense; later ones differ
    compare.assert_close(out[:, :5], dense[:, :5], atol=1e-5, rtol=1e-4)
    assert (out[:, 5:] - dense[:, 5:]).abs().max() > 1e-3


def test_decode_with_cache_equals_prefill():
    torch.manual_seed(3)
    layer = DSAttention(TINY)
    h = torch.randn(2, 16, TINY.dim)
    with torch.no_grad():
        full = layer(h, topk=6)
        cache = DSACache(TINY, 2)
        steps = [layer(h[:, :9], cache=cache, topk=6)]
        steps += [layer(h[:, t:t + 1], cache=cache, topk=6) for t in range(9, 16)]
    assert len(cache) == 16 and len(cache.index) == 16
    compare.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_detach_indexer_input_cuts_the_gradient():
    torch.manual_seed(4)
    layer = DSAttention(TINY)
    h = torch.randn(1, 8, TINY.dim, requires_grad=True)
    _, aux = layer(h, topk=4, return_aux=True, detach_indexer_input=True)
    aux["index_scores"].masked_fill(torch.isinf(aux["index_scores"]), 0).sum().backward()
    assert h.grad is None and layer.mla.wq_a.weight.grad is None
    assert layer.indexer.wk.weight.grad is not None
    layer.zero_grad()
    _, aux = layer(h, topk=4, return_aux=True)
    aux["index_scores"].masked_fill(torch.isinf(aux["index_scores"]), 0).sum().backward()
    assert h.grad is not None and layer.mla.wq_a.weight.grad is not None


def test_dsa_bad_input():
    layer = DSAttention(TINY)
    h = torch.randn(1, 4, TINY.dim)
    with pytest.raises(ValueError, match="topk must be a positive int"):
        layer(h, topk=0)
    with pytest.raises(TypeError, match="DSACache"):
        layer(h, cache=object())
    with pytest.raises(ValueError, match=r"h must have shape \[B, T, 64\]"):
        layer(torch.randn(1, 4, TINY.dim + 1))


# ----------------------------------------------------------------------------- GPU

def _decode_case(B, S, n_h, k, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q_abs = torch.randn(B, n_h, 512, device="cuda", generator=gen).to(torch.bfloat16)
    q_rope = torch.randn(B, n_h, 64, device="cuda", generator=gen).to(torch.bfloat16)
    kv = torch.randn(B, S, 576, device="cuda", generator=gen).to(torch.bfloat16)
    # a random distinct selection per row, the last few slots unused
    index_scores = torch.randn(B, 1, S, device="cuda", generator=gen)
    last = torch.full((1,), S - 1, device="cuda")
    indices = select_topk(index_scores, k, last)[:, 0].contiguous()  # [B, k]
    indices[:, -3:] = -1
    if B > 1:
        indices[1] = -1  # one sequence with nothing selected
    return q_abs, q_rope, kv, indices


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("B, S, n_h, k", [(3, 300, 40, 77), (2, 2500, 128, 2048), (1, 40, 16, 33), (4, 1000, 32, 32)])
def test_sparse_mla_decode_cuda(B, S, n_h, k):
    q_abs, q_rope, kv, indices = _decode_case(B, S, n_h, k, seed=S + k)
    scale = ModelArgs().softmax_scale
    out = compare.poisoned((B, n_h, 512), torch.float32)
    out.copy_(sparse_mla_decode_cuda(q_abs, q_rope, kv, indices, scale))
    c_kv, k_rope = kv.float()[..., :512], kv.float()[..., 512:]
    ref = sparse_mla_attention(q_abs.float()[:, None], q_rope.float()[:, None], c_kv, k_rope, indices[:, None],
                               scale)[:, 0]
    # same bf16 values, float32 arithmetic in another order (576-term dots, then exp): score errors
    # ~1e-5 absolute move each p by ~1e-5 relative; outputs are O(1) averages of O(1) latents
    compare.assert_close(out, ref, atol=1e-4, rtol=1e-4, name="sparse_mla_decode")
    if B > 1:
        assert bool((out[1] == 0).all())


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU")
def test_sparse_mla_decode_cuda_bad_input():
    q_abs, q_rope, kv, indices = _decode_case(2, 100, 16, 8, seed=0)
    with pytest.raises(ValueError, match="<= 99"):
        sparse_mla_decode_cuda(q_abs, q_rope, kv, indices + 100, 0.1)
    with pytest.raises(ValueError, match="d_c"):
        sparse_mla_decode_cuda(q_abs[..., :256], q_rope, kv, indices, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        sparse_mla_decode_cuda(q_abs, q_rope, kv.transpose(0, 1).contiguous().transpose(0, 1), indices, 0.1)
    with pytest.raises(ValueError, match="CUDA"):
        sparse_mla_decode_cuda(q_abs, q_rope, kv, indices.cpu(), 0.1)
    with pytest.raises(ValueError, match="n_h = 16"):
        sparse_mla_decode_cuda(q_abs, q_rope[:, :8], kv, indices, 0.1)


def test_cuda_wrapper_rejects_cpu_tensors_before_any_launch():
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        sparse_mla_decode_cuda(torch.randn(1, 16, 512).to(torch.bfloat16), torch.randn(1, 16, 64).to(torch.bfloat16),
                               torch.randn(1, 10, 576).to(torch.bfloat16), torch.zeros(1, 4, dtype=torch.int32), 0.1)
