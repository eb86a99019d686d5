"""RoPE: the YaRN frequencies against the official code, both layouts, the relative-position
property, bad inputs, and every kernel of cuda/apply_rope.cu against the float64 reference."""
import math

import pytest
import torch

from dsa_tutorial import checks, compare, rope
from dsa_tutorial.config import ModelArgs

TINY = ModelArgs.tiny()
V32 = ModelArgs()


def official_freqs_cis(args: ModelArgs, dtype=torch.float64) -> torch.Tensor:
    """A transcription of the official DeepSeek-V3.2 `precompute_freqs_cis` (there in float32)."""
    dim, seqlen, base, factor = args.qk_rope_head_dim, args.max_seq_len, args.rope_theta, args.rope_factor

    def find_correction_dim(num_rotations, dim, base, max_seq_len):
        return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    def find_correction_range(low_rot, high_rot, dim, base, max_seq_len):
        low = math.floor(find_correction_dim(low_rot, dim, base, max_seq_len))
        high = math.ceil(find_correction_dim(high_rot, dim, base, max_seq_len))
        return max(low, 0), min(high, dim - 1)

    def linear_ramp_factor(min, max, dim):
        if min == max:
            max += 0.001
        return torch.clamp((torch.arange(dim, dtype=dtype) - min) / (max - min), 0, 1)

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=dtype) / dim))
    if seqlen > args.original_seq_len:
        low, high = find_correction_range(args.beta_fast, args.beta_slow, dim, base, args.original_seq_len)
        smooth = 1 - linear_ramp_factor(low, high, dim // 2)
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    freqs = torch.outer(torch.arange(seqlen, dtype=dtype), freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def official_apply_rotary_emb(x, freqs_cis, interleaved=True):
    """A transcription of the official `apply_rotary_emb` for x [T, H, d] and freqs_cis [T, d/2]."""
    shape = x.shape
    if not interleaved:
        x = x.view(*shape[:-1], 2, -1).transpose(-1, -2).contiguous()
    x = torch.view_as_complex(x.double().reshape(*shape[:-1], -1, 2))
    y = torch.view_as_real(x * freqs_cis[:, None, :]).flatten(-2)
    if not interleaved:
        y = torch.cat([y[..., 0::2], y[..., 1::2]], dim=-1)
    return y


@pytest.mark.parametrize("args", [TINY, V32, ModelArgs.tiny(max_seq_len=64)], ids=["tiny", "v32", "no-yarn"])
def test_freqs_match_official(args):
    ours = rope.precompute_freqs_cis(args)
    assert ours.shape == (args.max_seq_len, args.qk_rope_head_dim // 2) and ours.dtype == torch.complex128
    assert torch.allclose(ours, official_freqs_cis(args), rtol=0, atol=1e-12)
    # the official float32 table agrees to float32 rounding of the angle (|m theta| up to 1.6e5 rad at V3.2)
    f32 = official_freqs_cis(args, torch.float32)
    max_angle = float(args.max_seq_len)
    assert (ours.to(torch.complex64) - f32).abs().max() < 4 * max_angle * 2**-24 + 1e-6


def test_yarn_only_beyond_original_length():
    plain = 1.0 / (TINY.rope_theta ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    assert torch.equal(rope.inv_freq(ModelArgs.tiny(max_seq_len=64)), plain)
    yarn = rope.inv_freq(TINY)
    assert yarn[0] == plain[0]  # the fastest pair is left alone
    assert torch.allclose(yarn[-1], plain[-1] / TINY.rope_factor)  # the slowest is divided by the factor
    # V3.2: the high-frequency dims are untouched, the low-frequency ones stretched 40x
    v32, base = rope.inv_freq(V32), 1.0 / (1e4 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    assert torch.equal(v32[:10], base[:10]) and torch.allclose(v32[-8:], base[-8:] / 40)


@pytest.mark.parametrize("layout", rope.LAYOUTS)
def test_apply_rope_matches_official(layout):
    torch.manual_seed(1)
    x = torch.randn(13, 3, V32.qk_rope_head_dim, dtype=torch.float64)
    positions = torch.randint(0, V32.max_seq_len, (13,))
    table = official_freqs_cis(V32)[positions]
    want = official_apply_rotary_emb(x, table, interleaved=layout == "interleaved")
    got = rope.apply_rope(x, positions, layout, V32)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_layouts_are_a_permutation_apart_and_not_equal():
    torch.manual_seed(2)
    d = TINY.qk_rope_head_dim
    x = torch.randn(9, d, dtype=torch.float64)
    positions = torch.arange(9) * 7
    # half layout (i, i + d/2) = interleaved layout after moving coordinate i + d/2 next to i
    to_interleaved = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()
    back = torch.argsort(to_interleaved)
    via = rope.apply_rope(x[:, to_interleaved], positions, "interleaved", TINY)[:, back]
    assert torch.allclose(rope.apply_rope(x, positions, "half", TINY), via, atol=1e-14)
    # ... but as functions of the same vector they differ (the indexer bug)
    assert (rope.apply_rope(x, positions, "half", TINY) - rope.apply_rope(x, positions, "interleaved", TINY)
            ).abs().max() > 0.1


@pytest.mark.parametrize("layout", rope.LAYOUTS)
def test_rotation_properties(layout):
    torch.manual_seed(3)
    x = torch.randn(20, 2, TINY.qk_rope_head_dim, dtype=torch.float64)
    positions = torch.randint(0, TINY.max_seq_len, (20,))
    y = rope.apply_rope(x, positions, layout, TINY)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12)  # a rotation keeps lengths
    zero = rope.apply_rope(x, torch.zeros(20, dtype=torch.int64), layout, TINY)
    assert torch.equal(zero, x)  # position 0 is the identity


@pytest.mark.parametrize("layout", rope.LAYOUTS)
@pytest.mark.parametrize("args", [TINY, V32], ids=["tiny", "v32"])
def test_relative_position(layout, args):
    """<RoPE(q, m), RoPE(k, n)> depends on m - n only."""
    torch.manual_seed(4)
    q, k = torch.randn(2, 1, args.qk_rope_head_dim, dtype=torch.float64).unbind(0)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        m, n = torch.randint(0, args.max_seq_len // 2, (2,), generator=gen).tolist()
        shift = int(torch.randint(0, args.max_seq_len // 2, (1,), generator=gen))
        score = lambda a, b: float((rope.apply_rope(q, torch.tensor([a]), layout, args)  # noqa: E731
                                    * rope.apply_rope(k, torch.tensor([b]), layout, args)).sum())
        assert abs(score(m, n) - score(m + shift, n + shift)) < 1e-9
    # and it does depend on m - n
    assert abs(score(10, 3) - score(3, 10)) > 1e-3


def test_shapes_and_dtypes():
    torch.manual_seed(6)
    x = torch.randn(2, 5, 3, 8)
    positions = torch.tensor([0, 4, 9, 100, 255])
    batched = rope.apply_rope(x, positions, "interleaved", TINY)
    assert batched.shape == x.shape and batched.dtype == torch.float32
    assert torch.equal(batched[1], rope.apply_rope(x[1], positions, "interleaved", TINY))
    assert torch.equal(batched[1, :, 2], rope.apply_rope(x[1, :, 2], positions, "interleaved", TINY))
    bf16 = rope.apply_rope(x[0].bfloat16(), positions, "half", TINY)
    assert bf16.dtype == torch.bfloat16
    angles = rope.rope_angles(positions, TINY)
    assert angles.shape == (5, 4) and angles.dtype == torch.float64
    cos, sin = rope.cos_sin_table(TINY)
    assert cos.shape == (256, 4) and cos.dtype == torch.float32
    assert torch.allclose(cos.double()[positions], angles.cos(), atol=1e-7)


def test_bad_inputs():
    x, positions = torch.randn(4, 8), torch.arange(4)
    with pytest.raises(ValueError, match="must be even"):
        rope.apply_rope(torch.randn(4, 7), positions, "interleaved", TINY)
    with pytest.raises(ValueError, match="qk_rope_head_dim = 8"):
        rope.apply_rope(torch.randn(4, 6), positions, "interleaved", TINY)
    with pytest.raises(ValueError, match="positions must be <= 255"):
        rope.apply_rope(x, torch.tensor([0, 1, 2, 256]), "interleaved", TINY)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        rope.apply_rope(x, torch.tensor([0, -1, 2, 3]), "interleaved", TINY)
    with pytest.raises(TypeError, match="positions must be int64"):
        rope.apply_rope(x, positions.int(), "interleaved", TINY)
    with pytest.raises(ValueError, match="positions has T = 3"):
        rope.apply_rope(x, torch.arange(3), "interleaved", TINY)
    with pytest.raises(ValueError, match="layout must be"):
        rope.apply_rope(x, positions, "rotate", TINY)
    with pytest.raises(TypeError, match="x must be float32 or float64 or bfloat16"):
        rope.apply_rope(x.half(), positions, "interleaved", TINY)
    with pytest.raises(ValueError, match=r"x must be \[T, d_R\]"):
        rope.apply_rope(torch.randn(8), torch.arange(1), "interleaved", TINY)
    with pytest.raises(ValueError, match="one device"):
        rope.apply_rope(x, positions.to("meta"), "interleaved", TINY)
    with pytest.raises(TypeError, match="args must be a ModelArgs"):
        rope.apply_rope(x, positions, "interleaved", {"qk_rope_head_dim": 8})
    with pytest.raises(ValueError, match="must be even"):
        ModelArgs.tiny(qk_rope_head_dim=7)


def test_kernel_table():
    table = rope.APPLY_ROPE_KERNELS
    assert table.source == "apply_rope" and table.versions == (1, 2)
    assert table.entry(2, layout="half", dtype="bf16") == "apply_rope_half_vec_bf16"
    assert len(table.entry_points()) == 8 and all(name.startswith("apply_rope_") for name in table.entry_points())
    assert {"ROPE_THREADS", "ROPE_UNROLL", "ROPE_PAIRS_MAX_BLOCKS"} <= set(table.defines())


def test_cuda_wrapper_rejects_cpu_tensors_and_batches():
    with pytest.raises(ValueError, match="CUDA device"):
        rope.apply_rope_cuda(torch.randn(4, 8), torch.arange(4), "half", TINY)
    with pytest.raises(ValueError, match=r"takes x \[T, d_R\] or \[T, H, d_R\]"):
        rope.apply_rope_cuda(torch.randn(2, 4, 1, 8), torch.arange(4), "half", TINY)


# --------------------------------------------------------------------------------------- GPU
# Tolerance of the float32 kernel: cos and sin come from a float32 table (each off by <= u = 2^-24
# relatively) and y_a = x_a cos - x_b sin adds three more roundings, so |y - y_ref| <= 5 u (|x_a| + |x_b|)
# <= 10 u max|x|. bf16 output adds one rounding of |y| <= sqrt(2) max|x| at 2^-9: 2^-8 max|x| covers both.

def _vector_applies(layout, dtype, d_rope):
    """Kernel 2 of cuda/apply_rope.cu tiles d_R (interleaved) or d_R/2 (half) with 16-byte chunks."""
    chunk = 4 if dtype == torch.float32 else 8
    return (d_rope if layout == "interleaved" else d_rope // 2) % chunk == 0


def _atol(x):
    return (10 * 2**-24 if x.dtype == torch.float32 else 2**-8) * x.double().abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", rope.APPLY_ROPE_KERNELS.versions)
@pytest.mark.parametrize("layout", rope.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("args,n_tokens,n_heads", [(TINY, 37, 3), (V32, 301, 128), (V32, 5, 1), (V32, 1031, 7)])
def test_apply_rope_cuda(kernel, layout, dtype, args, n_tokens, n_heads):
    """Every kernel, ragged sizes: T H d_R / chunk is not a multiple of the 512 chunks of a block."""
    if kernel == 2 and not _vector_applies(layout, dtype, args.qk_rope_head_dim):
        pytest.skip("d_R (or d_R/2) is not a multiple of the 16-byte chunk")
    torch.manual_seed(7)
    x = torch.randn(n_tokens, n_heads, args.qk_rope_head_dim, device="cuda").to(dtype)
    if n_heads == 1:
        x = x[:, 0].contiguous()
    positions = torch.randint(0, args.max_seq_len, (n_tokens,), device="cuda")
    positions[0] = args.max_seq_len - 1  # the last row of the table
    out = compare.poisoned(x.shape, dtype, "cuda")
    got = rope.apply_rope_cuda(x, positions, layout, args, out=out, kernel=kernel)
    assert got.data_ptr() == out.data_ptr()
    want = rope.apply_rope(x.double(), positions, layout, args)
    compare.assert_close(got, want, atol=_atol(x), name=f"apply_rope_cuda kernel {kernel} {layout} {dtype}")


@pytest.mark.gpu
def test_apply_rope_cuda_bad_inputs():
    x = torch.randn(4, 8, device="cuda")
    with checks.data_checks(True), pytest.raises(ValueError, match="positions must be <= 255"):
        rope.apply_rope_cuda(x, torch.tensor([0, 1, 2, 256], device="cuda"), "half", TINY)
    with pytest.raises(ValueError, match="one device"):
        rope.apply_rope_cuda(x, torch.arange(4), "half", TINY)
    with pytest.raises(ValueError, match="contiguous"):
        rope.apply_rope_cuda(torch.randn(8, 4, device="cuda").t(), torch.arange(4, device="cuda"), "half", TINY)
    with pytest.raises(ValueError, match="kernel must be None or a version"):
        rope.apply_rope_cuda(x, torch.arange(4, device="cuda"), "half", TINY, kernel="vector")
    bf16 = x.bfloat16()  # d_R/2 = 4: not a multiple of 8 bf16
    with pytest.raises(ValueError, match="kernel 2 of cuda/apply_rope.cu .* multiple of 8"):
        rope.apply_rope_cuda(bf16, torch.arange(4, device="cuda"), "half", TINY, kernel=2)
    # not 16-byte aligned: the default falls back to kernel 1, an explicit kernel 2 refuses
    shifted = torch.randn(4 * 8 + 1, device="cuda")[1:].view(4, 8)
    positions = torch.arange(4, device="cuda")
    with pytest.raises(ValueError, match="16-byte aligned"):
        rope.apply_rope_cuda(shifted, positions, "interleaved", TINY, kernel=2)
    assert torch.equal(rope.apply_rope_cuda(shifted, positions, "interleaved", TINY),
                       rope.apply_rope_cuda(shifted, positions, "interleaved", TINY, kernel=1))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", rope.APPLY_ROPE_KERNELS.versions)
@pytest.mark.parametrize("layout", rope.LAYOUTS)
def test_apply_rope_cuda_wild_positions_with_data_checks_off(layout, kernel):
    """Data checks off (the default): positions far outside the table are not read back; the kernels
    write NaN for those tokens and read nothing outside the table (compute-sanitizer:
    benchmarks/sanitize_mla.py), and rotate every other token right."""
    x = torch.randn(7, 2, 8, device="cuda")
    positions = torch.tensor([0, 256, 5, -3, 255, 2**62, -(2**62)], device="cuda")
    with checks.data_checks(False):
        out = rope.apply_rope_cuda(x, positions, layout, TINY, kernel=kernel)
    assert out[[1, 3, 5, 6]].isnan().all() and not out[[0, 2, 4]].isnan().any()
    ok = torch.tensor([0, 2, 4], device="cuda")
    compare.assert_close(out[ok], rope.apply_rope(x[ok].double(), positions[ok], layout, TINY), atol=_atol(x))
