"""Sparse MLA attention and the DSA layer: equal to masked dense MLA, causal, cached, the kernel."""
import numpy as np
import pytest
import torch

from dsa_tutorial import checks, compare, fp8
from dsa_tutorial import sparse_attention as sparse_module
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.indexer import index_scores, index_weights
from dsa_tutorial.mla import causal_mask
from dsa_tutorial.sparse_attention import (SPARSE_MLA_ATTENTION_KERNELS, DSACache, DSAttention, sparse_mla_attention,
                                           sparse_mla_attention_cuda)
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


def test_index_values_are_checked_only_when_data_checks_are_wanted():
    # the meta device stands in for a GPU: its values cannot be read, so a check that tried would fail
    wild = torch.empty(1, 1, 4, dtype=torch.int32, device="meta")
    with checks.data_checks(False):
        sparse_module._check_indices(wild, 10)  # skipped: no read
    with checks.data_checks(True):
        with pytest.raises(Exception):
            sparse_module._check_indices(wild, 10)
    with checks.data_checks(False), pytest.raises(ValueError, match="repeat"):  # CPU tensors: always checked
        sparse_module._check_indices(torch.tensor([[[2, 2]]], dtype=torch.int32), 10)


# ----------------------------------------------------------------------------- the indexer in FP8

def _fp8_and_float_layers(seed):
    torch.manual_seed(seed)
    layer = DSAttention(TINY)
    layer_fp8 = DSAttention(TINY, indexer_fp8=True)
    layer_fp8.load_state_dict(layer.state_dict())
    return layer, layer_fp8


def test_indexer_fp8_reaches_the_indexer_and_moves_few_indices():
    layer, layer_fp8 = _fp8_and_float_layers(5)
    assert layer_fp8.indexer.fp8 and not layer.indexer.fp8
    h = torch.randn(2, 64, TINY.dim)
    with torch.no_grad():
        _, aux = layer(h, return_aux=True)
        _, aux_fp8 = layer_fp8(h, return_aux=True)
    chosen, chosen_fp8 = aux["indices"], aux_fp8["indices"]  # [B, T, k], ascending, -1 padded
    assert not torch.equal(chosen, chosen_fp8)  # FP8 rounding changes some selections ...
    kept = sum(len(set(a.tolist()) & set(b.tolist()) - {-1})
               for a, b in zip(chosen.flatten(0, 1), chosen_fp8.flatten(0, 1)))
    total = int((chosen >= 0).sum())
    assert kept / total > 0.9, f"only {kept} of {total} selected positions survive FP8 rounding"  # ... few of them
    assert not (chosen_fp8 > torch.arange(64)[:, None]).any()  # and it stays causal


def test_dsa_with_indexer_fp8_equals_the_layer_written_out_with_fp8_rounding():
    _, layer = _fp8_and_float_layers(6)
    args, mla, indexer = TINY, layer.mla, layer.indexer
    T = 40
    h, positions = torch.randn(2, T, args.dim), torch.arange(T)
    with torch.no_grad():
        out = layer(h)
        # by hand: MLA's latents and queries, then the indexer with step 5 written out (e4m3, one
        # power-of-two scale per d_I values; the q scale folded into w), top-k, sparse attention
        c_q = mla.query_latent(h)
        q_nope, q_rope = mla.queries(c_q, positions)
        c_kv, k_rope = mla.latents(h, positions)
        q_fp8, q_scale = fp8.act_quant(indexer.queries(c_q, positions).contiguous(), block_size=args.index_head_dim)
        k_fp8, k_scale = fp8.act_quant(indexer.keys(h, positions).contiguous(), block_size=args.index_head_dim)
        w = index_weights(indexer.weights_proj(h), args, q_scale.squeeze(-1))
        scores = index_scores(q_fp8.float(), w, k_fp8.float() * k_scale) + causal_mask(T, T, h.device, torch.float32)
        indices = select_topk(scores, args.index_topk)
        o_latent = sparse_mla_attention(mla.absorb_query(q_nope), q_rope, c_kv, k_rope, indices, args.softmax_scale)
        expected = mla.latent_output(o_latent)
    compare.assert_close(out, expected, atol=1e-6, rtol=1e-5, name="DSAttention(indexer_fp8=True)")


# ----------------------------------------------------------------------------- the kernel table (CPU)

def test_the_kernel_table_and_its_shared_memory_come_from_the_cu_file():
    assert SPARSE_MLA_ATTENTION_KERNELS.versions == (1, 2)
    assert [k.entry for k in SPARSE_MLA_ATTENTION_KERNELS] == ["sparse_mla_attention_simt", "sparse_mla_attention_mma"]
    c = SPARSE_MLA_ATTENTION_KERNELS.defines()
    assert (c["D_C"], c["D_R"], c["MMA_HEADS"], c["MMA_TILE"], c["SPARSE_HEADS"]) == (512, 64, 64, 64, 32)
    # kernel 2: Q and two stages of latents (576 bf16 a row), P in bf16, two exchange rows, two valid rows
    assert c["MMA_SMEM_BYTES"] == (64 + 2 * 64) * 576 * 2 + 64 * 64 * 2 + 2 * 64 * 4 + 2 * 64 * 4 == 225 * 1024
    assert c["SPARSE_SMEM_BYTES"] == (32 + 32) * 578 * 2 + 32 * 32 * 4 + 32 * 4


def _cpu_decode_inputs():
    bf16 = torch.bfloat16
    return (torch.randn(1, 16, 512).to(bf16), torch.randn(1, 16, 64).to(bf16), torch.randn(1, 10, 576).to(bf16),
            torch.zeros(1, 4, dtype=torch.int32))


def test_cuda_wrapper_rejects_cpu_tensors_before_any_launch():
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        sparse_mla_attention_cuda(*_cpu_decode_inputs(), 0.1)


def test_an_unknown_kernel_is_refused_with_the_list_of_versions():
    with pytest.raises(ValueError, match=r"kernel must be None or a version of cuda/sparse_mla_attention.cu: "
                                         r"1 \(decode, float32"):
        SPARSE_MLA_ATTENTION_KERNELS.choose(3, {})


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
    if B > 2:
        indices[2, :min(k - 4, 70)] = -1  # unused slots first: the first tile of kernel 2 is all -1
    return q_abs, q_rope, kv, indices


def _decode_reference(q_abs, q_rope, kv, indices, scale):
    """sparse_mla_attention in float32 on the same bf16 values: [B, n_h, 512]."""
    c_kv, k_rope = kv.float()[..., :512], kv.float()[..., 512:]
    return sparse_mla_attention(q_abs.float()[:, None], q_rope.float()[:, None], c_kv, k_rope, indices[:, None],
                                scale)[:, 0]


# Tolerances, against the float32 reference on the same bf16 inputs:
# * kernel 1 (simt) is float32 throughout, in another order (576-term dots, then exp): score errors
#   ~1e-5 absolute move each p by ~1e-5 relative; outputs are O(1) averages of O(1) latents: 1e-4.
# * kernel 2 (mma) computes the scores with float32 accumulation of exact bf16 products (as good as
#   kernel 1), but rounds p = exp(score - max) to bf16 (8 significant bits, relative error <= 2^-9)
#   before P V, and divides by the sum of the same rounded p. The output stays a convex combination
#   of the latents whose weights are each off by <= ~2^-8 relative: the error is at most ~2^-8 x the
#   spread of the latents, and far less on average (the rounding errors have random signs). So 1e-2
#   relative to max|ref| (about 2.5 x 2^-8), plus calc_diff <= 1e-5 (the typical error, relative
#   ~1e-3, gives calc_diff ~1e-6) to catch a systematic error hiding under the elementwise bound.
def _decode_tolerance(kernel, ref):
    if kernel == 1:
        return dict(atol=1e-4, rtol=1e-4)
    return dict(atol=1e-2 * ref.abs().max().item(), rtol=1e-2, max_calc_diff=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", SPARSE_MLA_ATTENTION_KERNELS.versions)
@pytest.mark.parametrize("B, S, n_h, k", [(3, 300, 40, 77), (2, 2500, 128, 2048), (1, 40, 16, 33), (4, 1000, 32, 32),
                                          (5, 3000, 64, 1000), (3, 700, 128, 130), (7, 200, 64, 5)])
def test_sparse_mla_attention_cuda(B, S, n_h, k, kernel):
    q_abs, q_rope, kv, indices = _decode_case(B, S, n_h, k, seed=S + k)
    scale = ModelArgs().softmax_scale
    out = compare.poisoned((B, n_h, 512), torch.float32)
    assert sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, scale, kernel=kernel, out=out) is out
    ref = _decode_reference(q_abs, q_rope, kv, indices, scale)
    compare.assert_close(out, ref, **_decode_tolerance(kernel, ref), name=f"sparse_mla_attention kernel {kernel}")
    if B > 1:
        assert bool((out[1] == 0).all())


@pytest.mark.gpu
def test_sparse_mla_attention_cuda_default_is_kernel_2():
    q_abs, q_rope, kv, indices = _decode_case(3, 500, 64, 100, seed=8)
    assert torch.equal(sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, 0.1),
                       sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, 0.1, kernel=2))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", SPARSE_MLA_ATTENTION_KERNELS.versions)
def test_wild_indices_with_data_checks_off_are_never_read(kernel):
    """Data checks off (the default): indices outside [0, S) are not checked; the kernels must treat
    them as unused slots (-1), never read them. compute-sanitizer runs benchmarks/sanitize_dsa.py
    with such values too."""
    q_abs, q_rope, kv, indices = _decode_case(3, 500, 64, 100, seed=5)
    scale = ModelArgs().softmax_scale
    ref = _decode_reference(q_abs, q_rope, kv, indices, scale)
    wild = indices.clone()
    wild[0, -1] = 500 + 10**6  # past the cache
    wild[0, -2] = 2**31 - 1
    wild[2, -2] = -7  # below -1
    wild[2, -3] = -(2**31)
    wild[1, :5] = 500  # S itself, in a sequence with nothing else selected
    with checks.data_checks(False):
        out = sparse_mla_attention_cuda(q_abs, q_rope, kv, wild, scale, kernel=kernel)
    compare.assert_close(out, ref, **_decode_tolerance(kernel, ref), name=f"kernel {kernel}, wild indices")
    assert bool((out[1] == 0).all())
    with checks.data_checks(True), pytest.raises(ValueError, match="indices must be >= -1"):
        sparse_mla_attention_cuda(q_abs, q_rope, kv, wild, scale, kernel=kernel)


@pytest.mark.gpu
def test_sparse_mla_attention_cuda_bad_input():
    q_abs, q_rope, kv, indices = _decode_case(2, 100, 16, 8, seed=0)
    with checks.data_checks(True):
        with pytest.raises(ValueError, match="<= 99"):
            sparse_mla_attention_cuda(q_abs, q_rope, kv, indices + 100, 0.1)
        repeated = indices.clone()
        repeated[0, 1] = repeated[0, 0]
        with pytest.raises(ValueError, match="repeat"):
            sparse_mla_attention_cuda(q_abs, q_rope, kv, repeated, 0.1)
    with pytest.raises(ValueError, match="d_c"):
        sparse_mla_attention_cuda(q_abs[..., :256], q_rope, kv, indices, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        sparse_mla_attention_cuda(q_abs, q_rope, kv.transpose(0, 1).contiguous().transpose(0, 1), indices, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        sparse_mla_attention_cuda(q_abs.transpose(1, 2).contiguous().transpose(1, 2), q_rope, kv, indices, 0.1)
    with pytest.raises(ValueError, match="CUDA"):
        sparse_mla_attention_cuda(q_abs, q_rope, kv, indices.cpu(), 0.1)
    with pytest.raises(ValueError, match="n_h = 16"):
        sparse_mla_attention_cuda(q_abs, q_rope[:, :8], kv, indices, 0.1)
    with pytest.raises(ValueError, match="positive"):
        sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, 0.0)
    with pytest.raises(ValueError, match="kernel must be None or a version of cuda/sparse_mla_attention.cu"):
        sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, 0.1, kernel=3)
    with pytest.raises(ValueError, match="kernel must be None or a version"):
        sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, 0.1, kernel="mma")  # versions are numbers now
    with pytest.raises(ValueError, match="out must have shape"):
        sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, 0.1, out=torch.empty(2, 16, 511, device="cuda"))
    unaligned = torch.empty(2 * 100 * 576 + 2, dtype=torch.bfloat16, device="cuda")[2:].view(2, 100, 576)
    unaligned.copy_(kv)  # starts 4 bytes past an aligned address: fine for kernel 1, not for kernel 2
    with pytest.raises(ValueError, match="16-byte boundary"):
        sparse_mla_attention_cuda(q_abs, q_rope, unaligned, indices, 0.1, kernel=2)
    ref = _decode_reference(q_abs, q_rope, kv, indices, 0.1)
    for kernel in (1, None):  # None: the best that applies, here kernel 1
        out = sparse_mla_attention_cuda(q_abs, q_rope, unaligned, indices, 0.1, kernel=kernel)
        compare.assert_close(out, ref, **_decode_tolerance(1, ref))
    odd = torch.empty(2 * 100 * 576 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(2, 100, 576)
    with pytest.raises(ValueError, match="4-byte boundary"):
        sparse_mla_attention_cuda(q_abs, q_rope, odd, indices, 0.1, kernel=1)


@pytest.mark.gpu
def test_q_abs_and_q_rope_are_read_where_they_lie():
    """The kernels read the query from the two tensors (no concatenated copy): q_abs and q_rope may
    be any two allocations, e.g. contiguous slices of one buffer in the reverse order."""
    q_abs, q_rope, kv, indices = _decode_case(3, 300, 40, 77, seed=2)
    buffer = torch.empty(q_rope.numel() + q_abs.numel(), dtype=torch.bfloat16, device="cuda")
    rope_first, abs_second = buffer[:q_rope.numel()].view_as(q_rope), buffer[q_rope.numel():].view_as(q_abs)
    rope_first.copy_(q_rope)
    abs_second.copy_(q_abs)
    for kernel in SPARSE_MLA_ATTENTION_KERNELS.versions:
        assert torch.equal(sparse_mla_attention_cuda(abs_second, rope_first, kv, indices, 0.1, kernel=kernel),
                           sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, 0.1, kernel=kernel))


# ----------------------------------------------------------------------------- kernel 2 on the CPU
# A numpy emulation of sparse_mla_attention_mma's index arithmetic (cuda/sparse_mla_attention.cu,
# kernel 2): the query staged from q_abs and q_rope (two tensors), the XOR-swizzled shared arrays,
# the lane -> row addresses given to ldmatrix, the PTX fragment layouts of mma.m16n8k16 and ldmatrix
# (.trans), the key/output halves of the 8 warps and the row-max swap.
# It mirrors the kernel's expressions one for one; reading unwritten shared memory would give NaN.

_LANE = np.arange(32)
_G, _T = _LANE // 4, _LANE % 4


def _swizzled(row, chunk, chunks):
    """bf16 offset of 16-byte chunk `chunk` of row `row`: chunk c of row r sits at c ^ (r % 8)."""
    return (row * chunks + (chunk ^ (row & 7))) * 8


def _ldmatrix_x4(mem, addresses, trans=False):
    """regs [4, 32 lanes, 2]: lanes 8i .. 8i+7 give matrix i's row addresses; lane 4g+t gets (row g,
    columns 2t, 2t+1), or with .trans (rows 2t, 2t+1, column g). Checks the 8 rows of a phase hit 8
    different 16-byte bank groups (no conflict)."""
    for i in range(4):
        assert len(set((addresses[8 * i:8 * i + 8] // 8) % 8)) == 8, "ldmatrix bank conflict"
    rows = mem[addresses[:, None] + np.arange(8)].reshape(4, 8, 8)  # [matrix, row, column]
    if trans:
        return np.stack([rows[:, 2 * _T, _G], rows[:, 2 * _T + 1, _G]], -1)
    return np.stack([rows[:, _G, 2 * _T], rows[:, _G, 2 * _T + 1]], -1)


def _mma(c, a, b0, b1):
    """c [32, 4] += A [16, 16] B [16, 8] with the m16n8k16 fragment layouts (PTX ISA)."""
    A, Bm, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
    for j in range(2):
        A[_G, 2 * _T + j], A[_G + 8, 2 * _T + j] = a[0, :, j], a[1, :, j]
        A[_G, 2 * _T + 8 + j], A[_G + 8, 2 * _T + 8 + j] = a[2, :, j], a[3, :, j]
        Bm[2 * _T + j, _G], Bm[2 * _T + 8 + j, _G] = b0[:, j], b1[:, j]
        C[_G, 2 * _T + j], C[_G + 8, 2 * _T + j] = c[:, j], c[:, 2 + j]
    C += A @ Bm
    for j in range(2):
        c[:, j], c[:, 2 + j] = C[_G, 2 * _T + j], C[_G + 8, 2 * _T + j]


def _bf16(x):
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(torch.bfloat16).float().numpy().astype(np.float64)


def _emulate_mma_block(q_abs, q_rope, kv, index_row, h0, n_h, S, scale):
    """One block of kernel 2 (64 heads from h0, one sequence): returns out [n_h, 512] (NaN where unwritten)."""
    L, HEADS, TILE, LC, CC, PC = 576, 64, 64, 72, 64, 8
    K = len(index_row)
    q_s = np.full(HEADS * L, np.nan)
    kv_s = np.full(2 * TILE * L, np.nan)
    p_s = np.full(HEADS * TILE, np.nan)
    row_s = np.full(2 * HEADS, np.nan)
    valid_s = np.zeros(2 * TILE, dtype=bool)
    for r in range(HEADS):  # chunks 0 .. 63 from q_abs, 64 .. 71 from q_rope; zeros past n_h
        inside = h0 + r < n_h
        head = h0 + r if inside else 0
        for c in range(LC):
            row = q_abs[head, 8 * c:8 * c + 8] if c < CC else q_rope[head, 8 * (c - CC):8 * (c - CC) + 8]
            q_s[_swizzled(r, c, LC):][:8] = row if inside else 0.0

    def load_tile(tile, stage):
        for r in range(TILE):
            s = index_row[tile * TILE + r] if tile * TILE + r < K else -1
            used = 0 <= s < S
            for c in range(LC):
                kv_s[stage * TILE * L + _swizzled(r, c, LC):][:8] = kv[s, 8 * c:8 * c + 8] if used else 0.0
            valid_s[stage * TILE + r] = used

    o = np.zeros((8, 32, 32, 4))
    row_max, row_sum = np.full((8, 32, 2), -np.inf), np.zeros((8, 32, 2))
    scale_log2 = scale * 1.4426950408889634
    n_tiles = (K + TILE - 1) // TILE
    load_tile(0, 0)
    for tile in range(n_tiles):
        stage = tile % 2
        if tile + 1 < n_tiles:
            load_tile(tile + 1, stage ^ 1)
        k_tile = stage * TILE * L
        scores, tile_max = np.zeros((8, 4, 32, 4)), np.full((8, 32, 2), -np.inf)
        for warp in range(8):  # 1. scores, up to barrier (B)
            mt, half = warp % 4, warp // 4
            for kk in range(L // 16):
                a = _ldmatrix_x4(q_s, _swizzled(16 * mt + _LANE % 16, 2 * kk + _LANE // 16, LC))
                for n_pair in range(2):
                    kb = _ldmatrix_x4(kv_s, k_tile + _swizzled(32 * half + 16 * n_pair + _LANE % 8 + 8 * (_LANE // 16),
                                                               2 * kk + (_LANE // 8) % 2, LC))
                    _mma(scores[warp, 2 * n_pair], a, kb[0], kb[1])
                    _mma(scores[warp, 2 * n_pair + 1], a, kb[2], kb[3])
            for n in range(4):
                for e in range(4):
                    valid = valid_s[stage * TILE + 32 * half + 8 * n + 2 * _T + e % 2]
                    scores[warp, n, :, e] = np.where(valid, scores[warp, n, :, e] * scale_log2, -np.inf)
                    tile_max[warp, :, e // 2] = np.maximum(tile_max[warp, :, e // 2], scores[warp, n, :, e])
            tile_max[warp] = tile_max[warp].reshape(8, 4, 2).max(1).repeat(4, 0)  # the quad's shuffles
            for r in range(2):
                row_s[half * HEADS + 16 * mt + _G + 8 * r] = tile_max[warp, :, r]
        for warp in range(8):  # 2, 3. the shared max, P in bf16, up to barrier (C)
            mt, half = warp % 4, warp // 4
            m_use = np.zeros((32, 2))
            for r in range(2):
                other = row_s[(half ^ 1) * HEADS + 16 * mt + _G + 8 * r]
                new_max = np.maximum(row_max[warp, :, r], np.maximum(tile_max[warp, :, r], other))
                m_use[:, r] = np.where(new_max == -np.inf, 0.0, new_max)
                alpha = np.exp2(row_max[warp, :, r] - m_use[:, r])
                row_max[warp, :, r] = new_max
                row_sum[warp, :, r] *= alpha
                o[warp, :, :, 2 * r:2 * r + 2] *= alpha[None, :, None]
            for n in range(4):
                p = _bf16(np.exp2(scores[warp, n] - m_use[:, [0, 0, 1, 1]]))  # [32, 4]
                row_sum[warp] += p.reshape(32, 2, 2).sum(-1)
                for r in range(2):
                    for j in range(2):
                        p_s[_swizzled(16 * mt + _G + 8 * r, 4 * half + n, PC) + 2 * _T + j] = p[:, 2 * r + j]
        assert not np.isnan(p_s).any()
        for warp in range(8):  # 4. o += P V
            mt, half = warp % 4, warp // 4
            for kk in range(TILE // 16):
                a = _ldmatrix_x4(p_s, _swizzled(16 * mt + _LANE % 16, 2 * kk + _LANE // 16, PC))
                for n_pair in range(16):
                    vb = _ldmatrix_x4(kv_s, k_tile + _swizzled(16 * kk + _LANE % 8 + 8 * ((_LANE // 8) % 2),
                                                               32 * half + 2 * n_pair + _LANE // 16, LC), trans=True)
                    _mma(o[warp, 2 * n_pair], a, vb[0], vb[1])
                    _mma(o[warp, 2 * n_pair + 1], a, vb[2], vb[3])
        p_s[:] = np.nan
    out = np.full((n_h, 512), np.nan)
    quad_sum = row_sum.reshape(8, 8, 4, 2).sum(2).repeat(4, 1)  # [warp, lane, 2]
    for warp in range(8):
        mt, half = warp % 4, warp // 4
        for r in range(2):
            row_s[half * HEADS + 16 * mt + _G + 8 * r] = quad_sum[warp, :, r]
    for warp in range(8):
        mt, half = warp % 4, warp // 4
        for r in range(2):
            total = quad_sum[warp, :, r] + row_s[(half ^ 1) * HEADS + 16 * mt + _G + 8 * r]
            inv_sum = np.where(total > 0, 1 / np.where(total > 0, total, 1), 0.0)
            for lane in range(32):
                head = h0 + 16 * mt + _G[lane] + 8 * r
                if head < n_h:
                    for n in range(32):
                        column = 256 * half + 8 * n + 2 * _T[lane]
                        assert np.isnan(out[head, column:column + 2]).all(), "written twice"
                        out[head, column:column + 2] = o[warp, n, lane, 2 * r:2 * r + 2] * inv_sum[lane]
    return out


def test_mma_kernel_index_arithmetic_emulated_on_the_cpu():
    """Kernel 2's fragments, swizzles and warp split, emulated: equals the reference to bf16-P accuracy."""
    gen = torch.Generator().manual_seed(7)
    S, n_h, k, scale = 150, 20, 70, ModelArgs().softmax_scale  # 2 tiles, the second ragged; 44 padded heads
    q_abs, q_rope = _bf16(torch.randn(n_h, 512, generator=gen)), _bf16(torch.randn(n_h, 64, generator=gen))
    kv = _bf16(torch.randn(S, 576, generator=gen))
    indices = torch.randperm(S, generator=gen)[:k].int()
    indices[:30] = -1  # unused slots, the first tile's maxima come from its second half only
    indices[-2] = -1
    out = _emulate_mma_block(q_abs, q_rope, kv, indices.tolist(), 0, n_h, S, scale)
    bad = indices.clone()
    bad[-2], bad[0] = S + 5, -9  # unused slots written as indices outside [0, S): ignored like -1
    out_bad = _emulate_mma_block(q_abs, q_rope, kv, bad.tolist(), 0, n_h, S, scale)
    t = torch.from_numpy
    ref = sparse_mla_attention(t(q_abs)[None, None], t(q_rope)[None, None], t(kv)[None, :, :512],
                               t(kv)[None, :, 512:], indices[None, None], scale)[0, 0]
    tolerance = _decode_tolerance(2, ref)
    compare.assert_close(t(out), ref, **tolerance, name="emulated kernel 2")
    compare.assert_close(t(out_bad), ref, **tolerance, name="emulated kernel 2, indices outside the cache")
    empty = _emulate_mma_block(q_abs, q_rope, kv, [-1] * 5, 0, n_h, S, scale)
    assert (empty == 0).all()
