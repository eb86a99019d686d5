"""fp8: block quantisation (act_quant and cuda/act_quant.cu) and the FP8 MQA logits (mqa_logits and
cuda/mqa_logits.cu): every version of ACT_QUANT_KERNELS and MQA_LOGITS_KERNELS against the reference."""
import math

import numpy as np
import pytest
import torch

from dsa_tutorial import checks, compare, fp8, kernels
from dsa_tutorial.hadamard import rotate_activation


def with_outliers(shape, seed=0, scale=1.0):
    """Gaussian data with a few large entries (the activations the Hadamard rotation is for)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 200),), generator=g)
    flat[idx] *= 50
    return x


WGMMA = 4  # the version that needs compute capability 9.0, in MQA_LOGITS_KERNELS and PAGED_MQA_LOGITS_KERNELS
TMA = 5  # MQA_LOGITS_KERNELS' kernel 4 fed by TMA: compute capability 9.0 too
SM90A = (WGMMA, TMA)  # the versions compiled for sm_90a only


def skip_unless_available(kernel: int | None) -> None:
    """Skip, saying why, when kernel `kernel` cannot run on this GPU: 4 (wgmma) and 5 (TMA) need
    capability 9.0."""
    if kernel in SM90A and fp8.wgmma_why_not(torch.device("cuda")) is not None:
        pytest.skip(f"kernel {kernel} (wgmma, sm_90a) {fp8.wgmma_why_not(torch.device('cuda'))}")


def pretend_no_wgmma(monkeypatch) -> None:
    """Pretend the GPU has no wgmma (as an A100 or a B200): kernels.wgmma_available says False."""
    monkeypatch.setattr(kernels, "wgmma_available", lambda device=None: False)


def assert_bf16_logits(out_bf16, out_f32, ref_bf16, ref_f32, *, atol: float, name: str, where=None) -> None:
    """What a kernel's bfloat16 logits must be (the `bf16` entry of its table), at the positions `where`
    (all by default):
    * bit for bit its float32 entry's logits rounded to nearest even, -inf kept (the same computation,
      stored through from_float<bf16>);
    * so, bit for bit the reference's bf16 logits where the float32 kernel equals the float32
      reference bit for bit;
    * elsewhere within compare.assert_close of ref_bf16: the float32 tolerance atol plus one bf16 ulp
      (rtol 2^-7), since two float32 values within atol may round to neighbouring bf16 values."""
    out_bf16, out_f32, ref_bf16, ref_f32 = (t.cpu() for t in (out_bf16, out_f32, ref_bf16, ref_f32))
    assert out_bf16.dtype == ref_bf16.dtype == torch.bfloat16 and out_f32.dtype == ref_f32.dtype == torch.float32
    if where is not None:
        out_bf16, out_f32, ref_bf16, ref_f32 = (t[where] for t in (out_bf16, out_f32, ref_bf16, ref_f32))
    rounded = out_f32.to(torch.bfloat16)
    assert torch.equal(out_bf16.view(torch.int16), rounded.view(torch.int16)), f"{name}: bf16 != float32 rounded"
    same = out_f32 == ref_f32  # bit for bit (-inf included; no NaN in a checked output)
    assert torch.equal(out_bf16[same].view(torch.int16), ref_bf16[same].view(torch.int16)), name
    compare.assert_close(out_bf16, ref_bf16, atol=atol, rtol=2.0 ** -7, name=name)


def recorded_launches(monkeypatch) -> list:
    """Record what kernels.launch is asked (source, entry, grid, block, args, shared_mem) instead of
    launching: the launch geometry, checked on the CPU."""
    launches = []
    monkeypatch.setattr(kernels, "launch", lambda source, entry, grid, block, args, shared_mem=0:
                        launches.append((source, entry, grid, block, tuple(args), shared_mem)))
    return launches


# ---------------------------------------------------------------------------------- act_quant


def test_ue8m0_scale_is_smallest_power_of_two_covering_the_block():
    x = with_outliers((64, 256))
    x_q, s = fp8.act_quant(x)
    assert x_q.dtype == torch.float8_e4m3fn and x_q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (64, 2)
    amax = x.view(64, 2, 128).abs().amax(-1).double()
    for a, scale in zip(amax.flatten().tolist(), s.flatten().tolist()):
        expected = 2.0 ** math.ceil(math.log2(max(a, 1e-4) / 448))  # computed independently, in float64
        assert scale == expected
        assert a / scale <= 448 < 2 * a / scale  # covers the block, and half of it would not


@pytest.mark.parametrize("amax, expected", [(448.0, 1.0), (448.0 * 2 ** -3, 2 ** -3), (449.0, 2.0), (0.0, 2.0 ** -22),
                                            (1e-5, 2.0 ** -22), (3.0, 2.0 ** -7)])
def test_ue8m0_scale_edge_cases(amax, expected):
    x = torch.zeros(1, 128)
    x[0, 17] = -amax
    _, s = fp8.act_quant(x)
    assert s.item() == expected


def test_plain_scale_is_amax_times_float32_reciprocal_and_amax_maps_to_448():
    x = with_outliers((32, 128), seed=1)
    x_q, s = fp8.act_quant(x, scale_fmt=None)
    amax = x.abs().amax(-1, keepdim=True)
    # float32 arithmetic done by numpy: amax * float32(1/448), one rounding
    expected = amax.numpy() * np.float32(1 / 448)
    assert expected.dtype == np.float32 and np.array_equal(s.numpy(), expected)
    # the largest element lands on +-448 exactly (after the saturating clamp)
    assert torch.equal(x_q.float().abs().amax(-1, keepdim=True), torch.full_like(amax, 448.0))


def division_and_product_differ(n=4096, seed=0):
    """amax float32 [n] (random, over many binades) and where amax / 448 and amax * float32(1/448)
    round to different float32 values."""
    amax = torch.exp(torch.empty(n).uniform_(-9, 9, generator=torch.Generator().manual_seed(seed)))
    divided = amax.numpy() / np.float32(448)
    multiplied = amax.numpy() * np.float32(1 / 448)
    return amax, divided != multiplied


def test_plain_scale_multiplies_as_the_official_kernel_does():
    # issue 10: the official act_quant computes s = amax * (1/448) in float32; a division by 448 differs
    # from that in the last bit for about half of all amax. block_scales matches the product, bit for bit.
    amax, differ = division_and_product_differ()
    assert differ.sum() > len(amax) // 4  # the two really differ, often
    s = fp8.block_scales(amax, None)
    assert np.array_equal(s.numpy(), amax.numpy() * np.float32(1 / 448))
    assert not np.array_equal(s.numpy(), amax.numpy() / np.float32(448))
    # the floor: max(amax, 1e-4) first
    assert fp8.block_scales(torch.zeros(1), None).item() == np.float32(1e-4) * np.float32(1 / 448)


def test_ue8m0_is_the_same_whether_the_scale_is_divided_or_multiplied():
    # the float32 values closest to every 448 * 2^e (where rounding could decide ceil(log2)) and a random
    # sweep: 2^ceil(log2) of amax / 448 and of amax * float32(1/448) agree everywhere
    near = []
    for e in range(-13, 30):
        center = np.float32(448.0 * 2.0 ** e)
        below = center - np.arange(200, dtype=np.float32) * np.spacing(center / 2, dtype=np.float32)
        above = center + np.arange(200, dtype=np.float32) * np.spacing(center, dtype=np.float32)
        near += [below, above]
    amax = torch.from_numpy(np.concatenate(near + [division_and_product_differ(1 << 16, seed=1)[0].numpy()]))
    divided = torch.from_numpy(np.maximum(amax.numpy(), np.float32(1e-4)) / np.float32(448))
    mantissa, exponent = torch.frexp(divided)
    by_division = torch.ldexp(torch.ones_like(divided), exponent - (mantissa == 0.5).to(exponent.dtype))
    assert torch.equal(fp8.block_scales(amax, "ue8m0"), by_division)


def test_saturation_clamps_before_the_cast():
    # plain scales: x / (amax / 448) can round just above 448; the clamp keeps it at 448, never NaN
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4096, 128, generator=g) * 10
    x_q, _ = fp8.act_quant(x, scale_fmt=None)
    assert not torch.isnan(x_q.float()).any()
    assert x_q.float().abs().max().item() == 448.0


def test_round_trip_error_is_within_e4m3_rounding():
    for scale_fmt in ("ue8m0", None):
        x = with_outliers((128, 384), seed=3)
        x_q, s = fp8.act_quant(x, scale_fmt=scale_fmt)
        back = fp8.act_dequant(x_q, s)
        s_full = s.repeat_interleave(128, dim=-1)
        # e4m3: 3 mantissa bits, so |error| <= 2^-4 |x| for normals, <= 2^-10 s in the subnormal range
        bound = torch.maximum(x.abs() * 2.0 ** -4, s_full * 2.0 ** -10)
        assert ((back - x).abs() <= bound * (1 + 1e-6)).all()


def test_cast_rounds_to_nearest_even():
    # 1 + 1/16 is halfway between 1 and 1.125 (mantissa step 1/8): even mantissa 1.0 wins;
    # 1 + 3/16 is halfway between 1.125 and 1.25: 1.25 (even) wins
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1], x[0, 2] = 448.0, 1 + 1 / 16, 1 + 3 / 16  # amax 448: scale 1
    x_q, s = fp8.act_quant(x)
    assert s.item() == 1.0
    assert x_q[0, :3].float().tolist() == [448.0, 1.0, 1.25]


def test_act_quant_batched_shapes_and_dtypes():
    x = with_outliers((3, 5, 256)).bfloat16()
    x_q, s = fp8.act_quant(x)
    assert x_q.shape == (3, 5, 256) and s.shape == (3, 5, 2)
    x_q32, s32 = fp8.act_quant(x.float())
    assert torch.equal(x_q.view(torch.uint8), x_q32.view(torch.uint8)) and torch.equal(s, s32)
    x_q, s = fp8.act_quant(x.float(), block_size=64)
    assert s.shape == (3, 5, 4)


def test_rounding_error_by_format_and_rotation():
    # score error of q.k with q, k in each format: e5m2 (2 mantissa bits) > e4m3 (3) > bf16 (7);
    # with one scale per 128 values the rotation neither helps nor hurts much (within 25%)
    q, k = with_outliers((128, 128), seed=5), with_outliers((256, 128), seed=6)
    ref = q.double() @ k.double().T
    errors = {}
    for fmt in ("e4m3", "e5m2", "bf16"):
        for rotate in (False, True):
            qq, kk = (rotate_activation(q), rotate_activation(k)) if rotate else (q, k)
            scores = fp8.round_trip(qq, fmt).double() @ fp8.round_trip(kk, fmt).double().T
            errors[fmt, rotate] = ((scores - ref).norm() / ref.norm()).item()
    for rotate in (False, True):
        assert errors["e5m2", rotate] > 1.5 * errors["e4m3", rotate] > 10 * errors["bf16", rotate]
    assert 0.8 < errors["e4m3", True] / errors["e4m3", False] < 1.25
    # the rotation itself is exact up to float rounding: (R q) . (R k) = q . k
    rotated = rotate_activation(q.double()) @ rotate_activation(k.double()).T
    assert torch.allclose(rotated, ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=torch.randn(4, 100)), "multiple of block_size"),
    (dict(x=torch.randn(4, 128), scale_fmt="e8m0"), "scale_fmt"),
    (dict(x=torch.randn(4, 128), block_size=0), "block_size"),
    (dict(x=torch.ones(4, 128, dtype=torch.int32)), "x must be"),
])
def test_act_quant_rejects_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fp8.act_quant(**kwargs)


def test_act_dequant_rejects_bad_scales():
    x_q, s = fp8.act_quant(torch.randn(4, 256))
    with pytest.raises(ValueError, match="scales"):
        fp8.act_dequant(x_q, s[:, :1])


def test_act_quant_kernel_table():
    table = fp8.ACT_QUANT_KERNELS
    assert table.source == "act_quant" and table.versions == (1, 2)
    assert table.entry_points() == ["act_quant_f32", "act_quant_bf16", "act_quant_b128_f32", "act_quant_b128_bf16"]
    d = table.defines()
    assert d["ACT_QUANT_THREADS"] == 32 * d["ACT_QUANT_WARPS"] and d["B128_BLOCKS_PER_WARP"] >= 1
    assert table.choose(None, {}).version == 2 and table.choose(None, {2: "misaligned"}).version == 1
    with pytest.raises(ValueError, match="kernel must be None or a version of cuda/act_quant.cu"):
        fp8.act_quant_cuda(torch.randn(4, 128), kernel=3)


# ---------------------------------------------------------------------------------- MQA logits


def mqa_inputs(seq_lens, H=64, D=128, seed=0, device="cpu"):
    """Unquantised q, k, w (Hadamard-rotated, as the indexer feeds them), their FP8 forms with the
    q scale folded into w, and causal ks/ke for the packed prefills."""
    g = torch.Generator().manual_seed(seed)
    S = sum(seq_lens)
    q = rotate_activation(torch.randn(S, H, D, generator=g))
    k = rotate_activation(torch.randn(S, D, generator=g))
    w = torch.randn(S, H, generator=g)
    q_fp8, q_scale = fp8.act_quant(q, block_size=D)
    k_fp8, k_scale = fp8.act_quant(k, block_size=D)
    w_fp8 = w * q_scale.squeeze(-1)  # ReLU(s x) = s ReLU(x) for s > 0: the q scale joins w
    ks, ke = fp8.causal_ks_ke(seq_lens)
    put = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    return dict(raw=put(q, k, w), fp8=put(q_fp8, k_fp8, k_scale.squeeze(-1), w_fp8), ks=ks.to(device),
                ke=ke.to(device))


def loop_logits(q, k, k_scale, w, ks, ke):
    """The formula with Python loops over i and j, float64."""
    S_q, S_k = q.shape[0], k.shape[0]
    out = torch.full((S_q, S_k), float("-inf"), dtype=torch.float64)
    for i in range(S_q):
        for j in range(int(ks[i]), int(ke[i])):
            scores = q[i].double() @ (k[j].double() * float(k_scale[j]))  # [H]
            out[i, j] = (w[i].double() * scores.clamp(min=0)).sum()
    return out


def test_causal_ks_ke():
    ks, ke = fp8.causal_ks_ke([3, 2])
    assert ks.tolist() == [0, 0, 0, 3, 3] and ke.tolist() == [1, 2, 3, 4, 5] and ks.dtype == torch.int32


def test_mqa_logits_matches_loops():
    data = mqa_inputs([5, 9], H=4, D=32)
    q, k, k_scale, w = data["fp8"]
    ks, ke = data["ks"].clone(), data["ke"].clone()
    ks[3], ke[3] = 1, 1  # an empty row
    ke[7] = 14  # a non-causal range
    out = fp8.mqa_logits(q, (k, k_scale), w, ks, ke, query_chunk=3)
    compare.assert_close(out, loop_logits(q, k, k_scale, w, ks, ke), atol=1e-5, rtol=1e-5)
    assert torch.isneginf(out[3]).all()


def test_fp8_logits_close_to_unquantised_logits():
    # DeepGEMM's acceptance test: FP8 inputs against the higher-precision reference on the
    # unquantised inputs, calc_diff < 1e-3 (e4m3 rounds each value by up to 2^-4 relative)
    data = mqa_inputs([40, 57], H=64)
    q, k, w = data["raw"]
    ref = fp8.mqa_logits(q, (k, torch.ones(k.shape[0])), w, data["ks"], data["ke"])
    out = fp8.mqa_logits(*data["fp8"][:1], tuple(data["fp8"][1:3]), data["fp8"][3], data["ks"], data["ke"])
    result = compare.assert_close(out, ref, atol=float("inf"), max_calc_diff=1e-3)
    assert result.inf_pattern_ok and result.calc_diff > 0  # it is an approximation, and the mask is exact


def test_mqa_logits_accepts_scale_column():
    data = mqa_inputs([7], H=4, D=32)
    q, k, k_scale, w = data["fp8"]
    a = fp8.mqa_logits(q, (k, k_scale), w, data["ks"], data["ke"])
    b = fp8.mqa_logits(q, (k, k_scale.unsqueeze(-1)), w, data["ks"], data["ke"])
    assert torch.equal(a, b)


def test_mqa_logits_in_bfloat16_rounds_the_float32_logits():
    # DeepGEMM's logits_dtype: the same float64 computation, stored as bfloat16; -inf stays -inf
    data = mqa_inputs([9, 5], H=4, D=32)
    q, k, k_scale, w = data["fp8"]
    f32 = fp8.mqa_logits(q, (k, k_scale), w, data["ks"], data["ke"])
    bf16 = fp8.mqa_logits(q, (k, k_scale), w, data["ks"], data["ke"], query_chunk=4, logits_dtype=torch.bfloat16)
    assert f32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, f32.to(torch.bfloat16))
    assert torch.equal(torch.isneginf(bf16), torch.isneginf(f32)) and torch.isneginf(f32).any()
    assert torch.isfinite(bf16[~torch.isneginf(bf16)]).all()
    for bad in (torch.float16, torch.float64, "bfloat16", None):
        with pytest.raises(ValueError, match="logits_dtype must be torch.float32 or torch.bfloat16"):
            fp8.mqa_logits(q, (k, k_scale), w, data["ks"], data["ke"], logits_dtype=bad)


def _bad_mqa(**change):
    data = mqa_inputs([6, 4], H=64)
    q, k, k_scale, w = data["fp8"]
    args = dict(q=q, kv=(k, k_scale), weights=w, ks=data["ks"], ke=data["ke"])
    args.update(change)
    return args


@pytest.mark.parametrize("change, match", [
    (dict(ks=torch.tensor([0, 0, 0, 0, 0, 0, 6, 6, 10, 6], dtype=torch.int32)), "ks must be <= ke"),
    (dict(ke=torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 11], dtype=torch.int32)), "ke must be <= 10"),
    (dict(ks=torch.full((10,), -1, dtype=torch.int32)), "ks must be >= 0"),
    (dict(ks=torch.zeros(10, dtype=torch.int64)), "ks must be int32"),
    (dict(weights=torch.randn(10, 64).double()), "weights must be float32"),
    (dict(weights=torch.randn(10, 32)), "H = 32"),
    (dict(kv=(torch.randn(10, 64), torch.ones(10))), "D = 64"),
    (dict(kv=(torch.randn(10, 128),)), "pair"),
])
def test_mqa_logits_rejects_bad_input(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fp8.mqa_logits(**_bad_mqa(**change))


@pytest.mark.parametrize("change, match", [
    (dict(ks=torch.tensor([0, 0, 0, 0, 0, 0, 6, 6, 10, 6], dtype=torch.int32)), "ks must be <= ke"),
    (dict(ke=torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 11], dtype=torch.int32)), "ke must be <= 10"),
    (dict(ks=torch.full((10,), -1, dtype=torch.int32)), "ks must be >= 0"),
])
def test_cpu_ranges_are_checked_even_with_data_checks_off(change, match):
    # reading a CPU tensor costs no device synchronisation: its values are always checked
    with checks.data_checks(False), pytest.raises(ValueError, match=match):
        fp8.mqa_logits(**_bad_mqa(**change))


@pytest.mark.parametrize("change, match", [
    (dict(), "must be on a CUDA device"),
    (dict(q=torch.randn(10, 64, 128)), "q must be float8_e4m3fn"),
    (dict(kernel=6), "kernel must be None or a version of cuda/mqa_logits.cu: 1 \\(one thread"),
    (dict(kernel="wgmma"), "kernel must be None or a version"),
    # bfloat16 logits are accepted: past the dtype check, to the device check (these tensors are on the CPU)
    (dict(logits_dtype=torch.bfloat16), "must be on a CUDA device"),
    (dict(logits_dtype=torch.float16), "logits_dtype must be torch.float32 or torch.bfloat16"),
    (dict(logits_dtype="bfloat16"), "logits_dtype must be torch.float32 or torch.bfloat16"),
])
def test_mqa_logits_cuda_checks_before_launch(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fp8.mqa_logits_cuda(**_bad_mqa(**change))


def test_mqa_logits_kernel_table():
    table = fp8.MQA_LOGITS_KERNELS
    assert table.source == "mqa_logits" and table.versions == (1, 2, 3, 4, 5)
    # every kernel for each storage type of the logits: _f32 and _bf16 (logits_dtype)
    assert table.entry_points() == [f"mqa_logits_{name}_{out}" for name in ("naive",) for out in ("f32", "bf16")] + [
        f"mqa_logits_{name}_h{H}_{out}" for name in ("e4m3", "f16", "wgmma", "tma") for H in (64, 32)
        for out in ("f32", "bf16")]
    assert fp8.LOGITS_OUT == {torch.float32: "f32", torch.bfloat16: "bf16"}
    assert "compute capability 9.0" in table[4].needs and "compute capability 9.0" in table[5].needs
    # kernel 5 is the default on compute capability 9.0 (measured faster than kernel 4), then 4
    assert table.best_first == (5, 4, 3, 2, 1)
    d = table.defines()
    assert d["HEAD_DIM"] == 128 and d["THREADS"] == 32 * d["QUERIES_PER_CTA"]
    # kernel 4: 1024 bytes of alignment slack + what the kernel carves; K4_BLOCKS_PER_SM blocks an SM fit
    # the H200's 227 KiB (1 KiB reserved a block)
    assert d["K4_DYNAMIC_SMEM"] == d["K4_SMEM_ALIGN"] + d["K4_SMEM_BYTES"] == 51712 and d["K4_SMEM_ALIGN"] == 1024
    assert d["K4_BLOCKS_PER_SM"] * (d["K4_DYNAMIC_SMEM"] + 1024) <= 227 * 1024
    # kernel 5: one block an SM of 3 warpgroups; q [2 buffers][2 consumers][256][128], 8 key tiles of 64 x 128,
    # w [2][512] floats, 20 mbarriers, + the alignment slack
    assert d["K5_THREADS"] == 384 and d["K5_CONSUMER_ROWS"] == 256 and d["K5_STAGES"] == 8
    assert d["K5_DYNAMIC_SMEM"] == 1024 + 2 * 65536 + 8 * 8192 + 2 * 2048 + 20 * 8 == 201888
    assert d["K5_DYNAMIC_SMEM"] + 1024 <= 227 * 1024
    assert d["K5_PRODUCER_REGS"] + 2 * d["K5_CONSUMER_REGS"] <= 3 * 168  # setmaxnreg within 384 x 168


def test_mqa_logits_cuda_takes_the_best_kernel_that_runs(monkeypatch):
    table = fp8.MQA_LOGITS_KERNELS
    assert table.choose(None, fp8._mqa_logits_why_not("cpu", 10)).version == 3  # no wgmma here
    monkeypatch.setattr(kernels, "wgmma_available", lambda device=None: True)
    assert table.choose(None, fp8._mqa_logits_why_not("cuda:0", 10)).version == 5
    # kernel 5 needs 16-byte aligned q, k and weights: misaligned weights make the default kernel 4;
    # kernels 2 to 4 copy q and k in 16-byte pieces: a misaligned q or k leaves kernel 1
    assert table.choose(None, fp8._mqa_logits_why_not("cuda:0", 10, 64, ("weights",))).version == 4
    assert table.choose(None, fp8._mqa_logits_why_not("cuda:0", 10, 64, ("q",))).version == 1
    with pytest.raises(ValueError, match="kernel 4 of cuda/mqa_logits.cu .*16-byte aligned, but q is not"):
        table.choose(4, fp8._mqa_logits_why_not("cuda:0", 10, 64, ("q", "weights")))
    assert table.choose(5, fp8._mqa_logits_why_not("cuda:0", 10)).version == 5
    with pytest.raises(ValueError, match="kernel 5 of cuda/mqa_logits.cu .*16-byte aligned, but q, weights is not"):
        table.choose(5, fp8._mqa_logits_why_not("cuda:0", 10, 64, ("q", "weights")))
    with pytest.raises(ValueError, match="kernel 5 .*fewer than 2\\^31, got 2147483648"):
        table.choose(5, fp8._mqa_logits_why_not("cuda:0", 2**25, 64))
    assert table.choose(None, fp8._mqa_logits_why_not("cuda:0", 10, 64, ("k",))).version == 1
    assert table.choose(None, fp8._mqa_logits_why_not("cpu", 10, 64, ("k",))).version == 1
    assert table.choose(1, fp8._mqa_logits_why_not("cuda:0", 65535)).version == 1
    with pytest.raises(ValueError, match="kernel 1 of cuda/mqa_logits.cu .*at most 65535, got S_q = 65536"):
        table.choose(1, fp8._mqa_logits_why_not("cuda:0", 65536))


@pytest.mark.parametrize("logits_dtype", fp8.LOGITS_DTYPES)
@pytest.mark.parametrize("version, H, S_q, grid, block, smem", [
    (1, 64, 37, (1, 37), 128, 0), (2, 64, 37, 4, 384, 0), (2, 32, 12, 1, 384, 0), (3, 64, 37, 10, 256, 0),
    (3, 32, 37, 5, 256, 0), (4, 64, 1, 1, 128, 51712), (4, 64, 37, 19, 128, 51712), (4, 32, 37, 10, 128, 51712),
    (4, 32, 3, 1, 128, 51712)])
def test_mqa_logits_launch_geometry(monkeypatch, version, H, S_q, grid, block, smem, logits_dtype):
    # what each kernel is launched with, recorded instead of launched: kernel 1 a block per 128 keys of a
    # query; kernel 2 12 queries a block; kernel 3 8 warps, 32 heads a warp; kernel 4 128 / H queries a block;
    # the entry that stores the logits' dtype
    launches = recorded_launches(monkeypatch)
    q, k, k_scale, w = fp8_inputs(S_q, 65, H)
    ks, ke = _ragged_ranges(S_q, 65, seed=0)
    logits = torch.empty(S_q, 65, dtype=logits_dtype)
    fp8._launch_mqa_logits(version, q, k, k_scale, w, ks, ke, logits, False)
    (source, entry, got_grid, got_block, args, got_smem), = launches
    out = "bf16" if logits_dtype == torch.bfloat16 else "f32"
    assert (source, entry) == ("mqa_logits", fp8.MQA_LOGITS_KERNELS.entry(version, H=H, out=out))
    assert entry.endswith("_" + out)
    assert (got_grid, got_block, got_smem) == (grid, block, smem)
    assert args[:9] == (q, k, k_scale, w, ks, ke, logits, S_q, 65)
    assert args[9:] == ((H, False) if version == 1 else (False,))


@pytest.mark.parametrize("logits_dtype", fp8.LOGITS_DTYPES)
@pytest.mark.parametrize("H, S_q, grid, sms", [(64, 37, 5, 132), (32, 37, 3, 132), (64, 1, 1, 132), (64, 8000, 132, 132),
                                              (32, 8000, 78, 78)])
def test_mqa_logits_tma_launch_geometry(monkeypatch, H, S_q, grid, sms, logits_dtype):
    # kernel 5: 384 threads, one persistent block an SM at most (grid = min(blocks of 2 x 256 / H queries, SMs));
    # its first three arguments are the tensor maps of q [S_q H, 128] (boxes of 256 rows, 128B swizzle),
    # k [S_k, 128] (64 rows, 128B swizzle) and weights [S_q, H] (the block's 2 x 256 / H rows, no swizzle)
    launches = recorded_launches(monkeypatch)
    maps = []
    monkeypatch.setattr(kernels, "tensor_map_2d", lambda t, box_rows, box_cols, swizzle=0:
                        maps.append((t, box_rows, box_cols, swizzle)) or f"map {len(maps)}")
    monkeypatch.setattr(fp8, "_sm_count", lambda device: sms)
    q, k, k_scale, w = fp8_inputs(S_q, 65, H)
    ks, ke = _ragged_ranges(S_q, 65, seed=0)
    logits = torch.empty(S_q, 65, dtype=logits_dtype)
    fp8._launch_mqa_logits(5, q, k, k_scale, w, ks, ke, logits, True)
    (source, entry, got_grid, got_block, args, got_smem), = launches
    out = "bf16" if logits_dtype == torch.bfloat16 else "f32"
    assert (source, entry) == ("mqa_logits", f"mqa_logits_tma_h{H}_{out}")
    assert (got_grid, got_block, got_smem) == (grid, 384, 201888)
    assert args == ("map 1", "map 2", "map 3", k_scale, ks, ke, logits, S_q, 65, True)
    (q_rows, *q_box), (k_rows, *k_box), (w_rows, *w_box) = maps
    assert q_rows.shape == (S_q * H, 128) and q_rows.data_ptr() == q.data_ptr() and q_box == [256, 128, 128]
    assert k_rows is k and k_box == [64, 128, 128]
    assert w_rows is w and w_box == [512 // H, H, 0]


def test_tensor_map_2d_args():
    # what cuTensorMapEncodeTiled is given: the innermost dimension first, the row stride in bytes
    assert kernels.tensor_map_2d_args(8192, 128, 1, 64, 128, 128) == dict(
        dims=(128, 8192), strides=(128,), box=(128, 64), element_strides=(1, 1), swizzle=3)
    assert kernels.tensor_map_2d_args(37, 64, 4, 8, 64) == dict(
        dims=(64, 37), strides=(256,), box=(64, 8), element_strides=(1, 1), swizzle=0)
    assert kernels.tensor_map_2d_args(2**31, 16, 1, 256, 16, 32)["swizzle"] == 1
    for args, match in [((10, 128, 1, 257, 128, 128), "at most 256"), ((10, 100, 1, 64, 100), "multiples of 16"),
                        ((10, 128, 1, 64, 128, 64), "must fit the 64-byte swizzle"), ((10, 128, 1, 64, 128, 16), "swizzle must"),
                        ((0, 128, 1, 64, 128), "rows must be a positive"), ((2**31 + 1, 128, 1, 64, 128), "at most 2\\^31")]:
        with pytest.raises(ValueError, match=match):
            kernels.tensor_map_2d_args(*args)
    with pytest.raises(ValueError, match="contiguous 2-D CUDA tensor"):
        kernels.tensor_map_2d(torch.zeros(4, 16, dtype=torch.uint8), 4, 16)


def test_a_struct_passes_by_value():
    # a tensor map (a 128-byte numpy void scalar) goes into the parameter block as its bytes, 64-byte aligned
    value = np.frombuffer(bytes(range(128)), dtype=np.dtype((np.void, kernels.TENSOR_MAP_BYTES))).copy()
    assert kernels._kernel_arg(value, 0, "k", 0) == ("128s", bytes(range(128)))
    packer, offsets, size = kernels._parameter_layout(("Q", "i", "128s", "i", "h", "Q"))
    assert offsets == (0, 8, 64, 192, 196, 200) and size == 208 and packer.size == 208
    packed = packer.pack(2**40 + 5, -3, bytes(range(128)), 7, -2, 9)
    assert packed[64:192] == bytes(range(128)) and int.from_bytes(packed[8:12], "little", signed=True) == -3
    assert int.from_bytes(packed[0:8], "little") == 2**40 + 5 and int.from_bytes(packed[200:208], "little") == 9
    # scalars: Python ints and bools as int32, floats as float32, numpy scalars at their own width
    assert kernels._kernel_arg(True, 0, "k", 0) == ("i", 1) and kernels._kernel_arg(5, 0, "k", 0) == ("i", 5)
    assert kernels._kernel_arg(0.5, 0, "k", 0) == ("f", 0.5)
    assert kernels._kernel_arg(np.uint64(7), 0, "k", 0) == ("Q", 7)
    assert kernels._kernel_arg(np.float32(0.25), 0, "k", 0) == ("f", 0.25)
    with pytest.raises(ValueError, match="does not fit an int32"):
        kernels._kernel_arg(2**31, 0, "k", 0)
    with pytest.raises(TypeError, match="cannot pass ndarray"):
        kernels._kernel_arg(np.zeros(2, dtype=np.dtype((np.void, 128))), 0, "k", 0)


def test_wgmma_refusal_names_the_capability(monkeypatch):
    monkeypatch.setattr(kernels, "wgmma_available", lambda device=None: False)
    monkeypatch.setattr(kernels, "gpu_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(fp8.kernels, "_capability", lambda index: (8, 0))  # cached per device: bypass it
    reason = fp8.wgmma_why_not("cuda:0")
    assert reason == ("needs a GPU of compute capability 9.0 (H100, H200: wgmma, compiled for sm_90a), "
                      "but cuda:0 has compute capability 8.0")
    refusal = r"kernel 4 of cuda/mqa_logits.cu \(.*\) cannot run these inputs: needs .*capability 9\.0.*has compute capability 8\.0"
    with pytest.raises(ValueError, match=refusal):
        fp8.MQA_LOGITS_KERNELS.choose(4, fp8._mqa_logits_why_not("cuda:0", 10))
    with pytest.raises(ValueError, match=refusal.replace("kernel 4", "kernel 5")):
        fp8.MQA_LOGITS_KERNELS.choose(5, fp8._mqa_logits_why_not("cuda:0", 10))
    assert fp8.MQA_LOGITS_KERNELS.choose(None, fp8._mqa_logits_why_not("cuda:0", 10)).version == 3
    assert "is not a usable CUDA GPU" in fp8.wgmma_why_not("cpu")


def test_mqa_logits_cuda_rejects_unsupported_heads_and_head_dim():
    data = mqa_inputs([6], H=16, D=128)
    q, k, k_scale, w = data["fp8"]
    with pytest.raises(ValueError, match="supports H in"):
        fp8.check_mqa_logits_inputs(q, (k, k_scale), w, data["ks"], data["ke"], cuda=True)
    data = mqa_inputs([6], H=64, D=64)
    q, k, k_scale, w = data["fp8"]
    with pytest.raises(ValueError, match="supports head_dim"):
        fp8.check_mqa_logits_inputs(q, (k, k_scale), w, data["ks"], data["ke"], cuda=True)


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [128, 32, 192])
@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
@pytest.mark.parametrize("kernel", [None, *fp8.ACT_QUANT_KERNELS.versions])
def test_act_quant_cuda_is_bit_exact(dtype, block_size, scale_fmt, kernel):
    if kernel == 2 and block_size != 128:
        pytest.skip("kernel 2 is for block_size 128 only")
    x = (with_outliers((37, 3, 4 * 192), seed=5, scale=3.0)).to(dtype)
    x[0, 0] = 0  # an all-zero block: the 1e-4 floor
    x[1, 1, :block_size] = 1e-30  # a block of tiny values
    ref_q, ref_s = fp8.act_quant(x, block_size, scale_fmt)
    x_cuda = x.cuda()
    out = (compare.poisoned(x.shape, torch.float8_e4m3fn), compare.poisoned(ref_s.shape, torch.float32))
    out_q, out_s = fp8.act_quant_cuda(x_cuda, block_size, scale_fmt, kernel=kernel, out=out)
    assert out_q is out[0] and out_s is out[1]
    assert torch.equal(out_q.view(torch.uint8).cpu(), ref_q.view(torch.uint8))  # every byte
    assert torch.equal(out_s.cpu(), ref_s)
    # the reference gives the same bits on the GPU (the same float32 product and division there too)
    gpu_q, gpu_s = fp8.act_quant(x_cuda, block_size, scale_fmt)
    assert torch.equal(gpu_q.view(torch.uint8).cpu(), ref_q.view(torch.uint8)) and torch.equal(gpu_s.cpu(), ref_s)
    # and the default kernel gives the same bits
    again_q, again_s = fp8.act_quant_cuda(x_cuda, block_size, scale_fmt)
    assert torch.equal(again_q.view(torch.uint8), out_q.view(torch.uint8)) and torch.equal(again_s, out_s)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", fp8.ACT_QUANT_KERNELS.versions)
def test_act_quant_cuda_plain_scale_is_the_float32_product(kernel):
    # blocks whose amax / 448 and amax * float32(1/448) round differently: the kernel computes the product
    # (as the official kernel does), bit for bit the reference, and not the quotient
    amax, differ = division_and_product_differ(1024, seed=2)
    x = torch.randn(1024, 128, generator=torch.Generator().manual_seed(3)).clamp(-1, 1) * amax[:, None] * 0.9
    x[:, 5] = amax  # |x| peaks at amax exactly
    _, ref_s = fp8.act_quant(x, scale_fmt=None)
    x_q, s = fp8.act_quant_cuda(x.cuda(), scale_fmt=None, kernel=kernel)
    s, ref_s = s.squeeze(-1), ref_s.squeeze(-1)  # one block a row: [1024]
    assert torch.equal(s.cpu(), ref_s) and np.array_equal(ref_s.numpy(), amax.numpy() * np.float32(1 / 448))
    quotient = amax.numpy() / np.float32(448)
    assert differ.sum() > 200 and (s.cpu().numpy()[differ] != quotient[differ]).all()
    assert torch.equal(x_q.view(torch.uint8).cpu(), fp8.act_quant(x, scale_fmt=None)[0].view(torch.uint8))


@pytest.mark.gpu
def test_act_quant_cuda_b128_tails_and_alignment():
    # 1, 3, 5 and 9 blocks: partial last groups of 4 blocks per warp; a tensor at an offset of 4
    # values (8 or 16 bytes) takes kernel 1, or is refused by kernel 2 when not 16-byte aligned
    for n_rows in (1, 3, 5, 9):
        x = with_outliers((n_rows, 128), seed=n_rows).cuda()
        q, s = fp8.act_quant_cuda(x, kernel=2)
        ref_q, ref_s = fp8.act_quant(x.cpu())
        assert torch.equal(q.view(torch.uint8).cpu(), ref_q.view(torch.uint8)) and torch.equal(s.cpu(), ref_s)
    x = with_outliers((4 * 128 + 4,), seed=3).cuda()[4:]  # 16 bytes in for float32: still aligned
    q, s = fp8.act_quant_cuda(x, kernel=2)
    assert torch.equal(q.view(torch.uint8).cpu(), fp8.act_quant(x.cpu())[0].view(torch.uint8))
    x = with_outliers((4 * 128 + 2,), seed=4).cuda()[2:]  # 8 bytes in: not 16-byte aligned
    q, s = fp8.act_quant_cuda(x)  # kernel 1
    assert torch.equal(q.view(torch.uint8).cpu(), fp8.act_quant(x.cpu())[0].view(torch.uint8))
    with pytest.raises(ValueError, match="kernel 2 of cuda/act_quant.cu .*16-byte aligned"):
        fp8.act_quant_cuda(x, kernel=2)


def fp8_inputs(S_q, S_k, H=64, seed=0):
    """Quantised rotated q [S_q, H, 128], k [S_k, 128], k_scale [S_k] and w [S_q, H] (q scale folded
    in), on the CPU, for any S_q and S_k."""
    g = torch.Generator().manual_seed(seed)
    q, q_s = fp8.act_quant(rotate_activation(torch.randn(S_q, H, 128, generator=g)))
    k, k_s = fp8.act_quant(rotate_activation(torch.randn(S_k, 128, generator=g)))
    w = torch.randn(S_q, H, generator=g) * q_s.squeeze(-1)
    return q, k, k_s.squeeze(-1), w


def _ragged_ranges(S_q, S_k, seed):
    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(0, S_k, (S_q,), generator=g)
    ke = torch.minimum(ks + torch.randint(0, 300, (S_q,), generator=g), torch.tensor(S_k))
    ks[::17] = ke[::17]  # some empty rows
    return ks.int(), ke.int()


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 32])
@pytest.mark.parametrize("kernel", fp8.MQA_LOGITS_KERNELS.versions)
@pytest.mark.parametrize("ranges", ["causal", "ragged"])
def test_mqa_logits_cuda_matches_reference(H, kernel, ranges):
    skip_unless_available(kernel)
    seq_lens = [1, 37, 130, 66, 7]  # S = 241: not a multiple of 2, 4, 8, 12 or 16 queries, nor of 64 keys
    data = mqa_inputs(seq_lens, H=H, seed=6)
    q, k, k_scale, w = data["fp8"]
    ks, ke = (data["ks"], data["ke"]) if ranges == "causal" else _ragged_ranges(241, 241, 7)
    ref = fp8.mqa_logits(q, (k, k_scale), w, ks, ke)  # float64 on the same FP8 values
    cuda = [t.cuda() for t in (q, k, k_scale, w, ks, ke)]
    out = compare.poisoned((241, 241), torch.float32, "cuda")
    assert fp8.mqa_logits_cuda(cuda[0], (cuda[1], cuda[2]), cuda[3], cuda[4], cuda[5], kernel=kernel, out=out) is out
    # FP8 products are exact in float32; what remains is float32 accumulation over D = 128 and
    # H heads, ~1e-6 of the magnitudes summed; 1e-3 of max|logit| leaves room for a tensor core
    # accumulating with fewer bits, and calc_diff 1e-6 is 1000x below DeepGEMM's bar.
    scale = ref[torch.isfinite(ref)].abs().max().item()
    compare.assert_close(out, ref, atol=1e-3 * scale, max_calc_diff=1e-6, name=f"kernel {kernel} logits")
    # and DeepGEMM's acceptance test against the unquantised inputs (causal ranges only)
    if ranges == "causal":
        q_raw, k_raw, w_raw = data["raw"]
        ref_raw = fp8.mqa_logits(q_raw, (k_raw, torch.ones(241)), w_raw, ks, ke)
        compare.assert_close(out, ref_raw, atol=float("inf"), max_calc_diff=1e-3, name="logits vs unquantised")


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 32])
@pytest.mark.parametrize("kernel", fp8.MQA_LOGITS_KERNELS.versions)
def test_mqa_logits_cuda_unclean_defines_the_visible_part(kernel, H):
    skip_unless_available(kernel)
    data = mqa_inputs([100, 29], H=H, seed=8)
    q, k, k_scale, w = (t.cuda() for t in data["fp8"])
    ks, ke = data["ks"].cuda(), data["ke"].cuda()
    ref = fp8.mqa_logits(q, (k, k_scale), w, ks, ke).cpu()
    out = compare.poisoned((129, 129), torch.float32, "cuda")
    fp8.mqa_logits_cuda(q, (k, k_scale), w, ks, ke, clean_logits=False, kernel=kernel, out=out)
    visible = torch.isfinite(ref)
    scale = ref[visible].abs().max().item()
    compare.assert_close(out.cpu()[visible], ref[visible], atol=1e-3 * scale, max_calc_diff=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", fp8.MQA_LOGITS_KERNELS.versions)
@pytest.mark.parametrize("H", [64, 32])
@pytest.mark.parametrize("S_k", [1, 63, 65, 200])
@pytest.mark.parametrize("S_q", [1, 3, 37])
def test_mqa_logits_cuda_small_ragged_sizes(S_q, S_k, H, kernel):
    # S_q smaller than, and not a multiple of, any kernel's queries a block (2 or 4 for wgmma); S_k
    # within, just past and well past one 64-key tile. Causal ranges ending at key S_k (with S_q > S_k
    # the first queries see nothing) and arbitrary ones with empty rows; clean_logits both ways.
    skip_unless_available(kernel)
    q, k, k_scale, w = fp8_inputs(S_q, S_k, H, seed=1000 * S_q + S_k)
    causal = (torch.zeros(S_q, dtype=torch.int32), torch.clamp(torch.arange(S_q) + S_k - S_q + 1, min=0).int())
    cuda = [t.cuda() for t in (q, k, k_scale, w)]
    for ks, ke in (causal, _ragged_ranges(S_q, S_k, seed=S_k)):
        ref = fp8.mqa_logits(q, (k, k_scale), w, ks, ke)
        visible = torch.isfinite(ref)
        scale = ref[visible].abs().max().item() if visible.any() else 1.0
        for clean in (True, False):
            out = compare.poisoned((S_q, S_k), torch.float32, "cuda")
            fp8.mqa_logits_cuda(cuda[0], (cuda[1], cuda[2]), cuda[3], ks.cuda(), ke.cuda(), clean, kernel=kernel,
                                out=out)
            name = f"kernel {kernel} S_q={S_q} S_k={S_k} H={H} clean={clean}"
            if clean:
                compare.assert_close(out, ref, atol=1e-3 * scale, max_calc_diff=1e-6, name=name)
            else:  # only [ks_i, ke_i) is defined
                compare.assert_close(out.cpu()[visible], ref[visible], atol=1e-3 * scale, max_calc_diff=1e-6,
                                     name=name)


@pytest.mark.gpu
def test_mqa_logits_cuda_default_is_the_best_kernel_that_runs():
    best = 5 if fp8.wgmma_why_not(torch.device("cuda")) is None else 3
    assert fp8.MQA_LOGITS_KERNELS.choose(None, fp8._mqa_logits_why_not(torch.device("cuda"), 103)).version == best
    data = mqa_inputs([70, 33], H=64, seed=11)
    cuda = [t.cuda() for t in data["fp8"]]
    ks, ke = data["ks"].cuda(), data["ke"].cuda()
    a = fp8.mqa_logits_cuda(cuda[0], (cuda[1], cuda[2]), cuda[3], ks, ke)
    b = fp8.mqa_logits_cuda(cuda[0], (cuda[1], cuda[2]), cuda[3], ks, ke, kernel=best)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_mqa_logits_cuda_refuses_wgmma_where_it_does_not_run(monkeypatch):
    pretend_no_wgmma(monkeypatch)
    data = mqa_inputs([70, 33], H=64, seed=11)
    q, k, k_scale, w = (t.cuda() for t in data["fp8"])
    ks, ke = data["ks"].cuda(), data["ke"].cuda()
    out = compare.poisoned((103, 103), torch.float32, "cuda")
    refusal = r"kernel 4 of cuda/mqa_logits.cu .*capability 9\.0 .*has compute capability \d+\.\d+"
    with pytest.raises(ValueError, match=refusal):
        fp8.mqa_logits_cuda(q, (k, k_scale), w, ks, ke, kernel=4, out=out)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()  # refused before any launch
    ref = fp8.mqa_logits(q, (k, k_scale), w, ks, ke)
    scale = ref[torch.isfinite(ref)].abs().max().item()
    compare.assert_close(fp8.mqa_logits_cuda(q, (k, k_scale), w, ks, ke), ref, atol=1e-3 * scale,
                         max_calc_diff=1e-6)  # kernel 3, the best without wgmma


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", fp8.MQA_LOGITS_KERNELS.versions)
def test_mqa_logits_cuda_wide_ragged_ranges(kernel):
    # ranges that start and end anywhere, some much wider than a 64-key tile and some empty, so a
    # block's union of ranges has tiles where only some of its queries see anything
    skip_unless_available(kernel)
    g = torch.Generator().manual_seed(12)
    S_q, S_k = 157, 1000
    q, k, k_scale, w = fp8_inputs(S_q, S_k, seed=12)
    ks = torch.randint(0, S_k, (S_q,), generator=g)
    ke = torch.minimum(ks + torch.randint(0, 700, (S_q,), generator=g), torch.tensor(S_k))
    ks[::13] = ke[::13]
    ks, ke = ks.int(), ke.int()
    ref = fp8.mqa_logits(q, (k, k_scale), w, ks, ke)
    out = compare.poisoned((S_q, S_k), torch.float32, "cuda")
    fp8.mqa_logits_cuda(q.cuda(), (k.cuda(), k_scale.cuda()), w.cuda(), ks.cuda(), ke.cuda(), kernel=kernel, out=out)
    scale = ref[torch.isfinite(ref)].abs().max().item()
    compare.assert_close(out, ref, atol=1e-3 * scale, max_calc_diff=1e-6, name=f"kernel {kernel} logits")


@pytest.mark.gpu
@pytest.mark.parametrize("logits_dtype", fp8.LOGITS_DTYPES)
@pytest.mark.parametrize("H", [64, 32])
@pytest.mark.parametrize("kernel", fp8.MQA_LOGITS_KERNELS.versions)
def test_mqa_logits_cuda_stores_logits_dtype(kernel, H, logits_dtype):
    # every kernel, both storage types of the logits (DeepGEMM's logits_dtype), on ragged ranges (empty
    # rows, ranges wider than a tile) with clean_logits both ways, into poisoned buffers. float32: the
    # tolerance of test_mqa_logits_cuda_matches_reference; bfloat16: assert_bf16_logits (bit for bit the
    # float32 kernel's logits rounded, so bit for bit the reference's bf16 logits wherever the float32
    # kernel equals the float32 reference bit for bit, and within that tolerance plus a bf16 ulp elsewhere)
    skip_unless_available(kernel)
    S_q, S_k = 157, 1000
    q, k, k_scale, w = fp8_inputs(S_q, S_k, H, seed=14)
    g = torch.Generator().manual_seed(14)
    ks = torch.randint(0, S_k, (S_q,), generator=g)
    ke = torch.minimum(ks + torch.randint(0, 700, (S_q,), generator=g), torch.tensor(S_k))
    ks[::11] = ke[::11]
    ks, ke = ks.int(), ke.int()
    ref_f32 = fp8.mqa_logits(q, (k, k_scale), w, ks, ke)
    ref = fp8.mqa_logits(q, (k, k_scale), w, ks, ke, logits_dtype=logits_dtype)
    scale = ref_f32[torch.isfinite(ref_f32)].abs().max().item()
    cuda = dict(q=q.cuda(), kv=(k.cuda(), k_scale.cuda()), weights=w.cuda(), ks=ks.cuda(), ke=ke.cuda())
    for clean in (True, False):
        name = f"kernel {kernel} H={H} {logits_dtype} clean={clean}"
        out = compare.poisoned((S_q, S_k), logits_dtype, "cuda")
        assert fp8.mqa_logits_cuda(**cuda, clean_logits=clean, kernel=kernel, out=out, logits_dtype=logits_dtype) is out
        fresh = fp8.mqa_logits_cuda(**cuda, clean_logits=clean, kernel=kernel, logits_dtype=logits_dtype)
        assert fresh.dtype == logits_dtype and fresh.shape == (S_q, S_k)
        where = None if clean else torch.isfinite(ref_f32)  # unclean: only [ks_i, ke_i) is defined
        if logits_dtype == torch.float32:
            compare.assert_close(out if clean else out.cpu()[where], ref if clean else ref[where], atol=1e-3 * scale,
                                 max_calc_diff=1e-6, name=name)
        else:
            out_f32 = compare.poisoned((S_q, S_k), torch.float32, "cuda")
            fp8.mqa_logits_cuda(**cuda, clean_logits=clean, kernel=kernel, out=out_f32)
            assert_bf16_logits(out, out_f32, ref, ref_f32, atol=1e-3 * scale, name=name, where=where)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [None, *fp8.MQA_LOGITS_KERNELS.versions])
def test_mqa_logits_cuda_longer_key_side(kernel):
    # S_k > S_q: queries are the last 150 positions of a 700-key context (offset causal ranges)
    skip_unless_available(kernel)
    q, k, k_scale, w = fp8_inputs(150, 700, seed=9)
    ks = torch.zeros(150, dtype=torch.int32)
    ke = torch.arange(551, 701, dtype=torch.int32)
    ref = fp8.mqa_logits(q, (k, k_scale), w, ks, ke)
    out = fp8.mqa_logits_cuda(q.cuda(), (k.cuda(), k_scale.cuda()), w.cuda(), ks.cuda(), ke.cuda(), kernel=kernel)
    scale = ref[torch.isfinite(ref)].abs().max().item()
    compare.assert_close(out, ref, atol=1e-3 * scale, max_calc_diff=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("logits_dtype", fp8.LOGITS_DTYPES)
@pytest.mark.parametrize("H", [64, 32])
@pytest.mark.parametrize("kernel", SM90A)
def test_mqa_logits_cuda_many_query_blocks(kernel, H, logits_dtype):
    # more blocks of queries than SMs (kernel 5's persistent loop: several rounds a block, both q buffers and
    # many laps of the key ring), ragged prefills and ragged/empty/wild ranges, clean_logits both ways, into
    # poisoned outputs; the reference in float64 on the GPU
    skip_unless_available(kernel)
    g = torch.Generator().manual_seed(40 + H)
    seq_lens = [1, 700, 3, 1500, 129, 2, 477]  # S = 2812: not a multiple of 8 or 16 queries, nor of 64 keys
    data = mqa_inputs(seq_lens, H=H, seed=41, device="cuda")
    q, k, k_scale, w = data["fp8"]
    S = sum(seq_lens)
    ks, ke = data["ks"].clone(), data["ke"].clone()
    rows = torch.randperm(S, generator=g)[:300].cuda()  # some rows with ragged, empty and wild ranges
    wild_ks, wild_ke = wild_ranges(300, S, seed=42)
    ks[rows], ke[rows] = wild_ks.cuda(), wild_ke.cuda()
    clipped_ks = ks.long().clamp(0, S)
    clipped_ke = torch.maximum(ke.long().clamp(max=S), clipped_ks)
    ref_f32 = fp8.mqa_logits(q, (k, k_scale), w, clipped_ks.int(), clipped_ke.int())
    ref = ref_f32.to(logits_dtype)
    visible = torch.isfinite(ref_f32)
    scale = ref_f32[visible].abs().max().item()
    rtol = 2.0 ** -7 if logits_dtype == torch.bfloat16 else 0.0
    for clean in (True, False):
        guard = compare.poisoned((S + 2, S), logits_dtype, "cuda")  # a row of NaN on each side: must stay
        out = guard[1:-1]
        with checks.data_checks(False):
            fp8.mqa_logits_cuda(q, (k, k_scale), w, ks, ke, clean, kernel=kernel, out=out, logits_dtype=logits_dtype)
        torch.cuda.synchronize()
        assert torch.isnan(guard[0]).all() and torch.isnan(guard[-1]).all()
        name = f"kernel {kernel} H={H} {logits_dtype} clean={clean}"
        if clean:
            compare.assert_close(out, ref, atol=1e-3 * scale, rtol=rtol, max_calc_diff=1e-6, name=name)
        else:
            compare.assert_close(out[visible], ref[visible], atol=1e-3 * scale, rtol=rtol, max_calc_diff=1e-6,
                                 name=name)


@pytest.mark.gpu
def test_mqa_logits_cuda_tma_needs_aligned_inputs():
    # kernel 5 reads q, k and the weights through TMA tensor maps, which need 16-byte aligned data: a q
    # 8 bytes past an aligned address is refused (before any launch), and so by kernels 2 to 4, which copy q
    # and k in 16-byte pieces.
    skip_unless_available(TMA)
    data = mqa_inputs([70, 33], H=64, seed=11)
    q, k, k_scale, w = (t.cuda() for t in data["fp8"])
    ks, ke = data["ks"].cuda(), data["ke"].cuda()
    shifted = torch.empty(q.numel() + 8, dtype=torch.uint8, device="cuda")[8:].view(torch.float8_e4m3fn)
    shifted.copy_(q.view(-1))
    q_shifted = shifted.view(q.shape)
    assert q_shifted.data_ptr() % 16 == 8 and q_shifted.is_contiguous()
    out = compare.poisoned((103, 103), torch.float32, "cuda")
    for kernel in (2, 3, 4, 5):
        with pytest.raises(ValueError, match=f"kernel {kernel} of cuda/mqa_logits.cu .*16-byte aligned, but q is not"):
            fp8.mqa_logits_cuda(q_shifted, (k, k_scale), w, ks, ke, kernel=kernel, out=out)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()  # refused before any launch
    # the default takes kernel 1 (scalar loads) for it, and gives kernel 1's logits of the aligned q
    expected = fp8.mqa_logits_cuda(q, (k, k_scale), w, ks, ke, kernel=1)
    got = fp8.mqa_logits_cuda(q_shifted, (k, k_scale), w, ks, ke, out=out)
    assert torch.equal(got, expected)
    # the tensor map: 128 bytes, the same (cached, read-only) object for the same request
    first = kernels.tensor_map_2d(k, 64, 128, swizzle=128)
    assert first.nbytes == kernels.TENSOR_MAP_BYTES and first is kernels.tensor_map_2d(k, 64, 128, swizzle=128)
    assert not first.flags.writeable


def wild_ranges(S_q, S_k, seed):
    """ks, ke [S_q] int32 with every kind of invalid range: negative, past S_k, reversed, far out of
    range both ways, mixed with valid ones."""
    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(-3 * S_k, 3 * S_k, (S_q,), generator=g)
    ke = ks + torch.randint(-2 * S_k, 2 * S_k, (S_q,), generator=g)
    ks[::5], ke[::5] = -(2 ** 31), 2 ** 31 - 1  # the extremes of int32
    ks[1::5], ke[1::5] = 2 ** 31 - 1, -(2 ** 31)
    valid_ks, valid_ke = _ragged_ranges(S_q, S_k, seed)
    ks[2::5], ke[2::5] = valid_ks[2::5].long(), valid_ke[2::5].long()
    return ks.int(), ke.int()


@pytest.mark.gpu
@pytest.mark.parametrize("logits_dtype", fp8.LOGITS_DTYPES)
@pytest.mark.parametrize("clean", [True, False])
@pytest.mark.parametrize("kernel", fp8.MQA_LOGITS_KERNELS.versions)
def test_mqa_logits_cuda_wild_ranges_with_data_checks_off(kernel, clean, logits_dtype):
    # data checks off (the default): no check reads ks/ke, and the kernels clip each range to
    # [max(ks, 0), min(ke, S_k)) (empty when reversed): nothing outside the tensors is touched
    # (compute-sanitizer: benchmarks/sanitize_fp8.py) and each row is the reference on that range
    skip_unless_available(kernel)
    S_q, S_k = 77, 300
    q, k, k_scale, w = fp8_inputs(S_q, S_k, seed=21)
    ks, ke = wild_ranges(S_q, S_k, seed=21)
    with checks.data_checks(True), pytest.raises(ValueError):  # with data checks on: refused
        fp8.mqa_logits_cuda(q.cuda(), (k.cuda(), k_scale.cuda()), w.cuda(), ks.cuda(), ke.cuda(), kernel=kernel)
    clipped_ks = ks.long().clamp(0, S_k)
    clipped_ke = torch.maximum(ke.long().clamp(max=S_k), clipped_ks)
    ref = fp8.mqa_logits(q, (k, k_scale), w, clipped_ks.int(), clipped_ke.int(), logits_dtype=logits_dtype)
    guard = compare.poisoned((S_q + 2, S_k), logits_dtype, "cuda")  # a row of NaN on each side: must stay
    out = guard[1:-1]
    with checks.data_checks(False):
        fp8.mqa_logits_cuda(q.cuda(), (k.cuda(), k_scale.cuda()), w.cuda(), ks.cuda(), ke.cuda(), clean,
                            kernel=kernel, out=out, logits_dtype=logits_dtype)
    torch.cuda.synchronize()
    assert torch.isnan(guard[0]).all() and torch.isnan(guard[-1]).all()
    visible = torch.isfinite(ref)
    scale = ref[visible].abs().max().item()
    # bfloat16: the float32 tolerance plus one bf16 ulp (see assert_bf16_logits)
    rtol = 2.0 ** -7 if logits_dtype == torch.bfloat16 else 0.0
    if clean:
        compare.assert_close(out, ref, atol=1e-3 * scale, rtol=rtol, max_calc_diff=1e-6,
                             name=f"kernel {kernel} wild ranges")
    else:
        compare.assert_close(out.cpu()[visible], ref[visible], atol=1e-3 * scale, rtol=rtol, max_calc_diff=1e-6)


@pytest.mark.gpu
def test_mqa_logits_cuda_rejects_bad_input_before_launch():
    args = _bad_mqa()
    cuda = dict(q=args["q"].cuda(), kv=(args["kv"][0].cuda(), args["kv"][1].cuda()), weights=args["weights"].cuda(),
                ks=args["ks"].cuda(), ke=args["ke"].cuda())
    out = compare.poisoned((10, 10), torch.float32, "cuda")
    with checks.data_checks(True):  # device data: checked only when asked for
        with pytest.raises(ValueError, match="ks must be <= ke"):
            fp8.mqa_logits_cuda(**{**cuda, "ks": cuda["ke"] + 1}, out=out)
        with pytest.raises(ValueError, match="ke must be <="):
            fp8.mqa_logits_cuda(**{**cuda, "ke": cuda["ke"] + 5}, out=out)
        with pytest.raises(ValueError, match="ks must be >= 0"):
            fp8.mqa_logits_cuda(**{**cuda, "ks": cuda["ks"] - 1}, out=out)
    with pytest.raises(ValueError, match="contiguous"):
        fp8.mqa_logits_cuda(**{**cuda, "weights": torch.randn(64, 10, device="cuda").t()}, out=out)
    with pytest.raises(ValueError, match="kernel must be None or a version"):
        fp8.mqa_logits_cuda(**cuda, kernel=0, out=out)
    with pytest.raises(TypeError, match="out must be bfloat16, got float32"):  # out in the dtype asked for
        fp8.mqa_logits_cuda(**cuda, out=out, logits_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()  # nothing launched
