"""The lightning indexer: equation 1, the official step order, the mask, the cache, the kernels."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsa_tutorial import causal, compare, indexer as indexer_module
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.hadamard import hadamard_matrix
from dsa_tutorial.indexer import (INDEX_SCORES_KERNELS, IndexerCache, Indexer, index_scores,
                                  index_scores_cuda, index_weights)
from dsa_tutorial.mla import MLA
from dsa_tutorial.rope import inv_freq

TINY = ModelArgs.tiny()


def brute_force_scores(q_idx, w, k_idx):
    """Equation 1 with Python loops, in float64: I[t, s] = sum_j w[t, j] max(0, sum_d q[t, j, d] k[s, d])."""
    T, H, D = q_idx.shape
    S = k_idx.shape[0]
    out = torch.zeros(T, S, dtype=torch.float64)
    for t in range(T):
        for s in range(S):
            total = 0.0
            for j in range(H):
                dot = sum(float(q_idx[t, j, d]) * float(k_idx[s, d]) for d in range(D))
                total += float(w[t, j]) * max(0.0, dot)
            out[t, s] = total
    return out


def test_index_scores_is_equation_1():
    torch.manual_seed(1)
    q, w, k = torch.randn(5, 3, 4), torch.randn(5, 3), torch.randn(7, 4)
    out = index_scores(q, w, k)
    assert out.dtype == torch.float32 and out.shape == (5, 7)
    compare.assert_close(out, brute_force_scores(q, w, k), atol=1e-5, rtol=1e-5)


def test_index_scores_relu_and_negative_weights():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # T = 1, H = 2, D = 2
    k = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])  # S = 2
    w = torch.tensor([[2.0, -0.5]])
    # key 0: head 0 dot -1 -> 0; head 1 dot 2 -> -0.5 * 2 = -1.  key 1: head 0 dot 3 -> 6; head 1 dot -4 -> 0
    assert index_scores(q, w, k).tolist() == [[-1.0, 6.0]]


def test_index_scores_batched_equals_per_batch():
    torch.manual_seed(2)
    q, w, k = torch.randn(3, 6, 4, 8), torch.randn(3, 6, 4), torch.randn(3, 9, 8)
    out = index_scores(q, w, k)
    assert out.shape == (3, 6, 9)
    for b in range(3):
        assert torch.equal(out[b], index_scores(q[b], w[b], k[b]))


def test_hadamard_on_both_sides_leaves_scores_unchanged():
    torch.manual_seed(3)
    q, w, k = torch.randn(6, 4, 16), torch.randn(6, 4), torch.randn(10, 16)
    rotation = hadamard_matrix(16, torch.float32) / 4.0
    reference = index_scores(q, w, k)
    compare.assert_close(index_scores(q @ rotation, w, k @ rotation), reference, atol=1e-5, rtol=1e-5)
    # the pitfall seen in ports: rotating only the queries changes the scores
    assert not compare.compare(index_scores(q @ rotation, w, k), reference, atol=1e-2, rtol=1e-2).passed


@pytest.mark.parametrize("bad, match", [
    (dict(w=torch.randn(5, 4)), "H = 4"),  # 3 heads in q
    (dict(k_idx=torch.randn(7, 5)), "D = 5"),  # 4 dims in q
    (dict(q_idx=torch.randn(5, 4)), "must have 3 dims"),
    (dict(w=torch.randn(6, 3)), "T = 6"),
    (dict(q_idx=torch.randn(5, 3, 4).to(torch.int32)), "must be float32"),
    (dict(k_idx=[[1.0] * 4] * 7), "must be a torch.Tensor"),
])
def test_index_scores_bad_input(bad, match):
    args = dict(q_idx=torch.randn(5, 3, 4), w=torch.randn(5, 3), k_idx=torch.randn(7, 4))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        index_scores(**args)


def test_index_scores_device_mismatch():
    with pytest.raises(ValueError, match="one device"):
        index_scores(torch.randn(5, 3, 4), torch.randn(5, 3), torch.randn(7, 4, device="meta"))


def test_index_weights_folds_both_constants():
    weights = torch.randn(2, 5, TINY.index_n_heads)
    expected = weights / math.sqrt(TINY.index_n_heads) / math.sqrt(TINY.index_head_dim)
    compare.assert_close(index_weights(weights, TINY), expected, atol=0, rtol=1e-6)
    scale = torch.rand(2, 5, TINY.index_n_heads) + 0.5
    compare.assert_close(index_weights(weights, TINY, scale), expected * scale, atol=0, rtol=1e-6)
    with pytest.raises(ValueError, match="index_n_heads"):
        index_weights(torch.randn(5, 3), TINY)


def test_parameter_names_are_the_official_ones():
    names = {name for name, _ in Indexer(TINY).named_parameters()}
    assert names == {"wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"}
    indexer = Indexer(TINY)
    assert indexer.wq_b.weight.shape == (TINY.index_n_heads * TINY.index_head_dim, TINY.q_lora_rank)
    assert indexer.weights_proj.weight.shape == (TINY.index_n_heads, TINY.dim)


def manual_indexer(indexer: Indexer, h, c_q, positions):
    """The official code's steps written out independently, in float64, for one batch entry."""
    args = indexer.args
    H, D, d_r = args.index_n_heads, args.index_head_dim, args.qk_rope_head_dim
    h, c_q = h.double(), c_q.double()
    # rotation of pair (i, i + d_R/2) by angle p theta_i, as a complex multiplication
    angles = positions.double()[:, None] * inv_freq(args)[None, :]  # [T, d_R/2]
    rot = torch.polar(torch.ones_like(angles), angles)

    def rope_first_dims(x):  # x [T, ..., D]: RoPE "half" on x[..., :d_R]
        pairs = torch.complex(x[..., : d_r // 2], x[..., d_r // 2: d_r])
        pairs = pairs * rot.view(rot.shape[0], *([1] * (x.dim() - 2)), rot.shape[1])
        return torch.cat([pairs.real, pairs.imag, x[..., d_r:]], dim=-1)

    hadamard = hadamard_matrix(D) / math.sqrt(D)
    q = (c_q @ indexer.wq_b.weight.double().T).view(-1, H, D)  # [T, H, D]
    q = rope_first_dims(q) @ hadamard
    k = F.layer_norm(h @ indexer.wk.weight.double().T, (D,), indexer.k_norm.weight.double(),
                     indexer.k_norm.bias.double(), eps=1e-6)  # [T, D]
    k = rope_first_dims(k) @ hadamard
    w = (h @ indexer.weights_proj.weight.double().T) / math.sqrt(H) / math.sqrt(D)  # [T, H]
    scores = brute_force_scores(q, w, k)
    T = h.shape[0]
    mask = torch.arange(T)[None, :] > torch.arange(T)[:, None]
    return scores.masked_fill(mask, float("-inf"))


def test_indexer_follows_the_official_steps():
    torch.manual_seed(4)
    indexer, mla = Indexer(TINY), MLA(TINY)
    with torch.no_grad():  # a LayerNorm that is not the identity, so its weight and bias matter
        indexer.k_norm.weight.uniform_(0.5, 1.5)
        indexer.k_norm.bias.normal_(0.0, 0.3)
    h = torch.randn(1, 9, TINY.dim)
    positions = torch.arange(3, 12)
    c_q = mla.query_latent(h)
    out = indexer(h, c_q, positions)
    assert out.shape == (1, 9, 9) and out.dtype == torch.float32
    with torch.no_grad():
        expected = manual_indexer(indexer, h[0], c_q[0], positions)
    compare.assert_close(out[0].detach(), expected, atol=1e-5, rtol=1e-4)


def test_indexer_scores_depend_on_relative_position_only():
    torch.manual_seed(5)
    indexer, mla = Indexer(TINY), MLA(TINY)
    h = torch.randn(2, 8, TINY.dim)
    c_q = mla.query_latent(h)
    a = indexer(h, c_q, torch.arange(8))
    b = indexer(h, c_q, torch.arange(100, 108))
    compare.assert_close(b.detach(), a.detach(), atol=1e-5, rtol=1e-4)


def test_causal_mask_and_cache():
    torch.manual_seed(6)
    indexer, mla = Indexer(TINY), MLA(TINY)
    h = torch.randn(2, 10, TINY.dim)
    c_q = mla.query_latent(h)
    full = indexer(h, c_q, torch.arange(10)).detach()
    assert torch.equal(torch.isneginf(full[0]), ~causal.visible(10, 10))
    assert torch.isfinite(full[:, torch.tril(torch.ones(10, 10, dtype=torch.bool))]).all()
    cache = IndexerCache(TINY, 2)
    first = indexer(h[:, :6], c_q[:, :6], torch.arange(6), cache).detach()
    second = indexer(h[:, 6:], c_q[:, 6:], torch.arange(6, 10), cache).detach()
    assert len(cache) == 10 and second.shape == (2, 4, 10)
    compare.assert_close(first, full[:, :6, :6], atol=1e-6, rtol=1e-5)
    compare.assert_close(second, full[:, 6:], atol=1e-6, rtol=1e-5)


def test_indexer_bad_input():
    indexer = Indexer(TINY)
    h, c_q = torch.randn(1, 4, TINY.dim), torch.randn(1, 4, TINY.q_lora_rank)
    with pytest.raises(ValueError, match="c_q"):
        indexer(h, torch.randn(1, 4, TINY.q_lora_rank + 1), torch.arange(4))
    with pytest.raises(ValueError, match="positions"):
        indexer(h, c_q, torch.arange(5))
    with pytest.raises(TypeError, match="positions must be int64"):
        indexer(h, c_q, torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="B = 2"):
        indexer(h, torch.randn(2, 4, TINY.q_lora_rank), torch.arange(4))
    with pytest.raises(TypeError, match="IndexerCache"):
        indexer(h, c_q, torch.arange(4), cache=object())
    with pytest.raises(ValueError, match="n_queries <= n_keys"):
        causal.visible(3, 2)


# ----------------------------------------------------------------------------- the kernel table (CPU)

def test_the_kernel_table_numbers_the_versions_of_the_cu_file():
    assert INDEX_SCORES_KERNELS.versions == (1, 2, 3, 4, 5)
    assert [k.entry for k in INDEX_SCORES_KERNELS] == ["index_scores_naive", "index_scores_tiled", "index_scores_mma",
                                                       "index_scores_mma_wide", "index_scores_mma_keys"]
    header = (Path(__file__).resolve().parent.parent / "cuda" / "index_scores.cu").read_text().split("#include")[0]
    for kernel in INDEX_SCORES_KERNELS:  # the .cu header calls each entry point by the same number
        assert f"kernel {kernel.version}  {kernel.entry}" in header


def test_the_default_is_kernel_5_at_d_128_else_kernel_3():
    choose = INDEX_SCORES_KERNELS.choose
    assert choose(None, indexer_module._why_not(70, 128)).version == 5
    assert choose(None, indexer_module._why_not(70, 64)).version == 3
    with pytest.raises(ValueError, match="kernel 5 .* cannot run these inputs: compiled for D = 128"):
        choose(5, indexer_module._why_not(70, 64))
    with pytest.raises(ValueError, match="T <= 65535"):
        choose(1, indexer_module._why_not(70000, 128))


def test_launch_geometry_comes_from_the_cu_defines():
    c = INDEX_SCORES_KERNELS.defines()
    assert c["KEYS_D"] == 128 and c["MMA_T"] == c["KEYS_T"] == 64
    # kernel 3: 128 keys x 64 queries a block, 4 warps, the key tile and two query tiles of D + 8 bf16
    assert indexer_module._launch_geometry(3, 100, 300, 128) == ((3, 2), 128, (128 + 2 * 64) * 136 * 2)
    assert indexer_module._launch_geometry(4, 100, 300, 128) == ((2, 2), 256, (256 + 2 * 64) * 136 * 2)
    assert indexer_module._launch_geometry(5, 100, 300, 128) == ((2, 2), 128, 2 * 8 * 16 * 136 * 2)
    assert indexer_module._launch_geometry(2, 100, 300, 48) == ((10, 4), 256, 2 * 32 * 49 * 4)
    assert indexer_module._launch_geometry(1, 100, 300, 48) == ((3, 100), 128, 0)


def test_cuda_wrapper_rejects_cpu_tensors_before_any_launch():
    q = torch.randn(8, 2, 32).to(torch.bfloat16)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        index_scores_cuda(q, torch.randn(8, 2), torch.randn(16, 32).to(torch.bfloat16))


# ----------------------------------------------------------------------------- GPU


def _gpu_inputs(T, S, H, D, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, H, D, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(S, D, device="cuda", generator=gen).to(torch.bfloat16)
    w = torch.randn(T, H, device="cuda", generator=gen) * H ** -0.5
    return q, w, k


def _reference(q, w, k, is_causal):
    """index_scores in float32 on the same bf16-rounded values, -inf after each query when causal."""
    ref = index_scores(q.float(), w, k.float())
    if is_causal:
        ref = ref.masked_fill(~causal.visible(*ref.shape, ref.device), float("-inf"))
    return ref


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", INDEX_SCORES_KERNELS.versions)
@pytest.mark.parametrize("T, S, H, D, is_causal", [
    (77, 200, 5, 48, False), (77, 200, 5, 48, True), (130, 300, 8, 128, True), (1, 129, 3, 16, False),
    (64, 128, 64, 128, False), (200, 201, 4, 256, True),
    # D = 128 (kernel 5 too), T and S off every tile, H off the 8-head stages
    (77, 200, 5, 128, False), (1, 129, 3, 128, False), (100, 333, 9, 128, True), (300, 300, 64, 128, True),
    (17, 1000, 11, 128, False),
])
def test_index_scores_cuda(kernel, T, S, H, D, is_causal):
    q, w, k = _gpu_inputs(T, S, H, D, seed=T + S + H + D)
    if kernel == 5 and D != 128:  # kernel 5 keeps the keys in registers: compiled for D = 128
        with pytest.raises(ValueError, match="D = 128"):
            index_scores_cuda(q, w, k, kernel=kernel, causal=is_causal)
        return
    ref = _reference(q, w, k, is_causal)
    out = compare.poisoned((T, S), torch.float32)
    returned = index_scores_cuda(q, w, k, kernel=kernel, causal=is_causal, out=out)
    assert returned is out
    # same inputs, float32 accumulation in another order: errors of a few ulp of the sum of
    # |w| |q . k| terms, i.e. ~1e-6 of the largest score; 1e-5 leaves room, a wrong index is O(1)
    scale = ref[torch.isfinite(ref)].abs().max().item()
    compare.assert_close(out, ref, atol=1e-5 * scale, rtol=1e-5, name=f"index_scores kernel {kernel}")


@pytest.mark.gpu
def test_index_scores_cuda_default_is_kernel_5_at_d_128():
    q, w, k = _gpu_inputs(70, 300, 6, 128, seed=3)
    assert torch.equal(index_scores_cuda(q, w, k), index_scores_cuda(q, w, k, kernel=5))
    q, w, k = _gpu_inputs(70, 300, 6, 64, seed=3)
    assert torch.equal(index_scores_cuda(q, w, k), index_scores_cuda(q, w, k, kernel=3))


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True])
def test_index_scores_cuda_without_heads_is_the_empty_sum(is_causal):
    q = torch.empty(5, 0, 32, dtype=torch.bfloat16, device="cuda")  # H = 0 heads
    w, k = torch.empty(5, 0, device="cuda"), torch.randn(9, 32, device="cuda").to(torch.bfloat16)
    out = index_scores_cuda(q, w, k, causal=is_causal)
    expected = torch.zeros(5, 9, device="cuda")
    if is_causal:
        expected = expected.masked_fill(~causal.visible(5, 9, "cuda"), float("-inf"))
    assert torch.equal(out, expected)


@pytest.mark.gpu
def test_index_scores_cuda_bad_input():
    q, w, k = _gpu_inputs(8, 16, 2, 32, seed=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        index_scores_cuda(q[..., :24].contiguous(), w, k[:, :24].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        index_scores_cuda(q.transpose(0, 1), w, k)
    with pytest.raises(TypeError, match="bfloat16"):
        index_scores_cuda(q.float(), w, k)
    with pytest.raises(ValueError, match="CUDA"):
        index_scores_cuda(q, w, k.cpu())
    with pytest.raises(ValueError, match="kernel must be None or a version of cuda/index_scores.cu"):
        index_scores_cuda(q, w, k, kernel=6)
    with pytest.raises(ValueError, match="kernel must be None or a version"):
        index_scores_cuda(q, w, k, kernel="mma")  # the old names are gone: versions are numbers
    with pytest.raises(ValueError, match="T <= S"):
        index_scores_cuda(q, w, k[:4].contiguous(), causal=True)
    with pytest.raises(ValueError, match="out must have shape"):
        index_scores_cuda(q, w, k, out=torch.empty(8, 15, device="cuda"))


def test_fp8_path_stays_close_to_the_float_path():
    torch.manual_seed(7)
    mla, indexer = MLA(TINY), Indexer(TINY)
    indexer_fp8 = Indexer(TINY, fp8=True)
    indexer_fp8.load_state_dict(indexer.state_dict())
    h = torch.randn(2, 30, TINY.dim)
    with torch.no_grad():
        c_q = mla.query_latent(h)
        exact, rounded = indexer(h, c_q, torch.arange(30)), indexer_fp8(h, c_q, torch.arange(30))
    # e4m3 keeps 3 mantissa bits (relative rounding up to 2^-4): DeepGEMM's criterion calc_diff < 1e-3
    # holds on average over the matrix, while single logits move by a few percent
    result = compare.compare(rounded, exact, max_calc_diff=1e-3, atol=float("inf"))
    assert result.passed and result.calc_diff > 1e-7, result.measured()

