"""Sparse MLA prefill (FlashMLA's flash_mla_sparse_fwd): the reference against dense masked attention,
FlashMLA's conventions, the host checks, both kernels' index arithmetic emulated on the CPU, and the
kernels against the reference on the GPU."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsa_tutorial import checks, compare, kernels
from dsa_tutorial import sparse_prefill as sp
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.sparse_attention import sparse_mla_attention
from dsa_tutorial.sparse_prefill import SPARSE_MLA_PREFILL_KERNELS as TABLE
from dsa_tutorial.sparse_prefill import sparse_mla_prefill, sparse_mla_prefill_cuda
from tests.test_sparse_attention import _G, _LANE, _T, _bf16, _ldmatrix_x4, _mma, _swizzled

SCALE = ModelArgs().softmax_scale
D = TABLE.defines()
WGMMA = 2  # the version that needs compute capability 9.0


def random_selection(T, S, k, gen, empty_rows=()):
    """indices int32 [T, 1, k]: token t sees positions [0, S - T + t] (the prompt's last T tokens, causal)
    and selects min(k, that many) distinct ones, scattered among -1 slots; rows in `empty_rows` select
    nothing."""
    rows = torch.full((T, k), -1, dtype=torch.int32)
    for t in range(T):
        visible = max(0, min(S, S - T + t + 1))
        n = 0 if t in empty_rows else min(k, visible)
        rows[t, torch.randperm(k, generator=gen)[:n]] = torch.randperm(visible, generator=gen)[:n].int()
    return rows[:, None]


def random_inputs(T, h, S, k, dtype=torch.float64, seed=0, empty_rows=()):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, h, 576, generator=gen, dtype=dtype)
    kv = torch.randn(S, 1, 576, generator=gen, dtype=dtype)
    return q, kv, random_selection(T, S, k, gen, empty_rows)


def dense_masked(q, kv, indices, scale, d_v=512):
    """Brute force: dense attention over all S latents, -inf outside each token's selection."""
    S = kv.shape[0]
    scores = torch.einsum("thd,sd->ths", q, kv[:, 0]) * scale  # [T, h, S]
    slots = torch.where(indices[:, 0] >= 0, indices[:, 0], S).long()  # unused slots -> an extra column, dropped
    selected = torch.zeros(q.shape[0], S + 1, dtype=torch.bool).scatter_(-1, slots, True)[:, :S]
    scores = scores.masked_fill(~selected[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None]).nan_to_num(nan=0.0)  # an empty row: -inf - -inf
    out = torch.einsum("ths,sd->thd", p, kv[:, 0, :d_v])
    return out, scores.amax(dim=-1), lse.masked_fill(torch.isneginf(lse), float("inf"))


# ----------------------------------------------------------------------------- the reference

@pytest.mark.parametrize("T, h, S, k", [(9, 64, 30, 6), (4, 128, 200, 70), (3, 64, 5, 8)])
def test_reference_equals_dense_attention_masked_outside_the_selection(T, h, S, k):
    q, kv, indices = random_inputs(T, h, S, k, empty_rows=(1,))
    assert bool((indices == -1).any()) and bool((indices >= 0).any())
    out, max_logits, lse = sparse_mla_prefill(q, kv, indices, 0.3)
    assert out.shape == (T, h, 512) and max_logits.shape == lse.shape == (T, h)
    assert out.dtype == max_logits.dtype == lse.dtype == torch.float64
    want = dense_masked(q, kv, indices, 0.3)
    for name, got, ref in zip(("out", "max_logits", "lse"), (out, max_logits, lse), want):
        compare.assert_close(got, ref, atol=1e-12, rtol=1e-12, name=name)


def test_reference_is_chapter_6s_sparse_attention_for_one_sequence():
    q, kv, indices = random_inputs(6, 64, 40, 9, dtype=torch.float32, seed=1)
    out, _, _ = sparse_mla_prefill(q, kv, indices, SCALE)
    chapter_6 = sparse_mla_attention(q[None, ..., :512], q[None, ..., 512:], kv[None, :, 0, :512],
                                     kv[None, :, 0, 512:], indices[None, :, 0], SCALE)[0]
    assert out.dtype == torch.float32 and torch.equal(out, chapter_6)


def test_flashmla_conventions_natural_units_and_empty_rows():
    # two selected latents with known scores: q . kv = 2 and 0 (times scale 0.5): scores 1 and 0
    q = torch.zeros(2, 64, 576, dtype=torch.float64)
    q[:, :, 0] = 1.0
    kv = torch.zeros(3, 1, 576, dtype=torch.float64)
    kv[0, 0, 0], kv[0, 0, 1] = 2.0, 7.0  # score 1, value 7 in column 1
    kv[2, 0, 1] = 3.0  # score 0, value 3
    indices = torch.tensor([[[0, -1, 2]], [[-1, -1, -1]]], dtype=torch.int32)
    out, max_logits, lse = sparse_mla_prefill(q, kv, indices, 0.5)
    e = math.e
    assert torch.allclose(max_logits[0], torch.full((64,), 1.0, dtype=torch.float64))  # natural units, not log2
    assert torch.allclose(lse[0], torch.full((64,), math.log(e + 1), dtype=torch.float64))  # ln, not log2
    assert torch.allclose(out[0, :, 1], torch.full((64,), (7 * e + 3) / (e + 1), dtype=torch.float64))
    # nothing selected: out 0, max_logits -inf, lse +inf (FlashMLA's kernel since 2026-01)
    assert torch.equal(out[1], torch.zeros(64, 512, dtype=torch.float64))
    assert bool(torch.isneginf(max_logits[1]).all()) and bool(torch.isposinf(lse[1]).all())


def test_slot_order_and_bfloat16_inputs():
    q, kv, indices = random_inputs(5, 64, 50, 12, dtype=torch.bfloat16, seed=2)
    out, max_logits, lse = sparse_mla_prefill(q, kv, indices, SCALE)
    assert out.dtype == torch.float32  # bf16 inputs, float32 arithmetic
    shuffled = indices[..., torch.randperm(12, generator=torch.Generator().manual_seed(3))]
    for got, want in zip(sparse_mla_prefill(q, kv, shuffled, SCALE), (out, max_logits, lse)):
        compare.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want = dense_masked(q.double(), kv.double(), indices, SCALE)
    for got, ref in zip((out, max_logits, lse), want):
        compare.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_empty_selection_and_empty_cache():
    q, kv, indices = random_inputs(3, 64, 10, 4)
    for args in ((q, kv, indices[..., :0]), (q, kv[:0], torch.full((3, 1, 4), -1, dtype=torch.int32))):
        out, max_logits, lse = sparse_mla_prefill(*args, SCALE)
        assert out.shape == (3, 64, 512) and bool((out == 0).all())
        assert bool(torch.isneginf(max_logits).all()) and bool(torch.isposinf(lse).all())
    out, _, _ = sparse_mla_prefill(q, kv, indices, SCALE, d_v=576)  # the whole latent as the value
    assert out.shape == (3, 64, 576)
    compare.assert_close(out, dense_masked(q, kv, indices, SCALE, d_v=576)[0], atol=1e-12)
    out, _, _ = sparse_mla_prefill(q[:0], kv, indices[:0], SCALE)
    assert out.shape == (0, 64, 512)


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.randn(2, 40, 576, dtype=torch.float64)), "h .* must be 64 or 128.*got h = 40"),
    (dict(q=torch.randn(2, 64, 512, dtype=torch.float64)), "d_qk"),
    (dict(kv=torch.randn(10, 2, 576, dtype=torch.float64)), r"kv must have shape \[S, 1, d_qk\]"),
    (dict(kv=torch.randn(10, 1, 576)), "float64"),
    (dict(indices=torch.zeros(2, 1, 3, dtype=torch.int64)), "int32"),
    (dict(indices=torch.zeros(3, 1, 3, dtype=torch.int32)), "T = 3"),
    (dict(indices=torch.zeros(2, 3, dtype=torch.int32)), "3 dims"),
    (dict(indices=torch.tensor([[[0, 10, 1]], [[0, 1, 2]]], dtype=torch.int32)), "<= 9"),
    (dict(indices=torch.tensor([[[0, -2, 1]], [[0, 1, 2]]], dtype=torch.int32)), ">= -1"),
    (dict(indices=torch.tensor([[[4, 4, 1]], [[0, 1, 2]]], dtype=torch.int32)), "repeat"),
    (dict(softmax_scale=0.0), "positive"),
    (dict(d_v=0), "d_v"),
    (dict(d_v=577), "d_v"),
])
def test_bad_input(bad, match):
    args = dict(q=torch.randn(2, 64, 576, dtype=torch.float64), kv=torch.randn(10, 1, 576, dtype=torch.float64),
                indices=torch.tensor([[[0, 1, -1]], [[2, 3, 4]]], dtype=torch.int32), softmax_scale=1.0)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        sparse_mla_prefill(**args)


def test_index_values_are_checked_only_when_data_checks_are_wanted(monkeypatch):
    # the meta device stands in for a GPU: its values cannot be read, so a check that tried would fail
    wild = torch.empty(3, 1, 4, dtype=torch.int32, device="meta")
    with checks.data_checks(False):
        sp._check_indices(wild, 10)  # skipped: no read
    with checks.data_checks(True), pytest.raises(Exception):
        sp._check_indices(wild, 10)


# ----------------------------------------------------------------------------- the kernel table (CPU)

def test_the_kernel_table_and_its_shared_memory_come_from_the_cu_file():
    assert TABLE.versions == (1, 2)
    assert [k.entry for k in TABLE] == ["sparse_mla_prefill_mma", "sparse_mla_prefill_wgmma"]
    # kernel 2 (wgmma) is the default where it runs, kernel 1 elsewhere
    assert TABLE.best_first == (2, 1)
    assert (D["D_C"], D["D_R"], D["D_L"], D["PREFILL_HEADS"], D["PREFILL_TILE"]) == (512, 64, 576, 64, 64)
    assert D["MMA_THREADS"] == D["WGMMA_THREADS"] == 256
    # Q and two stages of latents (576 bf16 a row), P in bf16, the row exchange and the flags: 225 KiB
    assert D["MMA_SMEM_BYTES"] == 3 * 64 * 576 * 2 + 64 * 64 * 2 + 2 * 64 * 4 + 2 * 64 * 4 == 225 * 1024
    # kernel 2: the same carve, 1024-byte aligned inside (the wgmma swizzle atoms), within the H200's 227 KiB
    assert D["WGMMA_DYNAMIC_SMEM"] == D["WGMMA_SMEM_ALIGN"] + D["MMA_SMEM_BYTES"] <= 227 * 1024
    assert D["TILE_BYTES"] == 9 * D["WGMMA_BLOCK_BYTES"]  # a tile is 9 column blocks of 64 values


def recorded_launches(monkeypatch) -> list:
    """What kernels.launch is asked (source, entry, grid, block, args, shared_mem), instead of launching."""
    launches = []
    monkeypatch.setattr(kernels, "launch", lambda source, entry, grid, block, args, shared_mem=0:
                        launches.append((source, entry, grid, block, tuple(args), shared_mem)))
    return launches


@pytest.mark.parametrize("version, h, T", [(1, 64, 5), (1, 128, 5), (2, 128, 70000), (2, 64, 1)])
def test_launch_geometry(monkeypatch, version, h, T):
    # one block per (token, 64 heads) on grid.x: T may exceed 65535 (grid.y's limit)
    launches = recorded_launches(monkeypatch)
    q, kv = torch.empty(T, h, 576, dtype=torch.bfloat16), torch.empty(30, 1, 576, dtype=torch.bfloat16)
    indices = torch.empty(T, 1, 77, dtype=torch.int32)
    out, max_logits, lse = torch.empty(T, h, 512, dtype=torch.bfloat16), torch.empty(T, h), torch.empty(T, h)
    sp._launch(version, q, kv, indices, 0.25, out, max_logits, lse)
    (source, entry, grid, block, args, smem), = launches
    assert (source, entry) == ("sparse_mla_prefill", TABLE.entry(version))
    assert (grid, block) == (T * h // 64, 256)
    assert smem == (D["MMA_SMEM_BYTES"] if version == 1 else D["WGMMA_DYNAMIC_SMEM"])
    assert args[:6] == (q, kv, indices, out, max_logits, lse) and args[6:] == (30, h, 77, 0.25)


def test_cuda_call_checks_before_any_launch(monkeypatch):
    launches = recorded_launches(monkeypatch)
    bf16 = torch.bfloat16
    q, kv = torch.randn(3, 64, 576).to(bf16), torch.randn(20, 1, 576).to(bf16)
    indices = torch.zeros(3, 1, 8, dtype=torch.int32)
    bad = [
        (dict(q=torch.randn(3, 64, 576)), "bfloat16"),  # float32: the kernels read bf16
        (dict(q=torch.randn(3, 32, 576).to(bf16)), "must be 64 or 128"),
        (dict(kv=torch.randn(20, 1, 512).to(bf16)), "d_qk"),
        (dict(indices=torch.zeros(3, 1, 8, dtype=torch.int64)), "int32"),
        (dict(softmax_scale=-1.0), "positive"),
        (dict(kernel=3), "kernel must be None or a version of cuda/sparse_mla_prefill.cu"),
        (dict(kernel="wgmma"), "kernel must be None or a version"),
        ({}, "must be on a CUDA device"),  # everything right but the device
    ]
    for change, match in bad:
        args = dict(q=q, kv=kv, indices=indices, softmax_scale=0.1)
        args.update(change)
        with pytest.raises((ValueError, TypeError), match=match):
            sparse_mla_prefill_cuda(**args)
    assert launches == []


def test_kernel_2_is_refused_where_wgmma_does_not_run_and_the_default_where_it_does(monkeypatch):
    monkeypatch.setattr(sp, "_smem_limit", lambda device: 227 * 1024)
    q = torch.empty(2, 64, 576, dtype=torch.bfloat16)
    monkeypatch.setattr(kernels, "wgmma_available", lambda device=None: False)
    why = sp._why_not(q, q)
    assert why[1] is None and "compute capability 9.0" in why[2]
    assert TABLE.choose(None, why).version == 1  # elsewhere the default falls back to kernel 1
    with pytest.raises(ValueError, match=r"kernel 2 of cuda/sparse_mla_prefill.cu \(.*\) cannot run these inputs: "
                                         r"needs a GPU of compute capability 9\.0"):
        TABLE.choose(2, why)
    monkeypatch.setattr(kernels, "wgmma_available", lambda device=None: True)
    why = sp._why_not(q, q)
    assert why == {1: None, 2: None}
    assert TABLE.choose(None, why).version == 2 and TABLE.choose(1, why).version == 1
    monkeypatch.setattr(sp, "_smem_limit", lambda device: 163 * 1024)  # an A100's opt-in limit
    assert "shared memory" in sp._why_not(q, q)[1]


def test_misaligned_inputs_are_refused_by_both_kernels(monkeypatch):
    monkeypatch.setattr(sp, "_smem_limit", lambda device: 227 * 1024)
    buffer = torch.empty(2 * 64 * 576 + 8, dtype=torch.bfloat16)  # CPU allocations are 64-byte aligned
    aligned, shifted = buffer[:2 * 64 * 576].view(2, 64, 576), buffer[4:4 + 2 * 64 * 576].view(2, 64, 576)
    assert shifted.data_ptr() % 16 and not aligned.data_ptr() % 16
    why = sp._why_not(shifted, aligned)
    assert why[1] == why[2] and "q must start on a 16-byte boundary" in why[1]


# ----------------------------------------------------------------------------- kernel 1 on the CPU
# A numpy emulation of sparse_mla_prefill_mma's index arithmetic (cuda/sparse_mla_prefill.cu, kernel 1):
# the row-per-4-threads copies into the XOR-swizzled shared arrays, the lane -> row addresses given to
# ldmatrix, the PTX fragment layouts of mma.m16n8k16 and ldmatrix (.trans) (the helpers of the decode
# kernel's emulation, tests/test_sparse_attention.py), the key/output halves of the 8 warps, the row-max
# swap, float32 sums of the unrounded p, and the epilogue (bf16 out, max_logits, lse). Reading unwritten
# shared memory gives NaN.

_THREADS = np.arange(256)
_COPY_ROW, _COPY_PART = _THREADS // 4, _THREADS % 4


def _emulate_mma_block(q, kv, index_row, h0, S, scale):
    """One block of kernel 1: the 64 heads from h0 of one token. q [h, 576], kv [S, 576] (bf16 values as
    float64). Returns out [64, 512] (bf16-rounded), max_logits [64], lse [64]; NaN where unwritten."""
    L, HEADS, TILE, LC, PC = 576, 64, 64, 72, 8
    K = len(index_row)
    q_s, kv_s, p_s = np.full(HEADS * L, np.nan), np.full(2 * TILE * L, np.nan), np.full(HEADS * TILE, np.nan)
    row_s, valid_s = np.full(2 * HEADS, np.nan), np.zeros(2 * TILE, dtype=bool)
    eight = np.arange(8)
    for j in range(L // 8 // 4):  # thread (row, part) copies chunks 4 j + part of row `row`
        c = 4 * j + _COPY_PART
        values = q[h0 + _COPY_ROW][np.arange(256)[:, None], 8 * c[:, None] + eight]  # [256 threads, 8]
        q_s[_swizzled(_COPY_ROW, c, LC)[:, None] + eight] = values
    assert not np.isnan(q_s).any(), "the query copies leave a hole"

    def load_tile(tile, stage):
        slot = tile * TILE + _COPY_ROW
        s = np.array([index_row[i] if i < K else -1 for i in slot])
        used = (s >= 0) & (s < S)
        source = np.where(used, s, 0)
        kv_s[stage * TILE * L:(stage + 1) * TILE * L] = np.nan  # the stage's previous tile is dead
        for j in range(L // 8 // 4):
            c = 4 * j + _COPY_PART
            values = kv[source[:, None], 8 * c[:, None] + eight] * used[:, None]  # cp.async zero-fill
            kv_s[stage * TILE * L + _swizzled(_COPY_ROW, c, LC)[:, None] + eight] = values
        first = _COPY_PART == 0
        assert not np.isnan(kv_s[stage * TILE * L:(stage + 1) * TILE * L]).any(), "the copies leave a hole"
        valid_s[stage * TILE + _COPY_ROW[first]] = used[first]

    o = np.zeros((8, 32, 32, 4))
    row_max, row_sum = np.full((8, 32, 2), -np.inf), np.zeros((8, 32, 2))
    scale_log2 = np.float32(scale) * np.float32(1.4426950408889634)
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
        for warp in range(8):  # 2, 3. the shared max, P in bf16, float32 sums, up to barrier (C)
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
                p = np.exp2(scores[warp, n] - m_use[:, [0, 0, 1, 1]])  # [32, 4]
                row_sum[warp] += p.reshape(32, 2, 2).sum(-1)  # the unrounded values
                p = _bf16(p)
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
    out, max_logits, lse = np.full((64, 512), np.nan), np.full(64, np.nan), np.full(64, np.nan)
    quad_sum = row_sum.reshape(8, 8, 4, 2).sum(2).repeat(4, 1)  # [warp, lane, 2]
    for warp in range(8):
        mt, half = warp % 4, warp // 4
        for r in range(2):
            row_s[half * HEADS + 16 * mt + _G + 8 * r] = quad_sum[warp, :, r]
    for warp in range(8):
        mt, half = warp % 4, warp // 4
        for r in range(2):
            head = 16 * mt + _G + 8 * r
            total = quad_sum[warp, :, r] + row_s[(half ^ 1) * HEADS + head]
            inv_sum = np.where(total > 0, 1 / np.where(total > 0, total, 1), 0.0)
            for n in range(32):
                for j in range(2):
                    column = 256 * half + 8 * n + 2 * _T + j
                    assert np.isnan(out[head, column]).all(), "written twice"
                    out[head, column] = _bf16(o[warp, n, :, 2 * r + j] * inv_sum)
            if half == 0:
                first = _T == 0
                max_logits[head[first]] = np.where(total > 0, row_max[warp, :, r] * math.log(2), -np.inf)[first]
                lse[head[first]] = np.where(total > 0, np.log(np.where(total > 0, total, 1))
                                            + row_max[warp, :, r] * math.log(2), np.inf)[first]
    return out, max_logits, lse


def _emulation_case(seed=7):
    """One token, h = 128 (the second block's heads, h0 = 64), S = 150, k = 130: three tiles, the last
    ragged (2 slots), the first starting with 30 unused slots, a few more unused in the middle."""
    gen = torch.Generator().manual_seed(seed)
    S, h, k = 150, 128, 130
    q, kv = _bf16(torch.randn(h, 576, generator=gen)), _bf16(torch.randn(S, 576, generator=gen))
    indices = torch.randperm(S, generator=gen)[:k].int()
    indices[:30] = -1
    indices[77] = indices[100] = -1
    return q, kv, indices, S


def _wild(indices, S):
    """The unused (-1) slots rewritten as indices outside [0, S): S, past it, below -1, the int32 limits."""
    wild = indices.clone()
    unused = (wild == -1).nonzero().flatten()
    values = torch.tensor([S, S + 1000, -9, 2**31 - 1, -(2**31)], dtype=torch.int32)
    wild[unused] = values[torch.arange(len(unused)) % len(values)]
    return wild


def _reference_block(q, kv, indices, S, h0):
    t = torch.from_numpy
    out, max_logits, lse = sparse_mla_prefill(t(q)[None].float(), t(kv)[:, None].float(), indices[None, None], SCALE)
    return out[0, h0:h0 + 64], max_logits[0, h0:h0 + 64], lse[0, h0:h0 + 64]


def _assert_block_matches(got, ref, name):
    out, max_logits, lse = (torch.from_numpy(x) for x in got)
    ref_out, ref_max, ref_lse = ref
    compare.assert_close(out, ref_out, **_out_tolerance(ref_out), name=f"{name}: out")
    compare.assert_close(max_logits, ref_max, atol=1e-4, rtol=1e-5, name=f"{name}: max_logits")
    compare.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5, name=f"{name}: lse")


def test_mma_kernel_index_arithmetic_emulated_on_the_cpu():
    """Kernel 1's copies, swizzles, fragments and warp split, emulated: equal to the reference to
    bf16 accuracy; indices outside [0, S) act as -1; an empty selection gives 0, -inf, +inf."""
    q, kv, indices, S = _emulation_case()
    ref = _reference_block(q, kv, indices, S, 64)
    _assert_block_matches(_emulate_mma_block(q, kv, indices.tolist(), 64, S, SCALE), ref, "emulated kernel 1")
    got = _emulate_mma_block(q, kv, _wild(indices, S).tolist(), 64, S, SCALE)
    _assert_block_matches(got, ref, "emulated kernel 1, indices outside the cache")
    out, max_logits, lse = _emulate_mma_block(q, kv, [-1] * 70, 0, S, SCALE)
    assert (out == 0).all() and np.isneginf(max_logits).all() and np.isposinf(lse).all()


# ----------------------------------------------------------------------------- kernel 2 on the CPU
# A numpy emulation of sparse_mla_prefill_wgmma (kernel 2) on a byte-exact model of its shared memory:
# the carve from a base that is NOT 1024-byte aligned (rounded up as the kernel does), the cp.async copies
# into the column-blocked, 128B-swizzled tiles, every descriptor built as the kernel builds it, and the
# tensor cores modelled from the PTX ISA alone: a descriptor is decoded (start address, LBO, SBO,
# base offset, swizzle mode), the operand's element addresses follow the canonical 128B-swizzle layouts
# (K-major ((8,m),(T,2k)):((8T,SBO),(1,T)); MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)); T = 8 bf16),
# and the swizzle XORs address bits 4..6 with bits 7..9 of each address formed. The accumulator fragment
# (thread, register) -> (row, column) is the PTX one. Memory starts as 0xFF bytes (NaN as bf16 and
# float32): a read of anything not written in the right phase shows as NaN.

_RAW_BASE = 0x2A0  # the shared-window address of the dynamic shared memory: 16-byte aligned, not 1024


def _k_major_desc(address):
    """wgmma_desc of cuda/wgmma.cuh: start >> 4, LBO 1 (unused), SBO 1024 >> 4, swizzle mode 1."""
    return ((address & 0x3FFFF) >> 4) | (1 << 16) | ((1024 >> 4) << 32) | (1 << 62)


def _n_major_desc(address):
    """wgmma_desc_n_major of kernel 2: LBO 8192 >> 4, SBO 1024 >> 4, swizzle mode 1."""
    return ((address & 0x3FFFF) >> 4) | ((8192 >> 4) << 16) | ((1024 >> 4) << 32) | (1 << 62)


class _Smem:
    """The block's dynamic shared memory as bytes, addressed by shared-window addresses."""

    def __init__(self, size):
        self.bytes = np.full(size, 0xFF, dtype=np.uint8)

    def _at(self, address, nbytes):
        offset = np.asarray(address) - _RAW_BASE
        assert (offset >= 0).all() and (offset + nbytes <= len(self.bytes)).all(), "outside the allocation"
        return offset

    def write_bf16(self, address, values):
        """values (float) rounded to bf16 at byte `address` (arrays broadcast)."""
        address, values = np.broadcast_arrays(np.asarray(address), np.asarray(values, dtype=np.float32))
        bits = torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16).view(torch.int16).numpy()
        offset = self._at(address, 2)
        self.bytes[offset] = (bits.astype(np.uint16) & 0xFF).astype(np.uint8)
        self.bytes[offset + 1] = (bits.astype(np.uint16) >> 8).astype(np.uint8)

    def read_bf16(self, address):
        offset = self._at(address, 2)
        bits = self.bytes[offset].astype(np.uint32) | (self.bytes[offset + 1].astype(np.uint32) << 8)
        return (bits << 16).view(np.float32).astype(np.float64)

    def write_u32(self, address, values, dtype):
        raw = np.asarray(values, dtype=dtype).view(np.uint32)
        offset = self._at(address, 4)
        for b in range(4):
            self.bytes[offset + b] = ((raw >> (8 * b)) & 0xFF).astype(np.uint8)

    def read_u32(self, address, dtype):
        offset = self._at(address, 4)
        raw = sum(self.bytes[offset + b].astype(np.uint32) << (8 * b) for b in range(4))
        return np.asarray(raw, dtype=np.uint32).view(dtype)


def _operand(smem, desc, extent, n_major=False):
    """What the tensor cores read for one k16 step, from the descriptor alone (PTX ISA): K-major: the
    [extent rows, 16] matrix; N-major: the [16, extent] matrix (extent = N)."""
    start, lbo, sbo = (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
    assert (desc >> 62) == 1 and ((desc >> 49) & 7) == 0, "128-byte swizzle, base offset 0"
    if not n_major:  # row m, k: 8 rows of 128 bytes an atom, atoms SBO apart, k contiguous
        m, k = np.arange(extent)[:, None], np.arange(16)[None, :]
        address = start + (m // 8) * sbo + (m % 8) * 128 + 2 * k
    else:  # k, column n: 64 contiguous n in a 128-byte row, 8 k-rows an atom; next 64 n LBO on, next 8 k SBO on
        k, n = np.arange(16)[:, None], np.arange(extent)[None, :]
        address = start + (n // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + 2 * (n % 64)
    assert not n_major or start % 1024 == 0, "N-major steps start on whole atoms"
    address = address ^ (((address >> 7) & 7) << 4)  # the 128-byte swizzle, on the address formed
    return smem.read_bf16(address)


def _fragment(n_columns):
    """The wgmma accumulator layout: for thread i of a warpgroup (warp i // 32, lane 4g + t) and
    register r: (row, column) = (16 warp + g + 8 ((r // 2) % 2), 8 (r // 4) + 2t + r % 2)."""
    thread, register = np.arange(128)[:, None], np.arange(n_columns // 2)[None, :]
    warp, g, t = thread // 32, (thread % 32) // 4, thread % 4
    return 16 * warp + g + 8 * ((register // 2) % 2), 8 * (register // 4) + 2 * t + register % 2


def _blocked(row, chunk):
    """cuda: blocked(row, chunk), the byte offset of a chunk in a column-blocked swizzled tile."""
    return (chunk // 8) * D["WGMMA_BLOCK_BYTES"] + row * 128 + ((chunk % 8) ^ (row % 8)) * 16


def _emulate_wgmma_block(q, kv, index_row, h0, S, scale):
    """One block of kernel 2 (64 heads from h0 of one token): returns (out [64, 512], max_logits [64],
    lse [64]) as the kernel would store them, NaN where unwritten."""
    HEADS, TILE, TILE_BYTES = 64, 64, D["TILE_BYTES"]
    K = len(index_row)
    smem = _Smem(D["WGMMA_DYNAMIC_SMEM"])
    base = (_RAW_BASE + D["WGMMA_SMEM_ALIGN"] - 1) & ~(D["WGMMA_SMEM_ALIGN"] - 1)
    q_s = base
    kv_s = q_s + TILE_BYTES
    p_s = kv_s + 2 * TILE_BYTES
    row_s = p_s + D["P_BYTES"]
    valid_s = row_s + 2 * HEADS * 4
    assert valid_s + 2 * TILE * 4 <= _RAW_BASE + D["WGMMA_DYNAMIC_SMEM"], "the carve overflows the launch's bytes"
    eight = np.arange(8)
    for j in range(72 // 4):  # the query rows: thread (row, part) copies chunks 4 j + part
        c = 4 * j + _COPY_PART
        smem.write_bf16(q_s + _blocked(_COPY_ROW, c)[:, None] + 2 * eight,
                        q[h0 + _COPY_ROW][np.arange(256)[:, None], 8 * c[:, None] + eight])
    assert not np.isnan(smem.read_bf16(q_s + 2 * np.arange(TILE_BYTES // 2))).any(), "the query copies leave a hole"

    def load_tile(tile, stage):
        slot = tile * TILE + _COPY_ROW
        s = np.array([index_row[i] if i < K else -1 for i in slot])
        used = (s >= 0) & (s < S)
        source = np.where(used, s, 0)
        start = kv_s + stage * TILE_BYTES - _RAW_BASE
        smem.bytes[start:start + TILE_BYTES] = 0xFF  # the stage's previous tile is dead: poison it
        for j in range(72 // 4):
            c = 4 * j + _COPY_PART
            values = kv[source[:, None], 8 * c[:, None] + eight] * used[:, None]  # zero-filled when unused
            smem.write_bf16(kv_s + stage * TILE_BYTES + _blocked(_COPY_ROW, c)[:, None] + 2 * eight, values)
        first = _COPY_PART == 0
        assert not np.isnan(smem.read_bf16(kv_s + stage * TILE_BYTES + 2 * np.arange(TILE_BYTES // 2))).any()
        smem.write_u32(valid_s + 4 * (stage * TILE + _COPY_ROW[first]), used[first].astype(np.int32), np.int32)

    rows16, cols16 = _fragment(32)  # S_wg: [128 threads, 16 registers]
    rows128, cols128 = _fragment(256)  # O_wg: [128 threads, 128 registers]
    thread = np.arange(128)
    warp, g, t = thread // 32, (thread % 32) // 4, thread % 4
    o = np.zeros((2, 128, 128))
    row_max, row_sum = np.full((2, 128, 2), -np.inf), np.zeros((2, 128, 2))
    scale_log2 = np.float32(scale) * np.float32(1.4426950408889634)
    n_tiles = (K + TILE - 1) // TILE
    load_tile(0, 0)
    for tile in range(n_tiles):
        stage = tile % 2
        if tile + 1 < n_tiles:
            load_tile(tile + 1, stage ^ 1)
        stage_address = kv_s + stage * TILE_BYTES
        acc, tile_max = np.zeros((2, 128, 16)), np.full((2, 128, 2), -np.inf)
        for wg in range(2):  # 1. S_wg = Q K^T over 36 k-steps, both operands K-major
            keys_address = stage_address + 32 * wg * 128
            product = np.zeros((64, 32))
            for s in range(36):
                step = (s // 4) * D["WGMMA_BLOCK_BYTES"] + (s % 4) * 32
                a = _operand(smem, _k_major_desc(q_s + step), 64)  # [64 heads, 16]
                b = _operand(smem, _k_major_desc(keys_address + step), 32)  # [32 keys, 16]
                product = a @ b.T + (product if s > 0 else 0)
            acc[wg] = product[rows16, cols16]
            valid = smem.read_u32(valid_s + 4 * (stage * TILE + 32 * wg + 8 * (np.arange(16) // 4)[None, :]
                                                 + 2 * t[:, None] + np.arange(16)[None, :] % 2), np.int32)
            acc[wg] = np.where(valid != 0, acc[wg] * scale_log2, -np.inf)
            for r in range(2):
                mine = acc[wg][:, (np.arange(16) // 2) % 2 == r].max(1)
                tile_max[wg, :, r] = mine.reshape(32, 4).max(1).repeat(4)  # the quad's shuffles (per warp)
            first = t == 0
            for r in range(2):
                smem.write_u32(row_s + 4 * (wg * HEADS + 16 * warp[first] + g[first] + 8 * r),
                               tile_max[wg, first, r].astype(np.float32), np.float32)
        for wg in range(2):  # 2, 3. the shared max, P's columns 32 wg .., float32 sums (barrier B .. C)
            m_use = np.zeros((128, 2))
            for r in range(2):
                other = smem.read_u32(row_s + 4 * ((wg ^ 1) * HEADS + 16 * warp + g + 8 * r), np.float32)
                new_max = np.maximum(row_max[wg, :, r], np.maximum(tile_max[wg, :, r], other))
                m_use[:, r] = np.where(new_max == -np.inf, 0.0, new_max)
                alpha = np.exp2(row_max[wg, :, r] - m_use[:, r])
                row_max[wg, :, r] = new_max
                row_sum[wg, :, r] *= alpha
                o[wg][:, (np.arange(128) // 2) % 2 == r] *= alpha[:, None]
            for c in range(4):
                p = np.exp2(acc[wg][:, 4 * c:4 * c + 4] - m_use[:, [0, 0, 1, 1]])  # [128, 4]
                row_sum[wg] += p.reshape(128, 2, 2).sum(-1)
                head, chunk = 16 * warp + g, 4 * wg + c
                for r in range(2):
                    for j in range(2):
                        smem.write_bf16(p_s + _blocked(head + 8 * r, chunk) + 4 * t + 2 * j, p[:, 2 * r + j])
        for wg in range(2):  # 4. O_wg += P V[:, 256 wg ..], P K-major, V N-major
            values_address = stage_address + 4 * wg * D["WGMMA_BLOCK_BYTES"]
            product = np.zeros((64, 256))
            for kk in range(4):
                a = _operand(smem, _k_major_desc(p_s + 32 * kk), 64)  # [64 heads, 16 keys]
                b = _operand(smem, _n_major_desc(values_address + 2048 * kk), 256, n_major=True)  # [16, 256]
                assert not np.isnan(a).any(), "P read before it is written"
                product += a @ b
            o[wg] += product[rows128, cols128]
        smem.bytes[p_s - _RAW_BASE:p_s - _RAW_BASE + D["P_BYTES"]] = 0xFF  # P is dead until the next tile
    out, max_logits, lse = np.full((64, 512), np.nan), np.full(64, np.nan), np.full(64, np.nan)
    total_own = row_sum.reshape(2, 32, 4, 2).sum(2).repeat(4, 1)  # quad sums: [wg, thread, 2]
    for wg in range(2):
        first = t == 0
        for r in range(2):
            smem.write_u32(row_s + 4 * (wg * HEADS + 16 * warp[first] + g[first] + 8 * r),
                           total_own[wg, first, r].astype(np.float32), np.float32)
    for wg in range(2):
        for r in range(2):
            head = 16 * warp + g + 8 * r
            total = total_own[wg, :, r] + smem.read_u32(row_s + 4 * ((wg ^ 1) * HEADS + head), np.float32)
            inv_sum = np.where(total > 0, 1 / np.where(total > 0, total, 1), 0.0)
            for c in range(32):
                for j in range(2):
                    column = 256 * wg + 8 * c + 2 * t + j
                    assert np.isnan(out[head, column]).all(), "written twice"
                    assert (rows128[:, 4 * c + 2 * r + j] == head).all()  # the register holds that row ...
                    assert (cols128[:, 4 * c + 2 * r + j] == column - 256 * wg).all()  # ... and column
                    out[head, column] = _bf16(o[wg][:, 4 * c + 2 * r + j] * inv_sum)
            if wg == 0:
                first = t == 0
                max_logits[head[first]] = np.where(total > 0, row_max[wg, :, r] * math.log(2), -np.inf)[first]
                lse[head[first]] = np.where(total > 0, np.log(np.where(total > 0, total, 1))
                                            + row_max[wg, :, r] * math.log(2), np.inf)[first]
    return out, max_logits, lse


def test_wgmma_kernel_descriptors_and_layouts_emulated_on_the_cpu():
    """Kernel 2's carve, copies, descriptors (K-major and N-major) and fragments, emulated from the PTX
    ISA's layouts: equal to the reference to bf16 accuracy; an empty selection gives 0, -inf, +inf."""
    q, kv, indices, S = _emulation_case(seed=8)
    ref = _reference_block(q, kv, indices, S, 64)
    _assert_block_matches(_emulate_wgmma_block(q, kv, indices.tolist(), 64, S, SCALE), ref, "emulated kernel 2")
    ref0 = _reference_block(q, kv, indices, S, 0)
    _assert_block_matches(_emulate_wgmma_block(q, kv, indices.tolist(), 0, S, SCALE), ref0, "emulated kernel 2, h0 0")
    out, max_logits, lse = _emulate_wgmma_block(q, kv, [-1, S, -7], 0, S, SCALE)
    assert (out == 0).all() and np.isneginf(max_logits).all() and np.isposinf(lse).all()


def test_the_descriptor_model_reads_a_transposed_tile():
    """The N-major reading of the model, on its own: a tile written row by row (key r, values 0..575) read
    through kernel 2's V descriptors gives V[16 keys, 256 values] for each k-step and warpgroup."""
    smem = _Smem(D["WGMMA_DYNAMIC_SMEM"])
    base = (_RAW_BASE + 1023) & ~1023
    tile = _bf16(np.random.default_rng(0).standard_normal((64, 576)))
    for r in range(64):
        for c in range(72):
            smem.write_bf16(base + _blocked(r, c) + 2 * np.arange(8), tile[r, 8 * c:8 * c + 8])
    for wg in range(2):
        for kk in range(4):
            b = _operand(smem, _n_major_desc(base + 4 * wg * 8192 + 2048 * kk), 256, n_major=True)
            assert np.array_equal(b, tile[16 * kk:16 * kk + 16, 256 * wg:256 * wg + 256])
    for s in range(36):  # and the K-major k-steps: rows 32 .. 63, values 16 s .. 16 s + 15
        a = _operand(smem, _k_major_desc(base + 32 * 128 + (s // 4) * 8192 + (s % 4) * 32), 32)
        assert np.array_equal(a, tile[32:, 16 * s:16 * s + 16])


# ----------------------------------------------------------------------------- other targets

def test_the_wgmma_kernel_compiles_to_a_trap_elsewhere():
    # sm_90 (no "a"): no wgmma; the file still builds with both entry points, kernel 2 a trap
    code = ("import json; from dsa_tutorial import kernels; c = kernels.compile_source('sparse_mla_prefill', "
            "'sm_90', use_cache=False); print(json.dumps([c.entry_points(), c.log]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode and "GPUUnavailableError" in done.stderr:
        pytest.skip("no CUDA headers for NVRTC here")
    assert done.returncode == 0, done.stderr
    entries, log = json.loads(done.stdout)
    assert set(TABLE.entry_points()) <= set(entries)
    assert "warning" not in log.lower()


# ----------------------------------------------------------------------------- GPU

def _skip_unless_available(kernel):
    if kernel == WGMMA and sp.wgmma_why_not(torch.device("cuda")) is not None:
        pytest.skip(f"kernel 2 (wgmma, sm_90a) {sp.wgmma_why_not(torch.device('cuda'))}")


def _gpu_case(T, h, S, k, seed):
    """bf16 q, kv on the GPU and a causal selection with -1 slots; row 0 (when T > 1) selects nothing."""
    q, kv, indices = random_inputs(T, h, S, k, dtype=torch.float32, seed=seed, empty_rows=(0,) if T > 1 else ())
    return q.bfloat16().cuda(), kv.bfloat16().cuda(), indices.cuda()


def _reference(q, kv, indices):
    """sparse_mla_prefill in float32 on the same bf16 values (on the GPU)."""
    return sparse_mla_prefill(q.float(), kv.float(), indices, SCALE)


# Tolerances, against the float32 reference on the same bf16 inputs:
# * out: the scores are exact bf16 products summed in float32 (as good as the reference), but p is
#   rounded to bf16 (8 significant bits, relative error <= 2^-9) before P V and out is rounded to bf16
#   at the end (another 2^-9 of |out|): each output is a convex combination of the latents with weights
#   off by <= ~2^-8 relative, so at most ~2^-8 of their spread, and far less on average (random signs).
#   1e-2 relative to max|ref| (about 2.5 x 2^-8), plus calc_diff <= 1e-5 (typical errors ~1e-3 relative
#   give ~1e-6) to catch a systematic error hiding under the elementwise bound.
# * max_logits and lse: float32 throughout (the sums add the unrounded p); 576-term dot products in
#   another order, exp2 instead of exp: 1e-4 absolute (scores are O(10)) and 1e-5 relative.
def _out_tolerance(ref):
    finite = ref[torch.isfinite(ref)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    return dict(atol=1e-2 * scale, rtol=1e-2, max_calc_diff=1e-5)


def _assert_matches(got, ref, name):
    out, max_logits, lse = got
    assert out.dtype == torch.bfloat16 and max_logits.dtype == lse.dtype == torch.float32
    compare.assert_close(out.float(), ref[0], **_out_tolerance(ref[0]), name=f"{name}: out")
    compare.assert_close(max_logits, ref[1], atol=1e-4, rtol=1e-5, name=f"{name}: max_logits")
    compare.assert_close(lse, ref[2], atol=1e-4, rtol=1e-5, name=f"{name}: lse")


def _poisoned(T, h):
    return dict(out=compare.poisoned((T, h, 512), torch.bfloat16), max_logits=compare.poisoned((T, h), torch.float32),
                lse=compare.poisoned((T, h), torch.float32))


_SIZES = [(T, S, h, k) for T in (1, 5, 130) for S in (1, 70, 3000) for h in (64, 128)
          for k in (1, 63, 64, 200, 2048) if k != 2048 or S >= 2048]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", TABLE.versions)
@pytest.mark.parametrize("T, S, h, k", _SIZES)
def test_sparse_mla_prefill_cuda(T, S, h, k, kernel):
    _skip_unless_available(kernel)
    q, kv, indices = _gpu_case(T, h, S, k, seed=T * 7 + S + k + h)
    outputs = _poisoned(T, h)
    got = sparse_mla_prefill_cuda(q, kv, indices, SCALE, kernel=kernel, **outputs)
    assert all(a is b for a, b in zip(got, outputs.values()))
    _assert_matches(got, _reference(q, kv, indices), f"sparse_mla_prefill kernel {kernel}")
    if T > 1:  # the row with nothing selected
        assert bool((got[0][0] == 0).all()) and bool(torch.isneginf(got[1][0]).all())
        assert bool(torch.isposinf(got[2][0]).all())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", TABLE.versions)
def test_wild_indices_with_data_checks_off_are_never_read(kernel):
    """Data checks off (the default): indices outside [0, S) are not checked; the kernels treat them as
    unused slots, bit for bit as -1. compute-sanitizer runs benchmarks/sanitize_sparse_prefill.py with
    such values too."""
    _skip_unless_available(kernel)
    q, kv, indices = _gpu_case(9, 128, 500, 150, seed=5)
    with checks.data_checks(False):
        clean = sparse_mla_prefill_cuda(q, kv, indices, SCALE, kernel=kernel)
        wild = indices.clone()
        unused = wild == -1
        values = torch.tensor([500, 501, 10**6, 2**31 - 1, -2, -(2**31)], dtype=torch.int32, device="cuda")
        wild[unused] = values[torch.arange(int(unused.sum()), device="cuda") % len(values)]
        got = sparse_mla_prefill_cuda(q, kv, wild, SCALE, kernel=kernel, **_poisoned(9, 128))
    for a, b in zip(got, clean):
        assert torch.equal(a, b)
    _assert_matches(got, _reference(q, kv, indices), f"kernel {kernel}, wild indices")
    with checks.data_checks(True), pytest.raises(ValueError, match="indices must be"):
        sparse_mla_prefill_cuda(q, kv, wild, SCALE, kernel=kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", TABLE.versions)
def test_more_tokens_than_grid_y_holds(kernel):
    # 70000 tokens (grid.y stops at 65535; the kernels put tokens on grid.x): spot-check tokens on both sides
    _skip_unless_available(kernel)
    T, h, S, k = 70000, 64, 100, 5
    gen = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(T, h, 576, device="cuda", generator=gen).bfloat16()
    kv = torch.randn(S, 1, 576, device="cuda", generator=gen).bfloat16()
    indices = torch.rand(T, S, device="cuda", generator=gen).argsort(dim=-1)[:, :k].int()[:, None].contiguous()
    got = sparse_mla_prefill_cuda(q, kv, indices, SCALE, kernel=kernel, **_poisoned(T, h))
    for part in got:
        assert not bool(part.float().isnan().any())
    rows = torch.tensor([0, 1, 65534, 65535, 65536, 69999], device="cuda")
    ref = _reference(q[rows], kv, indices[rows])
    _assert_matches(tuple(x[rows] for x in got), ref, f"kernel {kernel}, T = 70000")


@pytest.mark.gpu
def test_empty_sizes_write_the_empty_rows_without_a_launch():
    q, kv, indices = _gpu_case(3, 64, 20, 8, seed=1)
    for args in ((q, kv, indices[..., :0].contiguous()), (q, kv[:0], torch.full_like(indices, -1))):
        out, max_logits, lse = sparse_mla_prefill_cuda(*args, SCALE, **_poisoned(3, 64))
        assert bool((out == 0).all()) and bool(torch.isneginf(max_logits).all()) and bool(torch.isposinf(lse).all())
    out, max_logits, lse = sparse_mla_prefill_cuda(q[:0], kv, indices[:0], SCALE)
    assert out.shape == (0, 64, 512) and lse.shape == (0, 64)


@pytest.mark.gpu
def test_the_default_kernel_and_refusals():
    q, kv, indices = _gpu_case(4, 64, 300, 100, seed=2)
    default = TABLE.choose(None, sp._why_not(q, kv)).version
    assert default == TABLE.best_first[0] == 2  # wgmma on an H200
    for a, b in zip(sparse_mla_prefill_cuda(q, kv, indices, SCALE),
                    sparse_mla_prefill_cuda(q, kv, indices, SCALE, kernel=default)):
        assert torch.equal(a, b)
    shifted = torch.empty(q.numel() + 4, dtype=torch.bfloat16, device="cuda")[4:].view_as(q)  # 8 bytes off
    shifted.copy_(q)
    with pytest.raises(ValueError, match="16-byte boundary"):
        sparse_mla_prefill_cuda(shifted, kv, indices, SCALE)
    with pytest.raises(ValueError, match="out must have shape"):
        sparse_mla_prefill_cuda(q, kv, indices, SCALE, out=torch.empty(4, 64, 511, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(TypeError, match="lse must be float32"):
        sparse_mla_prefill_cuda(q, kv, indices, SCALE, lse=torch.empty(4, 64, device="cuda", dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", TABLE.versions)
def test_no_host_synchronisation_and_a_cuda_graph_equals_eager(kernel):
    _skip_unless_available(kernel)
    T, h, S, k = 64, 128, 4096, 2048
    static = list(_gpu_case(T, h, S, k, seed=3))
    sparse_mla_prefill_cuda(*static, SCALE, kernel=kernel)  # compile and load first: a one-time cost
    torch.cuda.synchronize()
    with checks.data_checks(False):
        torch.cuda.set_sync_debug_mode("error")
        try:
            sparse_mla_prefill_cuda(*static, SCALE, kernel=kernel)  # would raise on any synchronising call
        finally:
            torch.cuda.set_sync_debug_mode("default")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            sparse_mla_prefill_cuda(*static, SCALE, kernel=kernel)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = sparse_mla_prefill_cuda(*static, SCALE, kernel=kernel)
        for seed in (4, 5):  # new data in the same buffers
            for buffer, fresh in zip(static, _gpu_case(T, h, S, k, seed=seed)):
                buffer.copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            eager = sparse_mla_prefill_cuda(*static, SCALE, kernel=kernel)
            for a, b in zip(captured, eager):
                assert torch.equal(a, b), f"graph replay differs from the eager call (seed {seed})"
    _assert_matches(eager, _reference(*static), f"kernel {kernel}, graph")
