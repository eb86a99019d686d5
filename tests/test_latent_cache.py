"""The FP8 latent cache (FlashMLA's DeepSeek-V3.2 layout), the MLA switch that simulates it, and sparse
MLA decoding over it: the reference, the host side of the CUDA call, kernels 2 and 3 emulated on the CPU,
and every kernel on the GPU (kernel 4, warp-specialised, also bit for bit against kernel 3)."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsa_tutorial import checks, compare, fp8, kernels
from dsa_tutorial import latent_cache as lc
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.latent_cache import (SPARSE_MLA_DECODE_FP8_KERNELS, dequantize, latent_round_trip, quantize,
                                       sparse_mla_decode_fp8, sparse_mla_decode_fp8_cuda)
from dsa_tutorial.mla import MLA, causal_mask, kv_compress, rotary_key
from dsa_tutorial.sparse_attention import DSAttention, sparse_mla_attention

TINY = ModelArgs.tiny()
SCALE = ModelArgs().softmax_scale
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
TABLE = SPARSE_MLA_DECODE_FP8_KERNELS
WGMMA = 3  # the wgmma version of kernel 2's structure
WGMMA_VERSIONS = (3, 4)  # the versions that need compute capability 9.0 (sm_90a: wgmma, setmaxnreg)


def random_latents(num_blocks, block_size, seed=0, device="cpu"):
    """bf16 latents [num_blocks, block_size, 1, 576]: N(0, 1) values, each token's c^KV times its own power of
    two (2^-3 .. 2^3), so that the tiles' scales differ from token to token."""
    gen = torch.Generator(device=device).manual_seed(seed)
    kv = torch.randn(num_blocks, block_size, 1, 576, generator=gen, device=device)
    spread = 2.0 ** torch.randint(-3, 4, (num_blocks, block_size, 1, 1), generator=gen, device=device)
    kv[..., :512] *= spread
    return kv.bfloat16()


def strided(cache, extra_rows=3, offset_blocks=1):
    """The same cache inside a bigger buffer: blocks (block_size + extra_rows) * 656 bytes apart, starting
    offset_blocks blocks in (FlashMLA's tests allocate their cache this way). The gaps hold NaN bytes."""
    num_blocks, block_size = cache.shape[:2]
    shape = (num_blocks + offset_blocks, block_size + extra_rows, 1, 656)
    buffer = torch.full(shape, 0xFF, dtype=torch.uint8, device=cache.device).view(torch.float8_e4m3fn)
    view = buffer[offset_blocks:, :block_size]
    view.copy_(cache)
    assert view.stride(0) == (block_size + extra_rows) * 656 and not view.is_contiguous()
    return view


# ----------------------------------------------------------------------------- the format

def test_format_constants_agree_with_the_kernels():
    d = TABLE.defines()
    for name in ("D_NOPE", "D_ROPE", "D_QK", "QUANT_TILE", "SCALES_AT", "ROPE_AT", "TOKEN_BYTES"):
        assert getattr(lc, name) == d[name], name
    assert (lc.SCALES_AT, lc.ROPE_AT, lc.TOKEN_BYTES) == (512, 528, 656)
    # shared memory: kernel 1 float32 queries and latents (577-word rows), scores, slot offsets and scales;
    # kernel 2 Q, two raw stages, the bf16 tile and two rows of valid flags, within the H200's 227 KiB a block
    assert d["SIMT_SMEM_BYTES"] == (32 + 32) * 577 * 4 + 32 * 32 * 4 + 32 * (8 + 16) == 149 * 1024
    assert d["MMA_SMEM_BYTES"] == 64 * 576 * 2 + 2 * 64 * 656 + 64 * 576 * 2 + 2 * 64 * 4 == 231936
    assert d["MMA_SMEM_BYTES"] <= 227 * 1024
    assert d["P_BYTES"] + 2 * 64 * 4 <= d["RAW_STAGE_BYTES"]  # P and the row maxima fit a consumed stage
    # kernel 3: Q, the bf16 tile, two raw stages (no flags), 1024-byte aligned inside: exactly the 227 KiB
    assert d["WGMMA_CARVE_BYTES"] == 64 * 576 * 2 + 64 * 576 * 2 + 2 * 64 * 656 == 226 * 1024
    assert d["WGMMA_DYNAMIC_SMEM"] == d["WGMMA_SMEM_ALIGN"] + d["WGMMA_CARVE_BYTES"] == 227 * 1024
    assert d["RAW_STAGE_BYTES"] % d["WGMMA_SMEM_ALIGN"] == 0  # P, in a consumed raw stage, starts aligned
    assert d["Q_SMEM_BYTES"] == d["KV_SMEM_BYTES"] == 9 * d["WGMMA_BLOCK_BYTES"]  # 9 column blocks of 64 values
    assert d["WGMMA_THREADS"] == d["MMA_THREADS"] == 256
    assert "149 KiB" in TABLE[1].needs and "226.5 of the 227 KiB" in TABLE[2].needs
    assert "compute capability 9.0" in TABLE[3].needs and "227 KiB" in TABLE[3].needs
    # kernel 4: Q, two bf16 buffers (no raw stage), P, the row exchange [2][64] f32, the flags [2][64] i32 and
    # four 8-byte mbarriers, 1024-byte aligned inside: 226 KiB and change, under the 227 KiB a block
    assert d["WS_CARVE_BYTES"] == 64 * 576 * 2 * 3 + 64 * 64 * 2 + 2 * 64 * 4 + 2 * 64 * 4 + 4 * 8 == 230432
    assert d["WS_DYNAMIC_SMEM"] == d["WGMMA_SMEM_ALIGN"] + d["WS_CARVE_BYTES"] <= 227 * 1024
    assert d["WS_THREADS"] == 3 * 128 and d["WS_CONSUMER_THREADS"] == 256  # a producer and two consumer warpgroups
    # the mbarriers count warps: full when the producer's 4 have stored, empty when the consumers' 8 are done
    # full: one arrival a producer warp; empty: one a consumer thread (each after its own reads of the flags)
    assert 32 * d["WS_FULL_ARRIVALS"] == 128 and d["WS_EMPTY_ARRIVALS"] == d["WS_CONSUMER_THREADS"]
    # setmaxnreg: the three warpgroups' registers within the SM's 64K, from the 168 a thread the launch gives
    assert d["WS_PRODUCER_REGS"] + 2 * d["WS_CONSUMER_REGS"] <= 65536 // 128
    assert d["WS_CONSUMER_REGS"] >= 65536 // 384 // 8 * 8 >= d["WS_PRODUCER_REGS"]
    assert "compute capability 9.0" in TABLE[4].needs and "226 of the 227 KiB" in TABLE[4].needs


def test_the_table_and_its_entry_points():
    assert TABLE.versions == (1, 2, 3, 4)
    assert [k.entry for k in TABLE] == ["sparse_mla_decode_fp8_simt", "sparse_mla_decode_fp8_mma",
                                        "sparse_mla_decode_fp8_wgmma", "sparse_mla_decode_fp8_ws"]
    assert TABLE.best_first == (4, 3, 2, 1)  # kernel 4 (wgmma, warp-specialised) where it runs, else kernel 2
    compiled = kernels.compile_source("sparse_mla_decode_fp8")  # NVRTC, no GPU needed
    assert set(compiled.entry_points()) == {*TABLE.entry_points(), lc.COMBINE_ENTRY}


def test_quantize_layout_and_round_trip():
    kv = random_latents(3, 5, seed=1)
    cache = quantize(kv)
    assert cache.shape == (3, 5, 1, 656) and cache.dtype == torch.float8_e4m3fn and cache.is_contiguous()
    token = cache.view(torch.uint8)
    scales = token[..., 512:528].contiguous().view(torch.float32)  # [3, 5, 1, 4]
    # every scale is a power of two: the smallest with amax / s <= 448 (amax floored at 1e-4), here in float64
    amax = kv[..., :512].double().unflatten(-1, (4, 128)).abs().amax(-1)
    mantissa, _ = torch.frexp(scales)
    assert bool((mantissa == 0.5).all())
    expected = torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-4) / 448)))
    assert torch.equal(scales.double(), expected)
    # dequantize(quantize(x)) is x up to e4m3 rounding: half an ulp of 3 mantissa bits (2^-4 relative) for
    # normal values, half the subnormal step 2^-9 s below 2^-6 s
    back = dequantize(cache)
    assert back.shape == (3, 5, 1, 576) and back.dtype == torch.bfloat16
    err = (back.double() - kv.double())[..., :512]
    tile_scale = scales.double().repeat_interleave(128, -1)
    bound = torch.maximum(kv[..., :512].double().abs() * 2**-4, tile_scale * 2**-10)
    assert bool((err.abs() <= bound).all())
    assert err.abs().max() > 0  # it does round
    assert torch.equal(back[..., 512:], kv[..., 512:])  # k^R is stored as it was
    # the e4m3 bytes are e4m3(x / s), in float32
    x_q = (kv[..., :512].float() / scales.repeat_interleave(128, -1)).to(torch.float8_e4m3fn)
    assert torch.equal(token[..., :512], x_q.view(torch.uint8))


def test_a_hand_built_token_byte_by_byte():
    kv = torch.zeros(1, 1, 1, 576)
    kv[..., :4] = torch.tensor([3.0, -1.0, 0.3, 0.001])  # tile 0: amax 3 -> s = 2^ceil(log2(3 / 448)) = 2^-7
    kv[..., 128:256] = 1.0  # tile 1: s = 2^ceil(log2(1 / 448)) = 2^-8, every value 256 s
    # tile 2 stays zero: amax floored at 1e-4, s = 2^ceil(log2(1e-4 / 448)) = 2^-22 (FlashMLA's helper: 2^-13)
    kv[..., 384] = -1000.0  # tile 3: s = 2^ceil(log2(1000 / 448)) = 4; -1000 / 4 = -250 -> e4m3 -256
    kv[..., 512:] = torch.arange(64) * 0.5 - 16
    kv = kv.bfloat16()
    row = quantize(kv).view(torch.uint8).flatten().tolist()
    # e4m3 = sign | 4 exponent bits (bias 7) | 3 mantissa bits
    #   3 / 2^-7 = 384 = 1.5 * 2^8                   -> 0 1111 100 = 0x7C
    #   -1 / 2^-7 = -128 = -1.0 * 2^7                -> 1 1110 000 = 0xF0
    #   bf16(0.3) / 2^-7 = 38.5 -> 40 = 1.25 * 2^5   -> 0 1100 010 = 0x62
    #   bf16(0.001) / 2^-7 = 0.1279 -> 0.125 = 2^-3 -> 0 0100 000 = 0x20
    #   1 / 2^-8 = 256 = 1.0 * 2^8                   -> 0 1111 000 = 0x78
    #   -250 -> -256 = -1.0 * 2^8                     -> 1 1111 000 = 0xF8
    expected = [0x7C, 0xF0, 0x62, 0x20] + [0] * 124 + [0x78] * 128 + [0] * 128 + [0xF8] + [0] * 127
    expected += list(struct.pack("<4f", 2.0**-7, 2.0**-8, 2.0**-22, 4.0))  # the scales, float32 little-endian
    expected += list(kv[0, 0, 0, 512:].contiguous().view(torch.uint8).tolist())  # k^R's bf16 bytes
    assert row == expected
    back = dequantize(quantize(kv)).float().flatten()
    assert back[:4].tolist() == [3.0, -1.0, 0.3125, 0.0009765625] and back[384].item() == -1024.0


def test_rotary_bytes_are_copied_exactly():
    # every bf16 bit pattern k^R can hold comes back: -0, subnormals, the largest finite values, inf, NaN
    patterns = torch.tensor([0x8000, 0x0001, 0x807F, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC1, 0x3F80, 0x1234],
                            dtype=torch.int32).to(torch.int16)
    kv = random_latents(2, 3, seed=2)
    rope = torch.randint(-32768, 32768, (2, 3, 1, 64), dtype=torch.int32).to(torch.int16)
    rope[0, 0, 0, :10] = patterns
    kv[..., 512:] = rope.view(torch.bfloat16)
    cache = quantize(kv)
    assert torch.equal(cache.view(torch.uint8)[..., 528:].contiguous().view(torch.int16), rope)
    assert torch.equal(dequantize(cache)[..., 512:].view(torch.int16), rope)


def test_strided_blocks_read_like_contiguous_ones():
    kv = random_latents(4, 16, seed=3)
    cache = quantize(kv)
    view = strided(cache, extra_rows=5)
    assert torch.equal(dequantize(view).view(torch.int16), dequantize(cache).view(torch.int16))
    q = torch.randn(2, 2, 64, 576).bfloat16()
    indices = torch.stack([torch.randperm(64)[:20] for _ in range(4)]).int().view(2, 2, 20)
    from_view = sparse_mla_decode_fp8(q, view, indices, SCALE)
    from_cache = sparse_mla_decode_fp8(q, cache, indices, SCALE)
    assert all(torch.equal(a, b) for a, b in zip(from_view, from_cache))
    assert lc.check_cache(view) == {"num_blocks": 4, "block_size": 16, "block_stride": 21 * 656}


def test_latent_round_trip_is_the_cache_round_trip():
    kv = random_latents(2, 7, seed=4)
    c_kv, k_rope = latent_round_trip(kv[..., :512].float(), kv[..., 512:].float())
    assert c_kv.dtype == torch.float32 and k_rope.dtype == torch.float32
    assert torch.equal(torch.cat([c_kv, k_rope], -1).bfloat16(), dequantize(quantize(kv)))
    # float32 inputs are rounded to bf16 first (the official model holds its latents in bf16)
    x = torch.randn(3, 512, dtype=torch.float64)
    c, k = latent_round_trip(x, x[:, :64])
    assert c.dtype == torch.float64 and torch.equal(k, x[:, :64].bfloat16().double())
    assert torch.equal(c, latent_round_trip(x.bfloat16().double(), x[:, :64])[0])
    assert torch.equal(latent_round_trip(c, k)[0], c)  # a second trip changes nothing
    # the tiny model's 16 values are one tile
    small, _ = latent_round_trip(torch.randn(5, 16), torch.randn(5, 8))
    assert small.shape == (5, 16)
    with pytest.raises(ValueError, match="below 128 or a multiple of it"):
        latent_round_trip(torch.randn(5, 200), torch.randn(5, 8))


@pytest.mark.parametrize("call, error, match", [
    (lambda: quantize(torch.randn(2, 4, 1, 576)), TypeError, "kv must be bfloat16"),
    (lambda: quantize(torch.randn(2, 4, 1, 575).bfloat16()), ValueError,
     r"kv must have shape \[\?, \?, 1, 576\]"),
    (lambda: quantize(torch.randn(2, 4, 2, 576).bfloat16()), ValueError, r"\[\?, \?, 1, 576\]"),
    (lambda: quantize(torch.randn(8, 576).bfloat16()), ValueError, "kv must have 4 dims"),
    (lambda: dequantize(torch.zeros(2, 4, 1, 656, dtype=torch.uint8)), TypeError,
     "kv_cache must be float8_e4m3fn"),
    (lambda: dequantize(torch.zeros(2, 4, 1, 576, dtype=torch.float8_e4m3fn)), ValueError, "656"),
    (lambda: dequantize(torch.zeros(8, 656, dtype=torch.float8_e4m3fn)), ValueError, "must have 4 dims"),
    # blocks that overlap (an expanded cache), tokens of a block not 656 bytes apart
    (lambda: dequantize(torch.zeros(1, 4, 1, 656, dtype=torch.float8_e4m3fn).expand(3, 4, 1, 656)),
     ValueError, "blocks overlap: block stride 0 bytes, less than block_size \\* 656 = 2624"),
    (lambda: dequantize(torch.zeros(2, 8, 1, 656, dtype=torch.float8_e4m3fn)[:, ::2]), ValueError,
     "tokens of a block must be contiguous"),
    (lambda: dequantize(torch.zeros(656, 2, 4, 1, dtype=torch.float8_e4m3fn).permute(1, 2, 3, 0)), ValueError,
     r"the 656 bytes of a token .* must be contiguous .* got \[4, 1, 1, 8\]"),
])
def test_bad_cache_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_one_block_and_one_row_blocks_have_no_stride_rule():
    # a stride along a dimension of size 1 means nothing: a single block, or blocks of one token, are accepted
    # whatever torch reports for it
    one = quantize(random_latents(1, 4, seed=5))
    assert lc.check_cache(one.as_strided(one.shape, (7, 656, 656, 1)))["block_stride"] == 4 * 656
    rows = quantize(random_latents(5, 1, seed=5))
    assert lc.check_cache(rows.as_strided(rows.shape, (656, 3, 656, 1)))["block_stride"] == 656


# ----------------------------------------------------------------------------- the MLA switch

def _layers(cls, seed):
    torch.manual_seed(seed)
    plain, fp8 = cls(TINY), cls(TINY, latent_cache_fp8=True)
    fp8.load_state_dict(plain.state_dict())
    return plain, fp8


@pytest.mark.parametrize("cls", [MLA, DSAttention])
def test_the_fp8_latent_cache_moves_the_layer_output_a_little(cls):
    """How much reading the latents through the FP8 cache moves the output of the tiny layer (T = 40, k = 8
    for DSA), relative in the Frobenius norm: measured 2.96 % (MLA) and 3.33 % (DSA) for these weights and
    inputs, 2.9-3.4 % over four random draws. That is e4m3's 3 mantissa bits (relative rounding up to 2^-4,
    about 3.6 % rms over a binade), averaged over the heads."""
    plain, fp8 = _layers(cls, seed=7)
    assert fp8.mla.latent_cache_fp8 if cls is DSAttention else fp8.latent_cache_fp8
    h = torch.randn(2, 40, TINY.dim)
    with torch.no_grad():
        out, out_fp8 = plain(h), fp8(h)
    relative = ((out_fp8 - out).norm() / out.norm()).item()
    assert 0.005 < relative < 0.08, f"{cls.__name__}: the FP8 cache moved the output by {relative:.4f}"


def test_the_default_is_unchanged_and_the_switch_is_the_round_trip_by_hand():
    plain, fp8 = _layers(MLA, seed=8)
    default = MLA(TINY, latent_cache_fp8=False)
    default.load_state_dict(plain.state_dict())
    h, T = torch.randn(2, 12, TINY.dim), 12
    positions = torch.arange(T)
    with torch.no_grad():
        assert torch.equal(default(h), plain(h))
        # off (the default), the latents are kv_compress and RoPE's, bit for bit: nothing rounds them
        c_kv, k_rope = plain.latents(h, positions)
        c_ref, k_pe = kv_compress(h, plain.wkv_a.weight, plain.kv_norm.weight, TINY)
        assert torch.equal(c_kv, c_ref) and torch.equal(k_rope, rotary_key(k_pe, positions, TINY))
        c_fp8, k_fp8 = fp8.latents(h, positions)
        assert torch.equal(c_fp8, latent_round_trip(c_kv, k_rope)[0])
        assert torch.equal(k_fp8, k_rope.bfloat16().float())
        # MQA-mode MLA written out with the round-tripped latents
        q_nope, q_rope = plain.queries(plain.query_latent(h), positions)
        q_abs = plain.absorb_query(q_nope)
        scores = plain.latent_scores(q_abs, q_rope, c_fp8, k_fp8) + causal_mask(T, T)[:, None, :]
        p = torch.softmax(scores, dim=-1)
        expected = plain.latent_output(torch.einsum("bths,bsc->bthc", p, c_fp8))
        compare.assert_close(fp8(h), expected, atol=1e-6, rtol=1e-5, name="MLA(latent_cache_fp8=True)")
        # the cache holds what the attention read
        from dsa_tutorial.mla import LatentCache

        cache = LatentCache(TINY, 2)
        fp8(h, cache=cache)
        assert torch.equal(cache.c_kv, c_fp8)
    with pytest.raises(TypeError, match="latent_cache_fp8 must be True or False"):
        MLA(TINY, latent_cache_fp8=1)


# ----------------------------------------------------------------------------- the reference

def _reference_by_loops(q, cache, indices, scale):
    """sparse_mla_decode_fp8 spelled out in float64 over the whole dequantised cache, head by head."""
    kv = dequantize(cache).double().flatten(0, 2)  # [tokens, 576]
    B, s_q, h, _ = q.shape
    out = torch.zeros(B, s_q, h, 512, dtype=torch.float64)
    lse = torch.full((B, s_q, h), math.inf, dtype=torch.float64)
    for b in range(B):
        for t in range(s_q):
            chosen = [i for i in indices[b, t].tolist() if 0 <= i < kv.shape[0]]
            if not chosen:
                continue
            for i in range(h):
                scores = torch.stack([q[b, t, i].double() @ kv[j] for j in chosen]) * scale
                lse[b, t, i] = torch.logsumexp(scores, 0)
                out[b, t, i] = torch.exp(scores - lse[b, t, i]) @ kv[chosen, :512]
    return out, lse


def test_reference_equals_the_formula_spelled_out():
    cache = quantize(random_latents(5, 16, seed=9))
    q = torch.randn(2, 2, 3, 576).bfloat16()
    indices = torch.stack([torch.randperm(80)[:13] for _ in range(4)]).int().view(2, 2, 13)
    indices[0, 0, 3:6] = -1
    indices[1, 1] = -1  # a row with nothing selected
    out, lse = sparse_mla_decode_fp8(q, cache, indices, SCALE)
    assert out.shape == (2, 2, 3, 512) and out.dtype == torch.float32 and lse.shape == (2, 2, 3)
    ref_out, ref_lse = _reference_by_loops(q, cache, indices, SCALE)
    compare.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    compare.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6)
    assert bool((out[1, 1] == 0).all()) and bool(torch.isposinf(lse[1, 1]).all())
    # lse is a natural log: one selected token gives lse = its score, and p = 1
    one = torch.full((1, 1, 13), -1, dtype=torch.int32)
    one[0, 0, 7] = 42
    out1, lse1 = sparse_mla_decode_fp8(q[:1, :1], cache, one, SCALE)
    kv42 = dequantize(cache).float().flatten(0, 2)[42]
    compare.assert_close(lse1[0, 0], (q[0, 0].float() @ kv42) * SCALE, atol=1e-5, rtol=1e-6)
    compare.assert_close(out1[0, 0], kv42[:512].expand(3, 512), atol=0, rtol=0)


def test_reference_is_sparse_mla_attention_on_the_dequantised_cache():
    # chapter 6's sparse attention over the same (dequantised) latents, with q = [q_abs | q_rope]
    cache = quantize(random_latents(6, 64, seed=10))  # 384 tokens, one sequence
    q = torch.randn(1, 2, 64, 576).bfloat16()
    indices = torch.stack([torch.randperm(384)[:100] for _ in range(2)]).int()[None]
    indices[0, 1, -9:] = -1
    out, _ = sparse_mla_decode_fp8(q, cache, indices, SCALE)
    kv = dequantize(cache).float().flatten(0, 2)[None]  # [1, S, 576]
    q_abs, q_rope = q.float().split([512, 64], dim=-1)
    o = sparse_mla_attention(q_abs, q_rope, kv[..., :512], kv[..., 512:], indices, SCALE)
    # both float32, summing in other orders: scores up to ~30 agree to ~1e-5, p and out to ~1e-4 of max|out|
    tolerance = dict(atol=2e-4 * o.abs().max().item(), rtol=1e-4, max_calc_diff=1e-10)
    compare.assert_close(out, o, **tolerance)
    # and the slot order does not matter
    shuffled = indices[..., torch.randperm(100)]
    compare.assert_close(sparse_mla_decode_fp8(q, cache, shuffled, SCALE)[0], out, **tolerance)
    assert sparse_mla_decode_fp8(q, cache, indices, SCALE, d_v=576)[0].shape == (1, 2, 64, 576)


@pytest.mark.parametrize("bad, error, match", [
    (dict(indices=torch.tensor([[[0, 80]]], dtype=torch.int32)), ValueError, "indices must be <= 79"),
    (dict(indices=torch.tensor([[[0, -2]]], dtype=torch.int32)), ValueError, ">= -1"),
    (dict(indices=torch.tensor([[[5, 5]]], dtype=torch.int32)), ValueError, "repeat"),
    (dict(indices=torch.tensor([[[0, 1]]])), TypeError, "int32"),
    (dict(indices=torch.zeros(2, 1, 2, dtype=torch.int32)), ValueError, "B = 2"),
    (dict(q=torch.randn(1, 1, 4, 512).bfloat16()), ValueError, "576"),
    (dict(q=torch.randn(1, 1, 4, 576, dtype=torch.float64)), TypeError, "bfloat16 or float32"),
    (dict(softmax_scale=-1.0), ValueError, "positive"),
    (dict(d_v=0), ValueError, "d_v must be an int in"),
    (dict(kv_cache=torch.zeros(5, 16, 1, 656, dtype=torch.uint8)), TypeError, "float8_e4m3fn"),
    (dict(kv_cache=torch.zeros(5, 16, 1, 656, dtype=torch.float8_e4m3fn, device="meta")), ValueError,
     "kv_cache must be on cpu"),
])
def test_reference_bad_input(bad, error, match):
    args = dict(q=torch.randn(1, 1, 4, 576).bfloat16(), kv_cache=quantize(random_latents(5, 16)),
                indices=torch.tensor([[[0, 1]]], dtype=torch.int32), softmax_scale=SCALE)
    args.update(bad)
    with pytest.raises(error, match=match):
        sparse_mla_decode_fp8(**args)


def test_an_empty_cache_or_selection_gives_zero_and_plus_inf():
    q = torch.randn(1, 2, 4, 576).bfloat16()
    empty = torch.zeros(0, 64, 1, 656, dtype=torch.float8_e4m3fn)
    out, lse = sparse_mla_decode_fp8(q, empty, torch.full((1, 2, 3), -1, dtype=torch.int32), SCALE)
    assert bool((out == 0).all()) and bool(torch.isposinf(lse).all())
    nothing = torch.zeros(1, 2, 0, dtype=torch.int32)
    out, lse = sparse_mla_decode_fp8(q, quantize(random_latents(2, 4)), nothing, SCALE)
    assert out.shape == (1, 2, 4, 512) and bool((out == 0).all()) and bool(torch.isposinf(lse).all())


# ----------------------------------------------------------------------------- the CUDA call's host side

def _host_inputs(h=64, k=130, block_size=16, num_blocks=20):
    q = torch.randn(2, 2, h, 576).bfloat16()
    cache = quantize(random_latents(num_blocks, block_size, seed=11))
    indices = torch.stack([torch.randperm(num_blocks * block_size)[:k] for _ in range(4)]).int().view(2, 2, k)
    return q, cache, indices


@pytest.mark.parametrize("change, error, match", [
    (dict(h=96), ValueError, r"the kernels serve h in \[64, 128\] heads .*got h = 96"),
    (dict(h=256), ValueError, "got h = 256"),
    (dict(h=32), ValueError, "got h = 32"),
])
def test_cuda_host_checks_refuse_unsupported_heads(change, error, match):
    q, cache, indices = _host_inputs(**change)
    with pytest.raises(error, match=match):
        lc.check_decode_inputs(q, cache, indices, SCALE, for_kernels=True)
    lc.check_decode_inputs(q, cache, indices, SCALE)  # the reference takes any h


def test_cuda_host_checks_on_the_cpu():
    q, cache, indices = _host_inputs()
    dims = lc.check_decode_inputs(q, cache, indices, SCALE, for_kernels=True)
    assert dims == dict(B=2, s_q=2, h=64, k=130, num_blocks=20, block_size=16, block_stride=16 * 656)
    with pytest.raises(TypeError, match="q must be bfloat16"):
        lc.check_decode_inputs(q.float(), cache, indices, SCALE, for_kernels=True)
    strided_q = q.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match="q must be contiguous"):
        lc.check_decode_inputs(strided_q, cache, indices, SCALE, for_kernels=True)
    strided_indices = indices.transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="indices must be contiguous"):
        lc.check_decode_inputs(q, cache, strided_indices, SCALE, for_kernels=True)
    with pytest.raises(ValueError, match="q must be on a CUDA device"):
        lc.check_decode_inputs(q, cache, indices, SCALE, for_kernels=True, cuda=True)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE)
    # outputs: made when not given, checked when given
    out, lse = lc._outputs(dims, None, None, "cpu")
    assert out.shape == (2, 2, 64, 512) and out.dtype == torch.bfloat16 and lse.shape == (2, 2, 64)
    with pytest.raises(ValueError, match=r"out must have shape \[2, 2, 64, 512\]"):
        lc._outputs(dims, torch.empty(2, 2, 64, 576, dtype=torch.bfloat16), None, "cpu")
    with pytest.raises(TypeError, match="out must be bfloat16"):
        lc._outputs(dims, torch.empty(2, 2, 64, 512), None, "cpu")
    with pytest.raises(TypeError, match="lse must be float32"):
        lc._outputs(dims, None, torch.empty(2, 2, 64, dtype=torch.float64), "cpu")
    with pytest.raises(ValueError, match="lse must be contiguous"):
        lc._outputs(dims, None, torch.empty(2, 64, 2).transpose(1, 2), "cpu")


def test_kernel_choice_and_its_reasons():
    q, cache, indices = _host_inputs()
    out = torch.empty(2, 2, 64, 512, dtype=torch.bfloat16)
    why = lc._why_not(q, cache, out, 16 * 656, 227 * 1024)
    assert why[1] is None and why[2] is None
    assert why[3] == fp8.wgmma_why_not(q.device) and "compute capability 9.0" in why[3]  # on the CPU
    assert why[4] == why[3]
    with pytest.raises(ValueError, match="kernel 4 of cuda/sparse_mla_decode_fp8.cu .* compute capability 9.0"):
        TABLE.choose(4, why)
    assert TABLE.choose(None, why).version == 2
    with pytest.raises(ValueError, match="kernel 3 of cuda/sparse_mla_decode_fp8.cu .* compute capability 9.0"):
        TABLE.choose(3, why)
    # a cache 8 bytes past a 16-byte boundary, a block stride that is not a multiple of 16: kernel 1 only
    buffer = torch.zeros(20 * 16 * 656 + 8, dtype=torch.uint8).view(torch.float8_e4m3fn)
    shifted = buffer[8:].view(20, 16, 1, 656)
    why = lc._why_not(q, shifted, out, 16 * 656, 227 * 1024)
    assert "kv_cache must start on a 16-byte boundary" in why[2] and why[1] is None
    assert TABLE.choose(None, why).version == 1
    with pytest.raises(ValueError, match="kernel 2 of cuda/sparse_mla_decode_fp8.cu .* 16-byte boundary"):
        TABLE.choose(2, why)
    odd_stride = torch.zeros(3, 16 * 656 + 4, dtype=torch.uint8).view(torch.float8_e4m3fn)[:, :16 * 656]
    odd_stride = odd_stride.view(3, 16, 1, 656)
    assert lc.check_cache(odd_stride)["block_stride"] == 16 * 656 + 4
    assert "multiple of 16" in lc._why_not(q, odd_stride, out, 16 * 656 + 4, 227 * 1024)[2]
    small = lc._why_not(q, cache, out, 16 * 656, 100 * 1024)  # a GPU with 100 KiB a block
    assert "shared memory" in small[1] and "shared memory" in small[2]
    with pytest.raises(ValueError, match="no kernel of cuda/sparse_mla_decode_fp8.cu runs these inputs"):
        TABLE.choose(None, small)


def test_kernel_3_refusals_where_wgmma_runs(monkeypatch):
    """Kernel 3's other reasons, as they read on a GPU with wgmma (fp8.wgmma_why_not answering None)."""
    monkeypatch.setattr(fp8, "wgmma_why_not", lambda device: None)
    q, cache, indices = _host_inputs()
    out = torch.empty(2, 2, 64, 512, dtype=torch.bfloat16)
    d = TABLE.defines()
    assert lc._why_not(q, cache, out, 16 * 656, 227 * 1024) == {1: None, 2: None, 3: None, 4: None}
    assert TABLE.choose(None, lc._why_not(q, cache, out, 16 * 656, 227 * 1024)).version == 4  # the default
    shifted = torch.zeros(20 * 16 * 656 + 8, dtype=torch.uint8).view(torch.float8_e4m3fn)[8:].view(20, 16, 1, 656)
    for version in WGMMA_VERSIONS:  # kernel 4 loads 16-byte rows as kernel 3 copies them: the same rules
        assert "kv_cache must start on a 16-byte boundary" in lc._why_not(q, shifted, out, 16 * 656, 227 * 1024)[version]
        assert "multiple of 16" in lc._why_not(q, cache, out, 16 * 656 + 4, 227 * 1024)[version]
    # a GPU that allows kernel 2's 226.5 KiB but not kernel 3's 227; kernel 4 asks for 226 KiB
    tight = lc._why_not(q, cache, out, 16 * 656, d["MMA_SMEM_BYTES"])
    assert tight[2] is None and f"needs {d['WGMMA_DYNAMIC_SMEM']} bytes of shared memory" in tight[3]
    assert tight[4] is None
    tighter = lc._why_not(q, cache, out, 16 * 656, d["WS_DYNAMIC_SMEM"] - 16)
    assert f"needs {d['WS_DYNAMIC_SMEM']} bytes of shared memory" in tighter[4]


@pytest.mark.parametrize("n_rows, n_heads, k, n_sms, expected", [
    (256, 128, 2048, 132, (1, 32)),  # the benchmark: 512 blocks already fill the SMs
    (64, 128, 2048, 132, (1, 32)),   # 128 blocks: one wave already (2 splits would make two)
    (33, 128, 2048, 132, (2, 16)),   # 66 blocks: 2 splits fill one wave
    (1, 128, 2048, 132, (16, 2)),    # 2 blocks: 16 splits of 2 tiles (66 would fit)
    (4, 128, 2048, 132, (16, 2)),    # 8 blocks: 16 splits fit
    (6, 128, 2048, 132, (11, 3)),    # 12 blocks: 11 fit, 3 tiles each
    (1, 64, 700, 132, (4, 3)),       # 11 tiles (the last ragged): at most 5 splits of 2, so 3 tiles a split
    (1, 64, 128, 132, (1, 2)),       # 2 tiles: too few to split
    (1, 64, 64, 132, (1, 1)),
    (1, 64, 0, 132, (1, 1)),
])
def test_split_count_from_the_shapes(n_rows, n_heads, k, n_sms, expected):
    n_splits, per_split = lc.decode_splits(n_rows, n_heads, k, n_sms)
    assert (n_splits, per_split) == expected
    n_tiles = max(1, math.ceil(k / 64))
    assert (n_splits - 1) * per_split < n_tiles <= n_splits * per_split  # every split has a tile
    assert n_splits == 1 or (per_split >= TABLE.defines()["SPLIT_MIN_TILES"]
                             and n_splits * n_rows * n_heads // 64 <= n_sms)  # one wave


def _recorded(monkeypatch) -> list:
    launches = []
    def record(source, entry, grid, block, args, shared_mem=0):
        launches.append((source, entry, grid if isinstance(grid, int) else tuple(grid), block, tuple(args),
                         shared_mem))

    monkeypatch.setattr(kernels, "launch", record)
    return launches


def test_launch_geometry_and_arguments(monkeypatch):
    launches = _recorded(monkeypatch)
    q, cache, indices = _host_inputs(h=128, k=700, num_blocks=50)
    view = strided(cache, extra_rows=2)
    out, lse = torch.empty(2, 2, 128, 512, dtype=torch.bfloat16), torch.empty(2, 2, 128)
    d = TABLE.defines()
    lc._launch(1, q, view, indices, SCALE, out, lse, 132, view.stride(0))
    (source, entry, grid, block, args, smem), = launches
    assert (source, entry) == ("sparse_mla_decode_fp8", "sparse_mla_decode_fp8_simt")
    assert (grid, block, smem) == ((4, 4), 256, d["SIMT_SMEM_BYTES"])
    assert args[1] == view.data_ptr() and args[1] != cache.data_ptr()  # the strided cache by its address
    assert args[5:10] == (128, 700, 50, 16, 18 * 656) and args[2] is indices and args[3] is out
    launches.clear()
    # kernel 2 at 4 rows x 2 head groups = 8 blocks (x: the row's head groups side by side): split (11 tiles:
    # 4 splits of <= 3), then the combine
    lc._launch(2, q, view, indices, SCALE, out, lse, 132, view.stride(0))
    (_, entry, grid, block, args, smem), (_, combine, c_grid, c_block, c_args, c_smem) = launches
    assert (entry, grid, block, smem) == ("sparse_mla_decode_fp8_mma", (8, 1, 4), 256, d["MMA_SMEM_BYTES"])
    o_partial, lse_partial = args[5], args[6]
    assert o_partial.shape == (4, 4, 128, 512) and lse_partial.shape == (4, 4, 128)
    assert args[7:13] == (128, 700, 50, 16, 18 * 656, 3)
    assert (combine, c_grid, c_block, c_smem) == (lc.COMBINE_ENTRY, 4 * 128 // 4, 128, 0)
    assert c_args[0] is o_partial and c_args[1] is lse_partial and c_args[2:] == (out, lse, 4 * 128, 4)
    launches.clear()
    # no split at 132 blocks or more: one launch, straight into out and lse
    lc._launch(2, q, view, indices, SCALE, out, lse, 8, view.stride(0))
    (_, entry, grid, _, args, _), = launches
    assert grid == (8, 1, 1) and args[3] is out and args[4] is lse and args[12] == 11
    assert args[5] == args[6] == 0  # no workspace
    launches.clear()
    # kernel 3: the same arguments, grid, split and combine; its own threads and shared memory
    lc._launch(3, q, view, indices, SCALE, out, lse, 132, view.stride(0))
    (_, entry, grid, block, args, smem), (_, combine, c_grid, _, c_args, _) = launches
    assert (entry, grid, block, smem) == ("sparse_mla_decode_fp8_wgmma", (8, 1, 4), 256, d["WGMMA_DYNAMIC_SMEM"])
    assert args[5].shape == (4, 4, 128, 512) and args[6].shape == (4, 4, 128)
    assert args[1] == view.data_ptr() and args[7:13] == (128, 700, 50, 16, 18 * 656, 3)
    assert combine == lc.COMBINE_ENTRY and c_args[0] is args[5] and c_args[2:] == (out, lse, 4 * 128, 4)
    launches.clear()
    lc._launch(3, q, view, indices, SCALE, out, lse, 8, view.stride(0))
    (_, entry, grid, _, args, _), = launches
    assert entry == "sparse_mla_decode_fp8_wgmma" and grid == (8, 1, 1) and args[5] == args[6] == 0
    launches.clear()
    # kernel 4: kernel 3's arguments, grid, split and combine; three warpgroups and its own shared memory
    lc._launch(4, q, view, indices, SCALE, out, lse, 132, view.stride(0))
    (_, entry, grid, block, args, smem), (_, combine, c_grid, _, c_args, _) = launches
    assert (entry, grid, block, smem) == ("sparse_mla_decode_fp8_ws", (8, 1, 4), 384, d["WS_DYNAMIC_SMEM"])
    assert args[5].shape == (4, 4, 128, 512) and args[6].shape == (4, 4, 128)
    assert args[1] == view.data_ptr() and args[7:13] == (128, 700, 50, 16, 18 * 656, 3)
    assert combine == lc.COMBINE_ENTRY and c_args[0] is args[5] and c_args[2:] == (out, lse, 4 * 128, 4)
    launches.clear()
    lc._launch(4, q, view, indices, SCALE, out, lse, 8, view.stride(0))
    (_, entry, grid, _, args, _), = launches
    assert entry == "sparse_mla_decode_fp8_ws" and grid == (8, 1, 1) and args[5] == args[6] == 0


def test_the_wgmma_kernel_compiles_to_a_trap_elsewhere():
    # sm_90 (no "a"): no wgmma; the file still builds with every entry point, kernel 3 a trap
    code = ("import json; from dsa_tutorial import kernels; c = kernels.compile_source('sparse_mla_decode_fp8', "
            "'sm_90', use_cache=False); print(json.dumps([c.entry_points(), c.log]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode and "GPUUnavailableError" in done.stderr:
        pytest.skip("no CUDA headers for NVRTC here")
    assert done.returncode == 0, done.stderr
    entries, log = json.loads(done.stdout)
    assert {*TABLE.entry_points(), lc.COMBINE_ENTRY} <= set(entries)
    assert "warning" not in log.lower()


def test_cuda_call_checks_before_any_launch(monkeypatch):
    launches = _recorded(monkeypatch)
    q, cache, indices = _host_inputs()
    with pytest.raises(ValueError):
        sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE)
    with pytest.raises(ValueError):
        sparse_mla_decode_fp8_cuda(q[:, :, :32].contiguous(), cache, indices, SCALE)
    assert launches == []


# ----------------------------------------------------------------------------- kernel 2 on the CPU
# A numpy emulation of sparse_mla_decode_fp8_mma (cuda/sparse_mla_decode_fp8.cu, kernel 2) and of the combine
# kernel: its shared memory as one byte array laid out as the .cu carves it (Q, two raw stages, the bf16 tile,
# the valid flags), the cp.async gather of 656-byte rows by 4 threads a token from a strided cache, the
# dequantisation into the swizzled bf16 tile, P and the row-max exchange written into the consumed raw stage,
# the sums in the bf16 tile after the loop, and the split writes. Phases run warp by warp between the kernel's
# barriers; memory that the kernel considers free is poisoned (0xFF bytes: NaN as bf16 and float32), so a read
# of anything not written in the right phase shows as NaN. The mma fragments, ldmatrix addressing and swizzle
# helpers are those of the emulation of sparse_mla_attention_mma (tests/test_sparse_attention.py), whose
# expressions kernel 2 shares.

from tests.test_sparse_attention import _G, _LANE, _T, _bf16, _ldmatrix_x4, _mma, _swizzled  # noqa: E402

D = TABLE.defines()


def _as(smem, offset, count, dtype):
    """count values of `dtype` at byte `offset` of the shared-memory bytes, as float64 numpy (a copy)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return smem[offset:offset + count * size].view(dtype).double().numpy()


def _put(smem, offset, values, dtype):
    """Write float values as `dtype` at byte `offset`."""
    data = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(dtype).view(torch.uint8)
    smem[offset:offset + data.numel()] = data


def _token_row(s, num_blocks, block_size, block_stride):
    """cuda: token_row, as a byte offset into the cache (None for an unused slot)."""
    if s < 0 or s // block_size >= num_blocks:
        return None
    return (s // block_size) * block_stride + (s % block_size) * 656


def _emulate_mma_block(q_rows, cache_bytes, num_blocks, block_size, block_stride, index_row, split,
                       tiles_per_split, n_splits, scale):
    """One block of kernel 2 (one query row, 64 heads, one split): returns (o [64, 512], lse [64]) as it
    writes them, o rounded to bf16 when n_splits == 1 (then into out), float32 otherwise (into o_partial)."""
    Q, RAW, KV = D["Q_SMEM_BYTES"], D["RAW_STAGE_BYTES"], D["KV_SMEM_BYTES"]
    LC, P_BYTES, TILE, HEADS = D["L_CHUNKS"], D["P_BYTES"], D["MMA_TILE"], D["MMA_HEADS"]
    raw_at, kv_at, valid_at = Q, Q + 2 * RAW, Q + 2 * RAW + KV
    smem = torch.full((D["MMA_SMEM_BYTES"],), 0xFF, dtype=torch.uint8)  # never-written memory reads as NaN
    k = len(index_row)
    for r in range(HEADS):  # the queries, swizzled (all 64 heads exist: h is a multiple of 64)
        for c in range(LC):
            _put(smem, 2 * _swizzled(r, c, LC), q_rows[r, 8 * c:8 * c + 8], torch.bfloat16)

    def load_tile(tile, stage):
        for tid in range(D["MMA_THREADS"]):
            r, part = tid // D["LOADERS"], tid % D["LOADERS"]
            j = tile * TILE + r
            token = _token_row(index_row[j] if j < k else -1, num_blocks, block_size, block_stride)
            dst = raw_at + stage * RAW + r * 656
            for c in range(part, D["RAW_CHUNKS"], D["LOADERS"]):
                smem[dst + 16 * c:dst + 16 * c + 16] = (cache_bytes[token + 16 * c:token + 16 * c + 16]
                                                        if token is not None else 0)
            if part == 0:
                _put(smem, valid_at + 4 * (stage * TILE + r), [token is not None], torch.int32)

    def dequantize_tile(stage):
        for i in range(TILE * LC):
            r, c = i // LC, i % LC
            token = raw_at + stage * RAW + r * 656
            if c < D["NOPE_CHUNKS"]:
                values = smem[token + 8 * c:token + 8 * c + 8].view(torch.float8_e4m3fn).float()
                scale_c = smem[token + 512 + 4 * (8 * c // 128):][:4].view(torch.float32)
                chunk = (values * scale_c).bfloat16().view(torch.uint8)
            else:
                chunk = smem[token + 528 + 16 * (c - 64):][:16].clone()
            smem[kv_at + 2 * _swizzled(r, c, LC):][:16] = chunk

    o = np.zeros((8, 32, 32, 4))
    row_max, row_sum = np.full((8, 32, 2), -np.inf), np.zeros((8, 32, 2))
    scale_log2 = np.float32(scale) * np.float32(1.4426950408889634)
    n_tiles = (k + TILE - 1) // TILE
    first, last = split * tiles_per_split, min(split * tiles_per_split + tiles_per_split, n_tiles)
    if first < last:
        load_tile(first, 0)
    for tile in range(first, last):
        stage = (tile - first) % 2
        if tile + 1 < last:
            load_tile(tile + 1, stage ^ 1)
        smem[kv_at:kv_at + KV] = 0xFF  # overwritten whole by the dequantisation
        dequantize_tile(stage)
        smem[raw_at + stage * RAW:raw_at + (stage + 1) * RAW] = 0xFF  # (D): the consumed stage is free
        p_at, row_at = raw_at + stage * RAW, raw_at + stage * RAW + P_BYTES
        q_mem = _as(smem, 0, HEADS * 576, torch.bfloat16)
        kv_mem = _as(smem, kv_at, TILE * 576, torch.bfloat16)
        valid = _as(smem, valid_at + 4 * stage * TILE, TILE, torch.int32)
        scores, tile_max = np.zeros((8, 4, 32, 4)), np.full((8, 32, 2), -np.inf)
        for warp in range(8):  # 1. scores and the row maxima into row_s, up to (B)
            mt, half = warp % 4, warp // 4
            for kk in range(576 // 16):
                a = _ldmatrix_x4(q_mem, _swizzled(16 * mt + _LANE % 16, 2 * kk + _LANE // 16, LC))
                for n_pair in range(2):
                    key_rows = 32 * half + 16 * n_pair + _LANE % 8 + 8 * (_LANE // 16)
                    kb = _ldmatrix_x4(kv_mem, _swizzled(key_rows, 2 * kk + (_LANE // 8) % 2, LC))
                    _mma(scores[warp, 2 * n_pair], a, kb[0], kb[1])
                    _mma(scores[warp, 2 * n_pair + 1], a, kb[2], kb[3])
            for n in range(4):
                for e in range(4):
                    used = valid[32 * half + 8 * n + 2 * _T + e % 2] != 0
                    scores[warp, n, :, e] = np.where(used, scores[warp, n, :, e] * scale_log2, -np.inf)
                    tile_max[warp, :, e // 2] = np.maximum(tile_max[warp, :, e // 2], scores[warp, n, :, e])
            tile_max[warp] = tile_max[warp].reshape(8, 4, 2).max(1).repeat(4, 0)  # the quad's shuffles
            for r in range(2):
                for lane in range(0, 32, 4):  # t == 0
                    at = row_at + 4 * (half * HEADS + 16 * mt + _G[lane] + 8 * r)
                    _put(smem, at, [tile_max[warp, lane, r]], torch.float32)
        for warp in range(8):  # 2, 3. the shared max, P in bf16, up to (C)
            mt, half = warp % 4, warp // 4
            m_use = np.zeros((32, 2))
            for r in range(2):
                other = _as(smem, row_at + 4 * ((half ^ 1) * HEADS + 16 * mt + 8 * r), 8, torch.float32)[_G]
                assert not np.isnan(other).any(), "row_s read before it was written"
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
                    for lane in range(32):
                        at = _swizzled(16 * mt + _G[lane] + 8 * r, 4 * half + n, D["P_CHUNKS"]) + 2 * _T[lane]
                        _put(smem, p_at + 2 * at, p[lane, 2 * r:2 * r + 2], torch.bfloat16)
        p_mem = _as(smem, p_at, HEADS * TILE, torch.bfloat16)
        assert not np.isnan(p_mem).any(), "P not fully written"
        for warp in range(8):  # 4. o += P V
            mt, half = warp % 4, warp // 4
            for kk in range(TILE // 16):
                a = _ldmatrix_x4(p_mem, _swizzled(16 * mt + _LANE % 16, 2 * kk + _LANE // 16, D["P_CHUNKS"]))
                for n_pair in range(16):
                    vb = _ldmatrix_x4(kv_mem, _swizzled(16 * kk + _LANE % 8 + 8 * ((_LANE // 8) % 2),
                                                        32 * half + 2 * n_pair + _LANE // 16, LC), trans=True)
                    _mma(o[warp, 2 * n_pair], a, vb[0], vb[1])
                    _mma(o[warp, 2 * n_pair + 1], a, vb[2], vb[3])
    # after the loop: the sums exchanged through the bf16 tile's memory
    smem[kv_at:kv_at + KV] = 0xFF
    quad = row_sum.reshape(8, 8, 4, 2).sum(2).repeat(4, 1)  # [warp, lane, 2]
    for warp in range(8):
        mt, half = warp % 4, warp // 4
        for r in range(2):
            for lane in range(0, 32, 4):
                at = kv_at + 4 * (half * HEADS + 16 * mt + _G[lane] + 8 * r)
                _put(smem, at, [quad[warp, lane, r]], torch.float32)
    out, lse = np.full((HEADS, 512), np.nan), np.full(HEADS, np.nan)
    whole = n_splits == 1
    for warp in range(8):
        mt, half = warp % 4, warp // 4
        for r in range(2):
            total = quad[warp, :, r] + _as(smem, kv_at + 4 * ((half ^ 1) * HEADS + 16 * mt + 8 * r), 8,
                                           torch.float32)[_G]
            inv_sum = np.where(total > 0, 1 / np.where(total > 0, total, 1), 0.0)
            log2_total = np.log2(np.where(total > 0, total, 1))
            row_lse = np.where(total > 0, (row_max[warp, :, r] + log2_total) * math.log(2),
                               np.inf if whole else -np.inf)
            for lane in range(32):
                head = 16 * mt + _G[lane] + 8 * r
                values = o[warp, :, lane, 2 * r:2 * r + 2] * inv_sum[lane]  # [32 n, 2]
                columns = 256 * half + 8 * np.arange(32)[:, None] + 2 * _T[lane] + np.arange(2)
                assert np.isnan(out[head, columns]).all(), "written twice"
                out[head, columns] = _bf16(values) if whole else values
                if half == 0 and _T[lane] == 0:
                    lse[head] = row_lse[lane]
    return out, lse


def _emulate_combine(o_partial, lse_partial):
    """sparse_mla_decode_fp8_combine for one (row, head): o_partial [n_splits, 512], lse_partial [splits]."""
    m = lse_partial.max()
    if m == -np.inf:
        return np.zeros(512), np.inf
    total_lse = m + np.log(np.exp(lse_partial - m).sum())
    return _bf16((np.exp(lse_partial - total_lse)[:, None] * o_partial).sum(0)), total_lse


def test_mma_kernel_emulated_on_the_cpu():
    """Kernel 2's gather from a strided cache, dequantisation, shared-memory plan, lse and split + combine,
    emulated: equal to the reference to the kernel's tolerance (P in bf16, out in bf16)."""
    gen = torch.Generator().manual_seed(12)
    num_blocks, block_size, k = 9, 16, 150  # 144 tokens; 3 tiles, the last ragged (22 slots)
    cache = strided(quantize(random_latents(num_blocks, block_size, seed=13)), extra_rows=3)
    cache_bytes = torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())[cache.storage_offset():]
    q = torch.randn(1, 1, 64, 576, generator=gen).bfloat16()
    indices = torch.randperm(144, generator=gen)[:k].int()
    indices[:40] = -1  # the first tile's first 40 slots unused
    indices[-3] = -1
    wild = indices.clone()  # unused slots written as values outside [0, 144): ignored like -1
    wild[:5] = torch.tensor([144, 10**6, INT32_MAX, INT32_MIN, -7], dtype=torch.int32)
    ref_out, ref_lse = sparse_mla_decode_fp8(q, cache, indices[None, None], SCALE)
    ref_out, ref_lse = ref_out[0, 0], ref_lse[0, 0]
    q_rows = q[0, 0].float().numpy()
    args = (q_rows, cache_bytes, num_blocks, block_size, cache.stride(0))
    tolerance = dict(atol=1e-2 * ref_out.abs().max().item(), rtol=1e-2, max_calc_diff=1e-5)
    whole_out, whole_lse = _emulate_mma_block(*args, wild.tolist(), 0, 3, 1, SCALE)
    compare.assert_close(torch.from_numpy(whole_out), ref_out, **tolerance, name="emulated kernel 2")
    compare.assert_close(torch.from_numpy(whole_lse), ref_lse, atol=4e-3, name="emulated kernel 2 lse")
    # two splits ([0, 2) and [2, 3) of the 3 tiles), merged by the combine
    parts = [_emulate_mma_block(*args, wild.tolist(), s, 2, 2, SCALE) for s in range(2)]
    o_partial, lse_partial = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
    merged = [_emulate_combine(o_partial[:, i], lse_partial[:, i]) for i in range(64)]
    merged_out = torch.tensor(np.stack([m[0] for m in merged]))
    merged_lse = torch.tensor([m[1] for m in merged])
    compare.assert_close(merged_out, ref_out, **tolerance, name="split + combine")
    compare.assert_close(merged_lse, ref_lse, atol=4e-3, name="split + combine lse")
    # a split whose slots are all unused: o = 0, lse = -inf (no weight in the combine); all empty: 0, +inf
    empty = [-1] * 64 + wild.tolist()[64:]
    o0, lse0 = _emulate_mma_block(*args, empty, 0, 1, 3, SCALE)
    assert (o0 == 0).all() and np.isneginf(lse0).all()
    assert _emulate_combine(np.zeros((3, 512)), np.full(3, -np.inf))[1] == np.inf
    none_out, none_lse = _emulate_mma_block(*args, [-1] * 70, 0, 2, 1, SCALE)
    assert (none_out == 0).all() and np.isposinf(none_lse).all()


# ----------------------------------------------------------------------------- kernel 3 on the CPU
# A numpy emulation of sparse_mla_decode_fp8_wgmma (kernel 3) on the byte-exact shared-memory model of the
# prefill wgmma kernel's emulation (tests/test_sparse_prefill.py: a base that is NOT 1024-byte aligned,
# descriptors decoded from the PTX ISA's canonical 128B-swizzle layouts, the wgmma accumulator fragment):
# the carve (Q, the bf16 tile, two raw stages), the gather of 656-byte rows from a strided cache, the
# dequantisation into the column-blocked tile, P and the row exchange in the consumed raw stage, every
# descriptor as the kernel builds it, each thread's validity test on the indices (not the loader's), the
# sums in the bf16 tile after the loop, and the split writes. Memory the kernel considers free is poisoned
# (0xFF: NaN as bf16 and float32).

from tests.test_sparse_prefill import (_RAW_BASE, _Smem, _blocked, _fragment, _k_major_desc,  # noqa: E402
                                       _n_major_desc, _operand)


def _emulate_wgmma_block(q_rows, cache_bytes, num_blocks, block_size, block_stride, index_row, split,
                         tiles_per_split, n_splits, scale):
    """One block of kernel 3 (one query row, 64 heads, one split): (o [64, 512], lse [64]) as it writes them,
    o rounded to bf16 when n_splits == 1 (into out), float32 otherwise (into o_partial); NaN where unwritten."""
    Q, RAW, KV, P_BYTES, TILE, HEADS = (D["Q_SMEM_BYTES"], D["RAW_STAGE_BYTES"], D["KV_SMEM_BYTES"], D["P_BYTES"],
                                        D["MMA_TILE"], D["MMA_HEADS"])
    BLOCK = D["WGMMA_BLOCK_BYTES"]
    k = len(index_row)
    cache_np = cache_bytes.numpy()
    smem = _Smem(D["WGMMA_DYNAMIC_SMEM"])
    base = (_RAW_BASE + D["WGMMA_SMEM_ALIGN"] - 1) & ~(D["WGMMA_SMEM_ALIGN"] - 1)
    q_s, kv_s = base, base + Q
    raw_s = kv_s + KV
    assert raw_s + 2 * RAW <= _RAW_BASE + D["WGMMA_DYNAMIC_SMEM"], "the carve overflows the launch's bytes"
    assert (raw_s + RAW) % 1024 == 0 and raw_s % 1024 == 0, "P (in either raw stage) starts aligned"
    rows, chunks, eight = np.arange(HEADS)[:, None, None], np.arange(72)[None, :, None], np.arange(8)
    smem.write_bf16(q_s + _blocked(rows, chunks) + 2 * eight, q_rows.reshape(HEADS, 72, 8))  # the queries
    assert not np.isnan(smem.read_bf16(q_s + 2 * np.arange(Q // 2))).any(), "the query copies leave a hole"

    def load_tile(tile, stage):  # thread (r, part) copies chunks part, part + 4, .. of slot r's token
        dst0 = raw_s + stage * RAW - _RAW_BASE
        smem.bytes[dst0:dst0 + RAW] = 0xFF  # the stage's previous content is dead
        for tid in range(D["WGMMA_THREADS"]):
            r, part = tid // D["LOADERS"], tid % D["LOADERS"]
            j = tile * TILE + r
            token = _token_row(index_row[j] if j < k else -1, num_blocks, block_size, block_stride)
            for c in range(part, D["RAW_CHUNKS"], D["LOADERS"]):
                at = dst0 + r * 656 + 16 * c
                smem.bytes[at:at + 16] = cache_np[token + 16 * c:token + 16 * c + 16] if token is not None else 0

    def dequantize_tile(stage):  # row r: 64 chunks of 8 e4m3 values times their scale, then k^R's 8 chunks
        start = kv_s - _RAW_BASE
        smem.bytes[start:start + KV] = 0xFF  # overwritten whole
        for r in range(TILE):
            at = raw_s + stage * RAW + r * 656 - _RAW_BASE
            token = torch.from_numpy(smem.bytes[at:at + 656].copy())
            scales = token[512:528].view(torch.float32).repeat_interleave(128)
            c_kv = (token[:512].view(torch.float8_e4m3fn).float() * scales).bfloat16().view(torch.uint8)
            row_bytes = torch.cat([c_kv, token[528:]]).numpy().reshape(72, 16)
            for c in range(72):
                offset = kv_s + _blocked(r, c) - _RAW_BASE
                smem.bytes[offset:offset + 16] = row_bytes[c]

    rows16, cols16 = _fragment(32)  # S_wg: [128 threads, 16 registers]
    rows128, cols128 = _fragment(256)  # O_wg: [128 threads, 128 registers]
    thread = np.arange(128)
    warp, g, t = thread // 32, (thread % 32) // 4, thread % 4
    o = np.zeros((2, 128, 128))
    row_max, row_sum = np.full((2, 128, 2), -np.inf), np.zeros((2, 128, 2))
    scale_log2 = np.float32(scale) * np.float32(1.4426950408889634)
    n_tokens = num_blocks * block_size
    n_tiles = (k + TILE - 1) // TILE
    first, last = split * tiles_per_split, min(split * tiles_per_split + tiles_per_split, n_tiles)
    if first < last:
        load_tile(first, 0)
    for tile in range(first, last):
        stage = (tile - first) % 2
        if tile + 1 < last:
            load_tile(tile + 1, stage ^ 1)
        dequantize_tile(stage)
        p_s = raw_s + stage * RAW
        row_s = p_s + P_BYTES
        smem.bytes[p_s - _RAW_BASE:p_s - _RAW_BASE + RAW] = 0xFF  # (D): the consumed raw stage is free
        acc, tile_max = np.zeros((2, 128, 16)), np.full((2, 128, 2), -np.inf)
        for wg in range(2):  # 1. S_wg = Q K^T over 36 k-steps, both operands K-major
            keys_address = kv_s + 32 * wg * 128
            product = np.zeros((64, 32))
            for s in range(36):
                step = (s // 4) * BLOCK + (s % 4) * 32
                a = _operand(smem, _k_major_desc(q_s + step), 64)  # [64 heads, 16]
                b = _operand(smem, _k_major_desc(keys_address + step), 32)  # [32 keys, 16]
                product = a @ b.T + (product if s > 0 else 0)
            assert not np.isnan(product).any(), "S read memory that was not written"
            acc[wg] = product[rows16, cols16]
            # each thread's test of its 8 keys: s >= 0 and s < num_blocks * block_size
            j = tile * TILE + 32 * wg + 8 * (np.arange(16) // 4)[None, :] + 2 * t[:, None] + np.arange(16)[None, :] % 2
            s_j = np.array([[index_row[x] if x < k else -1 for x in line] for line in j])
            used = (s_j >= 0) & (s_j < n_tokens)
            acc[wg] = np.where(used, acc[wg] * scale_log2, -np.inf)
            for r in range(2):
                mine = acc[wg][:, (np.arange(16) // 2) % 2 == r].max(1)
                tile_max[wg, :, r] = mine.reshape(32, 4).max(1).repeat(4)  # the quad's shuffles (per warp)
            first_lane = t == 0
            for r in range(2):
                smem.write_u32(row_s + 4 * (wg * HEADS + 16 * warp[first_lane] + g[first_lane] + 8 * r),
                               tile_max[wg, first_lane, r].astype(np.float32), np.float32)
        for wg in range(2):  # 2, 3. the shared max, P's columns 32 wg .., float32 sums (barrier B .. C)
            m_use = np.zeros((128, 2))
            for r in range(2):
                other = smem.read_u32(row_s + 4 * ((wg ^ 1) * HEADS + 16 * warp + g + 8 * r), np.float32)
                assert not np.isnan(other).any(), "row_s read before it was written"
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
                    for jj in range(2):
                        smem.write_bf16(p_s + _blocked(head + 8 * r, chunk) + 4 * t + 2 * jj, p[:, 2 * r + jj])
        for wg in range(2):  # 4. O_wg += P V[:, 256 wg ..], P K-major, V N-major from the bf16 tile
            values_address = kv_s + 4 * wg * BLOCK
            product = np.zeros((64, 256))
            for kk in range(4):
                a = _operand(smem, _k_major_desc(p_s + 32 * kk), 64)  # [64 heads, 16 keys]
                b = _operand(smem, _n_major_desc(values_address + 2048 * kk), 256, n_major=True)  # [16, 256]
                assert not np.isnan(a).any() and not np.isnan(b).any(), "P or V read before it is written"
                product += a @ b
            o[wg] += product[rows128, cols128]
    # after the loop: the sums exchanged through the bf16 tile's memory
    smem.bytes[kv_s - _RAW_BASE:kv_s - _RAW_BASE + KV] = 0xFF
    total_own = row_sum.reshape(2, 32, 4, 2).sum(2).repeat(4, 1)  # quad sums: [wg, thread, 2]
    first_lane = t == 0
    for wg in range(2):
        for r in range(2):
            smem.write_u32(kv_s + 4 * (wg * HEADS + 16 * warp[first_lane] + g[first_lane] + 8 * r),
                           total_own[wg, first_lane, r].astype(np.float32), np.float32)
    out, lse = np.full((HEADS, 512), np.nan), np.full(HEADS, np.nan)
    whole = n_splits == 1
    for wg in range(2):
        for r in range(2):
            head = 16 * warp + g + 8 * r
            total = total_own[wg, :, r] + smem.read_u32(kv_s + 4 * ((wg ^ 1) * HEADS + head), np.float32)
            inv_sum = np.where(total > 0, 1 / np.where(total > 0, total, 1), 0.0)
            row_lse = np.where(total > 0, (row_max[wg, :, r] + np.log2(np.where(total > 0, total, 1))) * math.log(2),
                               np.inf if whole else -np.inf)
            for c in range(32):
                for jj in range(2):
                    column = 256 * wg + 8 * c + 2 * t + jj
                    assert np.isnan(out[head, column]).all(), "written twice"
                    assert (rows128[:, 4 * c + 2 * r + jj] == head).all()  # the register holds that row ...
                    assert (cols128[:, 4 * c + 2 * r + jj] == column - 256 * wg).all()  # ... and column
                    values = o[wg][:, 4 * c + 2 * r + jj] * inv_sum
                    out[head, column] = _bf16(values) if whole else values.astype(np.float32)
            if wg == 0:
                lse[head[first_lane]] = row_lse[first_lane]
    return out, lse


def test_wgmma_kernel_emulated_on_the_cpu():
    """Kernel 3's carve, gather from a strided cache, dequantisation into the column-blocked tile, descriptors,
    fragments, validity test and split + combine, emulated: equal to the reference to the kernel's tolerance."""
    gen = torch.Generator().manual_seed(14)
    num_blocks, block_size, k = 9, 16, 150  # 144 tokens; 3 tiles, the last ragged (22 slots)
    cache = strided(quantize(random_latents(num_blocks, block_size, seed=15)), extra_rows=3)
    cache_bytes = torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())[cache.storage_offset():]
    q = torch.randn(1, 1, 64, 576, generator=gen).bfloat16()
    indices = torch.randperm(144, generator=gen)[:k].int()
    indices[:40] = -1  # the first tile's first 40 slots unused
    indices[-3] = -1
    wild = indices.clone()  # unused slots written as values outside [0, 144): ignored like -1
    wild[:5] = torch.tensor([144, 10**6, INT32_MAX, INT32_MIN, -7], dtype=torch.int32)
    ref_out, ref_lse = sparse_mla_decode_fp8(q, cache, indices[None, None], SCALE)
    ref_out, ref_lse = ref_out[0, 0], ref_lse[0, 0]
    args = (q[0, 0].float().numpy(), cache_bytes, num_blocks, block_size, cache.stride(0))
    tolerance = dict(atol=1e-2 * ref_out.abs().max().item(), rtol=1e-2, max_calc_diff=1e-5)
    whole_out, whole_lse = _emulate_wgmma_block(*args, wild.tolist(), 0, 3, 1, SCALE)
    compare.assert_close(torch.from_numpy(whole_out), ref_out, **tolerance, name="emulated kernel 3")
    compare.assert_close(torch.from_numpy(whole_lse), ref_lse, atol=1e-4, rtol=1e-5, name="emulated kernel 3 lse")
    parts = [_emulate_wgmma_block(*args, wild.tolist(), s, 2, 2, SCALE) for s in range(2)]  # 2 splits + combine
    o_partial, lse_partial = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
    merged = [_emulate_combine(o_partial[:, i], lse_partial[:, i]) for i in range(64)]
    compare.assert_close(torch.tensor(np.stack([m[0] for m in merged])), ref_out, **tolerance, name="kernel 3 split")
    compare.assert_close(torch.tensor([m[1] for m in merged]), ref_lse, atol=1e-4, rtol=1e-5,
                         name="kernel 3 split lse")
    empty = [-1] * 64 + wild.tolist()[64:]  # a split whose slots are all unused: o = 0, lse = -inf
    o0, lse0 = _emulate_wgmma_block(*args, empty, 0, 1, 3, SCALE)
    assert (o0 == 0).all() and np.isneginf(lse0).all()
    none_out, none_lse = _emulate_wgmma_block(*args, [-1, 144, INT32_MIN] * 20, 0, 1, 1, SCALE)
    assert (none_out == 0).all() and np.isposinf(none_lse).all()


# ----------------------------------------------------------------------------- kernel 4 on the CPU
# Kernel 4's consumers run kernel 3's steps (emulated above) on the buffer the producer fills; what is its own
# is the carve, the producer's lane mapping (which lane loads which 16 bytes of which token, where it stores
# them) and its prefetch. Emulated here from the kernel's expressions: one tile, warp by warp, lane by lane.

def _ws_producer_tile(cache_bytes, num_blocks, block_size, block_stride, index_row, tile):
    """sparse_mla_decode_fp8_ws's producer for one tile: (the bf16 buffer as bytes [KV_SMEM_BYTES] (0xFF where
    unwritten), the used flags [64], how many times each byte was stored, the 16-byte store addresses of every
    store instruction [instruction][32 lanes])."""
    TILE, ROWS, BLOCK = D["MMA_TILE"], D["WS_ROWS_PER_WARP"], D["WGMMA_BLOCK_BYTES"]
    cache_np, k = cache_bytes.numpy(), len(index_row)
    buffer = np.full(D["KV_SMEM_BYTES"], 0xFF, dtype=np.uint8)
    stores = np.zeros(D["KV_SMEM_BYTES"], dtype=np.int64)
    used = np.full(TILE, -1)
    instructions = []
    lane = np.arange(32)
    side, piece = lane % 2, (lane // 2) % 4 + 4 * (lane // 8)  # the kernel's lane -> token of a pair, 16 bytes

    def store(addresses, data):  # one warp-wide 16-byte store: data [32, 16]
        instructions.append(addresses)
        for a, d in zip(addresses, data):
            buffer[a:a + 16] = d
            stores[a:a + 16] += 1

    for warp in range(4):
        row0 = ROWS * warp
        offsets = []  # lane i < 16: the offset of slot row0 + i
        for i in range(ROWS):
            j = tile * TILE + row0 + i
            token = _token_row(index_row[j] if j < k else -1, num_blocks, block_size, block_stride)
            offsets.append(-1 if token is None else token)
            used[row0 + i] = token is not None
        nope_lane = (lane // 8) * BLOCK + (row0 + side) * 128 + ((2 * ((lane // 2) % 4)) ^ side) * 16
        rope_lane = 8 * BLOCK + (row0 + lane // 8) * 128 + ((lane % 8) ^ (lane // 8)) * 16
        for q in range(ROWS):  # load q: token pair v = q // 2, half q % 2 of their e4m3 bytes
            v, f = q // 2, piece + 16 * (q % 2)
            at = [offsets[2 * v + s] for s in side]
            rows = [cache_np[a + 16 * fl:a + 16 * fl + 16] if a >= 0 else np.zeros(16, np.uint8) for a, fl in zip(at, f)]
            scale = np.array([cache_np[a + 512 + 4 * (fl // 8):][:4].view(np.float32)[0] if a >= 0 else 0.0
                              for a, fl in zip(at, f)], dtype=np.float32)
            values = torch.from_numpy(np.stack(rows)).view(torch.float8_e4m3fn).float()  # [32 lanes, 16]
            bf16 = (values * torch.from_numpy(scale)[:, None]).bfloat16().view(torch.uint8).numpy()  # [32, 32]
            at_store = (q % 2) * 4 * BLOCK + 2 * v * 128
            store((nope_lane ^ ((2 * v) % 8 * 16)) + at_store, bf16[:, :16])  # chunk 2f
            store((nope_lane ^ ((((2 * v) % 8) ^ 1) * 16)) + at_store, bf16[:, 16:])  # chunk 2f + 1
            if q % 4 == 3:  # k^R of tokens 4 g4 .. + 3: lanes 8u .. 8u + 7 token 4 g4 + u, chunk l % 8
                g4 = q // 4
                at = [offsets[4 * g4 + l // 8] for l in lane]
                data = [cache_np[a + 528 + 16 * (l % 8):][:16] if a >= 0 else np.zeros(16, np.uint8)
                        for a, l in zip(at, lane)]
                store((rope_lane ^ ((4 * g4) % 8 * 16)) + 4 * g4 * 128, np.stack(data))
    return buffer, used, stores, instructions


def test_ws_kernel_producer_emulated_on_the_cpu():
    """Kernel 4's producer writes exactly kernel 3's dequantised tile (the layout its consumers' descriptors
    read): every byte of the buffer once, zeros and flag 0 for unused slots, whatever the index; its 16-byte
    stores are free of bank conflicts (8 lanes of a quarter-warp on 8 different 16-byte bank groups)."""
    gen = torch.Generator().manual_seed(21)
    num_blocks, block_size, k = 7, 16, 100  # 112 tokens; 2 tiles, the second ragged (36 slots)
    cache = strided(quantize(random_latents(num_blocks, block_size, seed=22)), extra_rows=2)
    cache_bytes = torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())[cache.storage_offset():]
    index_row = torch.randperm(112, generator=gen)[:k].int()
    index_row[3], index_row[17], index_row[70] = -1, 112, INT32_MIN  # unused, whatever the value
    index_row[80:90] = torch.tensor([INT32_MAX, -7, 10**6, 113, -1, -1, 200, 111 - 112, 500, 7 * 16],
                                    dtype=torch.int32)
    latents = dequantize(cache).view(-1, 576)  # what kernel 3's dequantisation makes of each token
    for tile in range(2):
        buffer, used, stores, instructions = _ws_producer_tile(cache_bytes, num_blocks, block_size,
                                                               cache.stride(0), index_row.tolist(), tile)
        assert (stores == 1).all(), "every byte of the buffer is stored exactly once"
        slots = index_row[64 * tile:64 * tile + 64].tolist()
        slots += [-1] * (64 - len(slots))
        expected_used = [0 <= s < 112 for s in slots]
        assert used.tolist() == expected_used
        for r, s in enumerate(slots):
            row = np.concatenate([buffer[_blocked(r, c):_blocked(r, c) + 16] for c in range(72)])
            values = torch.from_numpy(row).view(torch.bfloat16)
            expected = latents[s] if expected_used[r] else torch.zeros(576, dtype=torch.bfloat16)
            assert torch.equal(values, expected), f"tile {tile} slot {r} (index {s})"
        for addresses in instructions:  # a 16-byte store runs as 4 phases of 8 lanes
            groups = (np.asarray(addresses) % 128) // 16  # the 16-byte group of the 32 banks
            for phase in range(4):
                assert len(set(groups[8 * phase:8 * phase + 8])) == 8, "a bank conflict"


def test_ws_kernel_carve_and_prefetch_cover_what_they_must():
    d = TABLE.defines()
    Q, KV, P = d["Q_SMEM_BYTES"], d["KV_SMEM_BYTES"], d["P_BYTES"]
    # the kernel's carve from a 1024-aligned base: Q, 2 buffers, P (1024-aligned: a wgmma operand), row
    # exchange, flags, mbarriers (8-byte aligned), within the launch's bytes for any 16-byte aligned base
    p_s = Q + 2 * KV
    row_s = p_s + P
    used_s = row_s + d["WS_ROW_BYTES"]
    bars = used_s + d["WS_FLAG_BYTES"]
    assert Q % 1024 == 0 and KV % 1024 == 0 and p_s % 1024 == 0 and bars % 8 == 0
    assert bars + d["WS_BARRIER_BYTES"] == d["WS_CARVE_BYTES"]
    assert d["WGMMA_SMEM_ALIGN"] - 16 + d["WS_CARVE_BYTES"] <= d["WS_DYNAMIC_SMEM"]
    # the producer's prefetch: lane l touches bytes 256 m + 128 (l // 16) of row l % 16, m < 3: for any
    # 16-byte aligned start, every 128-byte line of the 656 bytes, and nothing outside the row
    touched = sorted({256 * m + 128 * (lane // 16) for m in range(3) for lane in range(32)})
    assert max(touched) < 656
    for start in range(0, 128, 16):
        lines = {(start + b) // 128 for b in range(656)}
        assert lines == {(start + b) // 128 for b in touched}, start
# ----------------------------------------------------------------------------- GPU

def _case(B, s_q, h, k, block_size, *, stride=False, seed=0):
    """q, the FP8 cache (strided when asked) and distinct random indices: the last 3 slots of row 0 unused,
    row 1 (when there is one) with nothing selected, row 2 with its first slots unused (a whole tile, and
    for k = 2048 whole splits, of -1)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n_tokens = max(2 * k, 300)
    num_blocks = -(-n_tokens // block_size)
    cache = quantize(random_latents(num_blocks, block_size, seed=seed, device="cuda"))
    if stride:
        cache = strided(cache, extra_rows=3)
    q = torch.randn(B, s_q, h, 576, generator=gen, device="cuda").bfloat16()
    rows = B * s_q
    indices = torch.rand(rows, num_blocks * block_size, generator=gen, device="cuda").argsort(-1)[:, :k].int()
    indices[0, -3:] = -1
    if rows > 1:
        indices[1] = -1
    if rows > 2:
        indices[2, :min(k - 4, 1100)] = -1
    return q, cache, indices.view(B, s_q, k).contiguous()


def _reference(q, cache, indices):
    """The float32 reference on the same device (the suite's data checks: indices in range, distinct)."""
    return sparse_mla_decode_fp8(q, cache, indices, SCALE)


# Tolerances, against the float32 reference on the same FP8 cache (dequantisation is exact in both):
# * kernel 1 is float32 throughout (576-term dots, online softmax in another order: ~1e-6 relative), then
#   rounds out to bf16 (relative error <= 2^-9 of each value): rtol 2^-8, atol 1e-4 of max|ref|. lse stays
#   float32: atol 1e-4 (lse ~ 10, float32 sums of up to 2048 terms).
# * kernel 2 computes the scores like kernel 1 (float32 accumulation of exact bf16 products) but rounds
#   p = exp(score - max) to bf16 before P V and sums the rounded values (as sparse_mla_attention_mma, whose
#   test explains the bound): out within 1e-2 of max|ref| (plus calc_diff <= 1e-5 against a systematic
#   error); each p off by <= 2^-9 relative moves the sum, and lse, by at most 2^-9 ~ 2e-3: atol 4e-3. The
#   combine adds float32 work only.
def _tolerances(version, ref_out):
    scale = ref_out.abs().max().item()
    if version == 1:
        return dict(atol=1e-4 * scale, rtol=2**-8), dict(atol=1e-4, rtol=1e-5)
    return dict(atol=1e-2 * scale, rtol=1e-2, max_calc_diff=1e-5), dict(atol=4e-3, rtol=0)


def _skip_unless_available(kernel):
    if kernel in WGMMA_VERSIONS and fp8.wgmma_why_not(torch.device("cuda")) is not None:
        pytest.skip(f"kernel {kernel} (wgmma, sm_90a) {fp8.wgmma_why_not(torch.device('cuda'))}")



def _check(version, out, lse, ref_out, ref_lse, name):
    out_tol, lse_tol = _tolerances(version, ref_out)
    compare.assert_close(out.float(), ref_out.to(out.device), **out_tol, name=f"{name}: out")
    compare.assert_close(lse, ref_lse.to(lse.device), **lse_tol, name=f"{name}: lse")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", TABLE.versions)
@pytest.mark.parametrize("block_size", [64, 16])
@pytest.mark.parametrize("k", [64, 128, 2048])
@pytest.mark.parametrize("h", [64, 128])
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("B", [1, 3])
def test_sparse_mla_decode_fp8_cuda(B, s_q, h, k, block_size, kernel):
    _skip_unless_available(kernel)
    stride = block_size == 16 or B == 3
    seed = B * 1000 + s_q * 100 + h + k + block_size
    q, cache, indices = _case(B, s_q, h, k, block_size, stride=stride, seed=seed)
    out = compare.poisoned((B, s_q, h, 512), torch.bfloat16)
    lse = compare.poisoned((B, s_q, h), torch.float32)
    got = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=kernel, out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    ref_out, ref_lse = _reference(q, cache, indices)
    _check(kernel, out, lse, ref_out, ref_lse, f"kernel {kernel} B={B} s_q={s_q} h={h} k={k} bs={block_size}")
    if B * s_q > 1:  # the row with nothing selected
        assert bool((out.view(-1, h, 512)[1] == 0).all()) and bool(torch.isposinf(lse.view(-1, h)[1]).all())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", TABLE.versions)
@pytest.mark.parametrize("B, s_q, h, k, block_size", [(1, 1, 128, 700, 64), (2, 2, 64, 1000, 1),
                                                      (1, 3, 64, 100, 7), (5, 1, 128, 33, 64)])
def test_ragged_selections_and_odd_block_sizes(B, s_q, h, k, block_size, kernel):
    # k not a multiple of the 64-slot tile, block_size 1 and 7, s_q = 3; (1, 1, 128, 700) runs kernels 2, 3 split
    _skip_unless_available(kernel)
    q, cache, indices = _case(B, s_q, h, k, block_size, stride=True, seed=k + block_size)
    out = compare.poisoned((B, s_q, h, 512), torch.bfloat16)
    lse = compare.poisoned((B, s_q, h), torch.float32)
    sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=kernel, out=out, lse=lse)
    _check(kernel, out, lse, *_reference(q, cache, indices), f"kernel {kernel} k={k} block_size={block_size}")


@pytest.mark.gpu
@pytest.mark.parametrize("h", [128, 64])
def test_the_split_path_is_taken_and_the_default_kernel(h):
    default_kernel = 4  # warp-specialised wgmma: the fastest on the H200
    _skip_unless_available(default_kernel)
    q, cache, indices = _case(1, 2, h, 2048, 64, seed=3)
    n_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    assert lc.decode_splits(2, h, 2048, n_sms)[0] > 1  # this shape runs split, then the combine
    with kernels.recording_launches() as launches:
        default = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE)
    assert [launch.kernel for launch in launches] == [TABLE[default_kernel].entry, lc.COMBINE_ENTRY]
    explicit = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=default_kernel)
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])  # deterministic
    _check(default_kernel, *default, *_reference(q, cache, indices), "default call, split")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])  # split (then the combine) and whole
def test_kernel_3_launches_and_agrees_with_kernel_2(B):
    _skip_unless_available(WGMMA)
    q, cache, indices = _case(B, 2, 128, 2048, 64, stride=True, seed=9)
    n_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    split = lc.decode_splits(B * 2, 128, 2048, n_sms)[0] > 1
    assert split == (B == 1)
    with kernels.recording_launches() as launches:
        out3, lse3 = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=3)
    assert [launch.kernel for launch in launches] == ["sparse_mla_decode_fp8_wgmma"] + [lc.COMBINE_ENTRY] * split
    out2, lse2 = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=2)
    ref_out, ref_lse = _reference(q, cache, indices)
    _check(3, out3, lse3, ref_out, ref_lse, f"kernel 3, B={B}")
    # both within 1e-2 of max|ref| of the reference, so within 2e-2 of each other; lse: kernel 3 sums the
    # float32 p, kernel 2 the bf16-rounded p (4e-3 each)
    compare.assert_close(out3.float(), out2.float(), atol=2e-2 * ref_out.abs().max().item(), rtol=2e-2,
                         name="kernel 3 vs kernel 2")
    compare.assert_close(lse3, lse2, atol=8e-3, rtol=0, name="kernel 3 vs kernel 2: lse")
    again = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=3)
    assert torch.equal(again[0], out3) and torch.equal(again[1], lse3)  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("B, s_q, h, k, block_size", [(1, 2, 128, 2048, 64), (64, 2, 128, 2048, 64),
                                                      (3, 2, 64, 700, 7), (2, 3, 128, 130, 1), (1, 1, 64, 33, 16)])
def test_kernel_4_equals_kernel_3_bit_for_bit(B, s_q, h, k, block_size):
    """Kernel 4 (warp-specialised) computes exactly kernel 3's products in kernel 3's order: the same bf16 tile
    values (dequantize8), the same wgmma sequence on the same layouts, the same softmax arithmetic. Its own
    hand-over (mbarriers, two buffers, the producer's lane order) may change nothing: any wrong buffer, stale
    tile or missed flag shows as a difference. Split (B = 1, then the combine) and whole (B = 64); ragged k,
    odd block sizes, rows with unused and no slots."""
    _skip_unless_available(4)
    q, cache, indices = _case(B, s_q, h, k, block_size, stride=True, seed=11 + k)
    n_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    split = lc.decode_splits(B * s_q, h, k, n_sms)[0] > 1
    with kernels.recording_launches() as launches:
        out4, lse4 = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=4)
    assert [launch.kernel for launch in launches] == ["sparse_mla_decode_fp8_ws"] + [lc.COMBINE_ENTRY] * split
    out3, lse3 = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=3)
    _check(4, out4, lse4, *_reference(q, cache, indices), f"kernel 4 B={B} s_q={s_q} h={h} k={k}")
    assert torch.equal(out4, out3), f"kernel 4 differs from kernel 3: max |diff| {(out4.float() - out3.float()).abs().max()}"
    assert torch.equal(lse4, lse3), f"kernel 4's lse differs from kernel 3's: max |diff| {(lse4 - lse3).abs().max()}"
    again = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=4)
    assert torch.equal(again[0], out4) and torch.equal(again[1], lse4)  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", TABLE.versions)
@pytest.mark.parametrize("k", [128, 2048])
def test_wild_indices_with_data_checks_off_are_never_read(kernel, k):
    """Data checks off (the default): indices outside [0, num_blocks * block_size) reach the kernels unchecked
    and must count as unused slots: the result equals the reference with those slots set to -1.
    compute-sanitizer runs benchmarks/sanitize_latent_cache.py with such values too."""
    _skip_unless_available(kernel)
    q, cache, indices = _case(3, 2, 64, k, 16, stride=True, seed=k)
    n_tokens = cache.shape[0] * cache.shape[1]
    ref_out, ref_lse = _reference(q, cache, indices)
    wild = indices.clone().view(6, k)
    wild[0, -3:] = torch.tensor([n_tokens, n_tokens + 10**6, INT32_MAX], dtype=torch.int32)
    wild[1, ::2] = INT32_MIN  # the row with nothing selected
    wild[1, 1::2] = -7
    wild[2, :64] = n_tokens  # a whole tile of the row whose first slots are unused
    wild = wild.view_as(indices)
    with checks.data_checks(False):
        out, lse = sparse_mla_decode_fp8_cuda(q, cache, wild, SCALE, kernel=kernel)
        # the reference with checks off on the GPU drops the same slots
        gpu_out, gpu_lse = sparse_mla_decode_fp8(q, cache, wild, SCALE)
    _check(kernel, out, lse, ref_out, ref_lse, f"kernel {kernel}, wild indices")
    compare.assert_close(gpu_out.cpu(), ref_out, atol=1e-4 * ref_out.abs().max().item(), rtol=1e-4,
                         name="reference on the GPU, unchecked wild indices")
    with checks.data_checks(True), pytest.raises(ValueError, match="indices must be"):
        sparse_mla_decode_fp8_cuda(q, cache, wild, SCALE, kernel=kernel)


@pytest.mark.gpu
def test_gpu_bad_input_and_fallback():
    q, cache, indices = _case(2, 1, 64, 64, 64, seed=4)
    with pytest.raises(ValueError, match="h in \\[64, 128\\]"):
        sparse_mla_decode_fp8_cuda(q[:, :, :32].contiguous(), cache, indices, SCALE)
    with pytest.raises(ValueError, match="CUDA"):
        sparse_mla_decode_fp8_cuda(q, cache, indices.cpu(), SCALE)
    with pytest.raises(ValueError, match="kernel must be None or a version of cuda/sparse_mla_decode_fp8.cu"):
        sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=max(TABLE.versions) + 1)
    with pytest.raises(ValueError, match="out must have shape"):
        sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, out=torch.empty(2, 1, 64, 511, device="cuda"))
    # a cache 8 bytes past a 16-byte boundary: kernel 2 refuses it, None falls back to kernel 1
    buffer = torch.empty(cache.numel() + 8, dtype=torch.uint8, device="cuda")
    shifted = buffer[8:].view(cache.shape).view(torch.float8_e4m3fn)
    shifted.copy_(cache)
    for refused in (2, *WGMMA_VERSIONS) if fp8.wgmma_why_not(q.device) is None else (2,):
        with pytest.raises(ValueError, match="16-byte boundary"):
            sparse_mla_decode_fp8_cuda(q, shifted, indices, SCALE, kernel=refused)
    with kernels.recording_launches() as launches:
        out, lse = sparse_mla_decode_fp8_cuda(q, shifted, indices, SCALE)
    assert [launch.kernel for launch in launches] == ["sparse_mla_decode_fp8_simt"]
    _check(1, out, lse, *_reference(q, cache, indices), "kernel 1 on an unaligned cache")
    # nothing selectable: zeros and +inf without a launch
    with kernels.recording_launches() as launches:
        out, lse = sparse_mla_decode_fp8_cuda(q, cache, indices[..., :0].contiguous(), SCALE)
    assert launches == [] and bool((out == 0).all()) and bool(torch.isposinf(lse).all())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [None, 1, 2, 3, 4])
@pytest.mark.parametrize("B", [1, 64])  # kernels 2, 3 split (1 row) and whole (64 rows)
def test_no_host_synchronisation(kernel, B):
    _skip_unless_available(kernel)
    q, cache, indices = _case(B, 2, 128, 2048, 64, seed=5)
    sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=kernel)  # compile and load first
    torch.cuda.synchronize()
    with checks.data_checks(False):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, lse = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE, kernel=kernel)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _check(2 if kernel != 1 else 1, out, lse, *_reference(q, cache, indices), f"kernel {kernel}, no sync")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_a_cuda_graph_replays_the_call(B):
    q, cache, indices = _case(B, 2, 128, 2048, 64, stride=True, seed=6)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE)  # warm-up: compile, load, size the pools
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with checks.data_checks(False), torch.cuda.graph(graph):
        graph_out, graph_lse = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE)
    for seed in (7, 8):  # new data in the same buffers
        fresh_q, fresh_cache, fresh_indices = _case(B, 2, 128, 2048, 64, stride=True, seed=seed)
        q.copy_(fresh_q)
        cache.copy_(fresh_cache)
        indices.copy_(fresh_indices)
        graph.replay()
        torch.cuda.synchronize()
        eager_out, eager_lse = sparse_mla_decode_fp8_cuda(q, cache, indices, SCALE)
        assert torch.equal(graph_out, eager_out) and torch.equal(graph_lse, eager_lse)
        _check(2, graph_out, graph_lse, *_reference(q, cache, indices), f"graph replay, inputs {seed}")
