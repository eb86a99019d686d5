"""MLA: formulas (1)-(4) and the query path, the absorption identity, the module (MHA mode = MQA
mode = the official code, cache prefill + decode = one pass), bad inputs, and the kernels of
cuda/kv_compress.cu and cuda/latent_scores.cu (every version of their tables)."""
import pytest
import torch
import torch.nn.functional as F

from dsa_tutorial import checks, compare, cost, mla, rope
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.norm import RMS_NORM_KERNELS, rms_norm, rms_norm_cuda

TINY = ModelArgs.tiny()
V32 = ModelArgs()


def make_mla(args=TINY, dtype=torch.float64, seed=0, device="cpu"):
    torch.manual_seed(seed)
    module = mla.MLA(args, dtype=dtype, device=device)
    with torch.no_grad():  # norm weights away from 1, so a forgotten weight shows
        module.q_norm.weight.normal_(1.0, 0.2)
        module.kv_norm.weight.normal_(1.0, 0.2)
    return module


def official_forward(m: mla.MLA, x, start_pos, kv_cache, pe_cache, mqa: bool):
    """A transcription of the official MLA.forward (bf16/FP8 simulation and the indexer left out),
    batch-first; kv_cache / pe_cache are preallocated [B, max_len, d_c] / [B, max_len, d_R]."""
    a = m.args
    bsz, seqlen, _ = x.size()
    end_pos = start_pos + seqlen
    freqs_cis = rope.precompute_freqs_cis(a)[start_pos:end_pos]

    def apply_rotary_emb(t):  # interleaved, t [B, T, H, d]
        c = torch.view_as_complex(t.double().reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(c * freqs_cis.view(1, seqlen, 1, -1)).flatten(3).to(t.dtype)

    def norm(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + a.norm_eps) * w

    qr = norm(F.linear(x, m.wq_a.weight), m.q_norm.weight)
    q = F.linear(qr, m.wq_b.weight).view(bsz, seqlen, a.n_heads, a.qk_head_dim)
    q_nope, q_pe = torch.split(q, [a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
    q_pe = apply_rotary_emb(q_pe)
    kv = F.linear(x, m.wkv_a.weight)
    kv, k_pe = torch.split(kv, [a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
    kv = norm(kv, m.kv_norm.weight)
    k_pe = apply_rotary_emb(k_pe.unsqueeze(2))
    kv_cache[:bsz, start_pos:end_pos] = kv
    pe_cache[:bsz, start_pos:end_pos] = k_pe.squeeze(2)
    mask = torch.full((seqlen, end_pos), float("-inf"), dtype=x.dtype).triu_(start_pos + 1)
    if not mqa:  # MHA prefill (needs start_pos == 0 in the official code)
        q = torch.cat([q_nope, q_pe], dim=-1)
        kv = F.linear(kv, m.wkv_b.weight).view(bsz, seqlen, a.n_heads, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v = torch.split(kv, [a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, a.n_heads, -1)], dim=-1)
        scores = torch.einsum("bshd,bthd->bsht", q, k).mul_(a.softmax_scale)
        scores += mask.unsqueeze(1)
        x = torch.einsum("bsht,bthd->bshd", scores.softmax(dim=-1), v)
    else:  # MQA decode
        wkv_b = m.wkv_b.weight.view(a.n_heads, -1, a.kv_lora_rank)
        q_nope = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :a.qk_nope_head_dim])
        scores = (torch.einsum("bshc,btc->bsht", q_nope, kv_cache[:bsz, :end_pos])
                  + torch.einsum("bshr,btr->bsht", q_pe, pe_cache[:bsz, :end_pos])) * a.softmax_scale
        scores += mask.unsqueeze(1)
        x = torch.einsum("bsht,btc->bshc", scores.softmax(dim=-1), kv_cache[:bsz, :end_pos])
        x = torch.einsum("bshc,hdc->bshd", x, wkv_b[:, -a.v_head_dim:])
    return F.linear(x.flatten(2), m.wo.weight)


def rel_err(out, ref) -> float:
    return compare.compare(out, ref).max_rel


# ------------------------------------------------------------------------------- the formulas

def test_shapes_and_parameter_names():
    m = make_mla()
    assert set(m.state_dict()) == {f"{n}.weight" for n in ("wq_a", "q_norm", "wq_b", "wkv_a", "kv_norm", "wkv_b", "wo")}
    assert m.wkv_a.weight.shape == (16 + 8, 64) and m.wkv_b.weight.shape == (4 * (16 + 16), 16)
    h = torch.randn(2, 5, 64, dtype=torch.float64)
    positions = torch.arange(5)
    c_q = m.query_latent(h)
    q_nope, q_rope = m.queries(c_q, positions)
    c_kv, k_rope = m.latents(h, positions)
    q_abs = m.absorb_query(q_nope)
    assert c_q.shape == (2, 5, 32) and q_nope.shape == (2, 5, 4, 16) and q_rope.shape == (2, 5, 4, 8)
    assert c_kv.shape == (2, 5, 16) and k_rope.shape == (2, 5, 8) and q_abs.shape == (2, 5, 4, 16)
    assert m.latent_scores(q_abs, q_rope, c_kv, k_rope).shape == (2, 5, 4, 5)
    assert m.latent_output(torch.randn(2, 5, 4, 16, dtype=torch.float64)).shape == (2, 5, 64)


def test_compression_is_rmsnorm_of_the_first_d_c_outputs():
    m = make_mla()
    h = torch.randn(1, 6, 64, dtype=torch.float64)
    c_kv, k_pe = mla.kv_compress(h, m.wkv_a.weight, m.kv_norm.weight, TINY)
    kv = h @ m.wkv_a.weight.T
    assert torch.equal(k_pe, kv[..., 16:])
    # RMSNorm: c_kv / weight has unit root-mean-square per token
    rms = (c_kv / m.kv_norm.weight).pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-5)  # eps = 1e-6 against mean(c^2) = O(1)
    assert torch.allclose(c_kv, rms_norm(kv[..., :16], m.kv_norm.weight, TINY.norm_eps))


def test_rotary_key_is_shared_by_all_heads():
    m = make_mla()
    h = torch.randn(1, 7, 64, dtype=torch.float64)
    positions = torch.arange(3, 10)
    c_kv, k_rope = m.latents(h, positions)
    k_nope, v = mla.kv_decompress(c_kv, m.wkv_b.weight, TINY)
    k = mla.final_key(k_nope, k_rope)
    assert k.shape == (1, 7, 4, 24) and v.shape == (1, 7, 4, 16)
    assert torch.equal(k[..., :16], k_nope)
    for head in range(4):
        assert torch.equal(k[:, :, head, 16:], k_rope)
    _, k_pe = mla.kv_compress(h, m.wkv_a.weight, m.kv_norm.weight, TINY)
    assert torch.equal(k_rope, rope.apply_rope(k_pe[0], positions, "interleaved", TINY)[None])


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("args", [TINY, ModelArgs(n_heads=8)], ids=["tiny", "v32-head-dims-8-heads"])
def test_absorption_identity(dtype, bound, args):
    """q^C_i . (W^UK_i c^KV) = (W^UK_i^T q^C_i) . c^KV, and W^UV applied after the weighted sum."""
    gen = torch.Generator().manual_seed(1)
    n_h, d_h, d_v, d_c = args.n_heads, args.qk_nope_head_dim, args.v_head_dim, args.kv_lora_rank
    wkv_b = (torch.randn(n_h * (d_h + d_v), d_c, generator=gen, dtype=torch.float64) * d_c**-0.5).to(dtype)
    c_kv = torch.randn(1, 9, d_c, generator=gen, dtype=torch.float64).to(dtype)
    q_nope = torch.randn(1, 2, n_h, d_h, generator=gen, dtype=torch.float64).to(dtype)
    k_rope = torch.randn(1, 9, args.qk_rope_head_dim, generator=gen, dtype=torch.float64).to(dtype)
    q_rope = torch.randn(1, 2, n_h, args.qk_rope_head_dim, generator=gen, dtype=torch.float64).to(dtype)
    k_nope, v = mla.kv_decompress(c_kv, wkv_b, args)
    explicit = mla.explicit_scores(q_nope, q_rope, mla.final_key(k_nope, k_rope), args)
    absorbed = mla.latent_scores(mla.absorb_query(q_nope, wkv_b, args), q_rope, c_kv, k_rope, args)
    assert rel_err(absorbed, explicit) < bound
    p = torch.softmax(explicit, dim=-1)
    wo = torch.eye(n_h * d_v, dtype=dtype)[: args.dim] if args.dim <= n_h * d_v else None
    o_explicit = torch.einsum("bths,bshv->bthv", p, v)  # values first, then the weighted sum
    o_latent = torch.einsum("bths,bsc->bthc", p, c_kv)  # the weighted sum of latents, then W^UV
    w_uv = wkv_b.view(n_h, d_h + d_v, d_c)[:, d_h:]
    assert rel_err(torch.einsum("bthc,hvc->bthv", o_latent, w_uv), o_explicit) < bound
    if wo is not None:
        out = mla.latent_output(o_latent, wkv_b, wo, args)
        assert rel_err(out, o_explicit.flatten(2)[..., : args.dim]) < bound


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_mha_mode_equals_mqa_mode_and_official_code(dtype, bound):
    m = make_mla(dtype=dtype)
    h = torch.randn(3, 12, 64, dtype=dtype)
    mqa, mha = m(h, mode="mqa"), m(h, mode="mha")
    assert mqa.shape == (3, 12, 64) and mqa.dtype == dtype
    assert 0.1 < mqa.std().item() < 10  # O(1) activations: the tolerances mean something
    assert rel_err(mqa, mha) < bound
    caches = (torch.zeros(3, 12, 16, dtype=dtype), torch.zeros(3, 12, 8, dtype=dtype))
    assert rel_err(mha, official_forward(m, h, 0, *caches, mqa=False)) < bound
    assert rel_err(mqa, official_forward(m, h, 0, *caches, mqa=True)) < bound


@pytest.mark.parametrize("mode", ["mqa", "mha"])
def test_cache_prefill_then_decode(mode):
    m = make_mla()
    h = torch.randn(2, 10, 64, dtype=torch.float64)
    full = m(h, mode=mode)
    cache = mla.LatentCache(TINY, batch_size=2, dtype=torch.float64)
    outs = [m(h[:, :6], cache=cache, mode=mode)]
    for t in range(6, 10):  # one token at a time
        outs.append(m(h[:, t:t + 1], cache=cache, mode=mode))
    assert len(cache) == 10 and cache.kv.shape == (2, 10, TINY.latent_dim)
    assert torch.allclose(torch.cat(outs, dim=1), full, rtol=0, atol=1e-12)
    # the cache holds exactly [c^KV | k^R] of every token, nothing else
    c_kv, k_rope = m.latents(h, torch.arange(10))
    assert torch.allclose(cache.c_kv, c_kv, rtol=0, atol=1e-14) and torch.allclose(cache.k_rope, k_rope, rtol=0, atol=1e-14)
    assert cache.nbytes() == 2 * 10 * TINY.latent_dim * 8
    # and matches the official decode path step by step
    kv_cache, pe_cache = torch.zeros(2, 10, 16, dtype=torch.float64), torch.zeros(2, 10, 8, dtype=torch.float64)
    official = [official_forward(m, h[:, :6], 0, kv_cache, pe_cache, mqa=True)]
    official += [official_forward(m, h[:, t:t + 1], t, kv_cache, pe_cache, mqa=True) for t in range(6, 10)]
    assert torch.allclose(torch.cat(official, dim=1), full, rtol=0, atol=1e-12)


def test_causal_and_explicit_positions():
    m = make_mla()
    h = torch.randn(1, 8, 64, dtype=torch.float64)
    changed = h.clone()
    changed[:, 5:] = torch.randn(1, 3, 64, dtype=torch.float64)
    assert torch.equal(m(h)[:, :5], m(changed)[:, :5])  # the future does not leak back
    # positions shift every rotary angle by the same amount: scores depend on m - n only
    shifted = m(h, positions=torch.arange(8) + 100)
    assert torch.allclose(shifted, m(h), atol=1e-12)
    assert not torch.allclose(m(h, positions=torch.arange(8).flip(0)), m(h), atol=1e-3)


def test_cache_bytes_against_mha():
    table = cost.cache_bytes_per_token(V32)
    assert table["MLA latent c^KV + k^R (bf16)"] == 1152 and table["MHA keys+values (bf16)"] == 81920
    cache = mla.LatentCache(V32, batch_size=1, dtype=torch.bfloat16)
    cache.append(torch.randn(1, 3, 512).bfloat16(), torch.randn(1, 3, 64).bfloat16())
    assert cache.nbytes() == 3 * table["MLA latent c^KV + k^R (bf16)"]


def test_bad_inputs():
    m = make_mla(dtype=torch.float32)
    h = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match=r"h must have 3 dims \[B, T, 64\]"):
        m(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"h must have shape \[B, T, 64\]"):
        m(torch.randn(1, 4, 65))
    with pytest.raises(TypeError, match="h must be float32, got float64"):
        m(h.double())
    with pytest.raises(ValueError, match="h must be on meta"):
        mla.MLA(TINY, device="meta")(h)
    with pytest.raises(ValueError, match="mode must be"):
        m(h, mode="gqa")
    with pytest.raises(ValueError, match="positions must be <= 255"):
        m(h, positions=torch.tensor([0, 1, 2, 256]))
    with pytest.raises(ValueError, match="positions has T = 3"):
        m(h, positions=torch.arange(3))
    cache = mla.LatentCache(TINY, batch_size=2)
    with pytest.raises(ValueError, match="cache holds batch 2"):
        m(h, cache=cache)
    with pytest.raises(ValueError, match="c_kv has B = 1"):
        cache.append(torch.randn(1, 3, 16), torch.randn(1, 3, 8))
    with pytest.raises(TypeError, match="k_rope must be float32"):
        cache.append(torch.randn(2, 3, 16), torch.randn(2, 3, 8).double())
    with pytest.raises(ValueError, match="more than max_seq_len = 256"):
        cache.append(torch.randn(2, 257, 16), torch.randn(2, 257, 8))
    with pytest.raises(ValueError, match=r"wkv_a has L = 23 .* but L = 24 elsewhere"):
        mla.kv_compress(h, torch.randn(23, 64), torch.ones(16), TINY)
    with pytest.raises(ValueError, match="q_rope has B = 2"):
        mla.latent_scores(torch.randn(1, 1, 4, 16), torch.randn(2, 1, 4, 8), torch.randn(1, 5, 16),
                          torch.randn(1, 5, 8), TINY)
    with pytest.raises(TypeError, match="c_kv must be float32"):
        mla.latent_scores(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 8), torch.randn(1, 5, 16).double(),
                          torch.randn(1, 5, 8), TINY)
    with pytest.raises(ValueError, match="k_rope has S = 4"):
        mla.latent_scores(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 8), torch.randn(1, 5, 16),
                          torch.randn(1, 4, 8), TINY)
    with pytest.raises(ValueError, match="one device"):
        mla.latent_scores(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 8), torch.randn(1, 5, 16),
                          torch.randn(1, 5, 8, device="meta"), TINY)
    with pytest.raises(TypeError, match="args must be a ModelArgs"):
        mla.kv_decompress(torch.randn(1, 5, 16), torch.randn(128, 16), None)
    with pytest.raises(TypeError, match="MLA parameters must be float32 or float64"):
        mla.MLA(TINY, dtype=torch.bfloat16)


def test_cuda_wrappers_reject_cpu_tensors():
    with pytest.raises(ValueError, match="kv must be on a CUDA device"):
        mla.kv_compress_cuda(torch.randn(3, 24), torch.ones(16), TINY)
    with pytest.raises(ValueError, match="q_abs must be on a CUDA device"):
        mla.latent_scores_cuda(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 8), torch.randn(1, 5, 24), TINY)


def test_kernel_tables():
    """One table per .cu file, versions as the chapters number them, entry points named after the reference."""
    assert mla.KV_COMPRESS_KERNELS.source == "kv_compress" and mla.KV_COMPRESS_KERNELS.versions == (1, 2)
    assert mla.KV_COMPRESS_KERNELS.entry(2, rope="_rope", dtype="bf16") == "kv_compress_rope_vec_bf16"
    assert mla.LATENT_SCORES_KERNELS.source == "latent_scores" and mla.LATENT_SCORES_KERNELS.versions == (1, 2, 3, 4)
    assert all(name.startswith("kv_compress") for name in mla.KV_COMPRESS_KERNELS.entry_points())
    assert all(name.startswith("latent_scores") for name in mla.LATENT_SCORES_KERNELS.entry_points())
    assert "kernel 4  latent_scores_pipelined_bf16" in mla.LATENT_SCORES_KERNELS.describe()
    defines = mla.KV_COMPRESS_KERNELS.defines()
    assert defines["COMPRESS_THREADS"] == 32 * defines["COMPRESS_WARPS"]
    with pytest.raises(ValueError, match="kernel must be None or a version of cuda/latent_scores.cu"):
        mla.LATENT_SCORES_KERNELS["pipelined"]


def test_pipelined_shared_memory_fits_an_h200():
    """The query tile of V3.2 (128 x 576 bf16) plus 5 cache stages: within sm_90's 227 KiB per block."""
    assert mla._pipelined_smem_bytes(V32) == 128 * 576 * 2 + 5 * 128 * 64 * 2 == 229376 <= 227 * 1024
    assert mla._pipelined_smem_bytes(MMA_ARGS) == 128 * 64 * 2 + 5 * 128 * 64 * 2  # width 48 padded to 64


def test_latent_scores_kernels_refuse_only_by_their_own_limits():
    """Review fix: the 65535 limit of a grid dimension applied to kernel 4, whose grid is 1-D, and
    kernel 3's row blocks were counted in tiles of 64 rows instead of its 128. Each kernel's own
    limits now, from the table's #defines; and what each refuses, with the reason."""
    def why_not(dtype, batch, rows, n_keys=100, args=V32, aligned=True, smem=227 * 1024):
        return mla._latent_scores_why_not(dtype, batch, rows, n_keys, args, aligned, smem)

    bf16, f32 = torch.bfloat16, torch.float32
    assert why_not(bf16, 65536, 128)[4] is None  # a 1-D grid: any batch
    assert "65535" in why_not(bf16, 65536, 128)[3] and "65535" in why_not(f32, 65536, 128)[2]
    assert why_not(bf16, 1, 65535 * 128)[3] is None  # 65535 row blocks of 128 rows
    assert "65535" in why_not(bf16, 1, 65535 * 128 + 1)[3]
    assert why_not(f32, 1, 65535 * 64)[2] is None and "65535" in why_not(f32, 1, 65535 * 64 + 1)[2]
    assert why_not(f32, 1, 65535)[1] is None and "65535" in why_not(f32, 1, 65536)[1]
    # kernel 4 counts its 128 x 128 tiles in int32: 2^15 x 32 x 1024 = 2^30 fit, twice as many do not
    assert why_not(bf16, 2**15, 2**12, 2**17)[4] is None and "int32" in why_not(bf16, 2**16, 2**12, 2**17)[4]
    # dtype, shapes, alignment, shared memory: the reasons a chooser reads
    assert "float32" in why_not(bf16, 1, 128)[1] and "bfloat16" in why_not(f32, 1, 128)[4]
    assert "multiples of 16" in why_not(bf16, 1, 128, args=TINY)[3]
    assert "16-byte aligned" in why_not(bf16, 1, 128, aligned=False)[4]
    assert "shared memory" in why_not(bf16, 1, 128, smem=100 * 1024)[4]
    choose = mla.LATENT_SCORES_KERNELS.choose
    assert choose(None, why_not(f32, 2, 128)).version == 2
    assert choose(None, why_not(bf16, 2, 128)).version == 4
    assert choose(None, why_not(bf16, 2, 128, smem=100 * 1024)).version == 3  # the query tile does not fit
    with pytest.raises(ValueError, match="kernel 3 of cuda/latent_scores.cu .* is built for bfloat16"):
        choose(3, why_not(f32, 2, 128))


# --------------------------------------------------------------------------------------- GPU
U32 = 2.0**-24  # float32 unit roundoff
MMA_ARGS = ModelArgs.tiny(kv_lora_rank=32, qk_rope_head_dim=16)  # latent 48: the last 32-dim step is half full


def _compress_reference(kv, weight, args, positions):
    """[RMSNorm(c) | k_pe or RoPE(k_pe)] in float64, from the references."""
    kv64 = kv.double()
    c_kv = rms_norm(kv64[:, : args.kv_lora_rank], weight.double(), args.norm_eps)
    k_rope = kv64[:, args.kv_lora_rank:]
    if positions is not None:
        k_rope = rope.apply_rope(k_rope, positions, "interleaved", args)
    return torch.cat([c_kv, k_rope], dim=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", mla.KV_COMPRESS_KERNELS.versions)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_rope", [False, True])
@pytest.mark.parametrize("args,n_tokens", [(TINY, 29), (V32, 1037), (V32, 3)])
def test_kv_compress_cuda(kernel, dtype, with_rope, args, n_tokens):
    """Tolerance: float32 sums 512 squares (relative error <= 512 u of the sum, halved by the rsqrt)
    and scales each value with 3 more roundings: 300 u relative covers it. bf16 output: one rounding
    at 2^-9 relative of |out| (<= 2^-9 max|ref|) on top. Every kernel; kernel 2 has V3.2's dims
    built in. T = 1037 and 3 leave the last block of 8 warps partly empty."""
    if kernel == 2 and args != V32:
        pytest.skip("kernel 2 is compiled for d_c = 512, d_R = 64")
    torch.manual_seed(8)
    kv = (torch.randn(n_tokens, args.latent_dim, device="cuda") * 3).to(dtype)
    weight = torch.randn(args.kv_lora_rank, device="cuda") * 0.2 + 1
    positions = torch.randint(0, args.max_seq_len, (n_tokens,), device="cuda") if with_rope else None
    if with_rope:
        positions[0] = args.max_seq_len - 1  # the last row of the table
    out = compare.poisoned(kv.shape, dtype, "cuda")
    got = mla.kv_compress_cuda(kv, weight, args, positions, out=out, kernel=kernel)
    assert got.data_ptr() == out.data_ptr()
    want = _compress_reference(kv, weight, args, positions)
    amax = want.abs().max().item()
    atol = (8 * U32 if dtype == torch.float32 else 2**-8) * amax
    compare.assert_close(got, want, atol=atol, rtol=300 * U32, name=f"kv_compress_cuda kernel {kernel} {dtype}")


def _scores_inputs(args, batch, n_q, n_keys, dtype, seed=9):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n_h, d_c, d_r = args.n_heads, args.kv_lora_rank, args.qk_rope_head_dim
    q_abs = torch.randn(batch, n_q, n_h, d_c, device="cuda", generator=gen).to(dtype)
    q_rope = torch.randn(batch, n_q, n_h, d_r, device="cuda", generator=gen).to(dtype)
    latent = torch.randn(batch, n_keys, d_c + d_r, device="cuda", generator=gen).to(dtype)
    return q_abs, q_rope, latent


def _scores_reference(q_abs, q_rope, latent, args):
    d_c = args.kv_lora_rank
    q_abs, q_rope, latent = q_abs.double(), q_rope.double(), latent.double()
    ref = mla.latent_scores(q_abs, q_rope, latent[..., :d_c], latent[..., d_c:], args)
    # Higham's bound for a float32 dot product of n terms: gamma_n sum |q_d| |latent_d|
    q = torch.cat([q_abs, q_rope], dim=-1).abs()
    bound = torch.einsum("bthd,bsd->bths", q, latent.abs()) * args.softmax_scale
    return ref, bound.max().item()


def _scores_atol(args, dot_bound, tensor_cores):
    """gamma_n sum |q_d latent_d| with n = d_c + d_R + 1, doubled for the tensor cores (their adder may truncate)."""
    n = args.latent_dim + 1
    return n * U32 / (1 - n * U32) * (2 if tensor_cores else 1) * dot_bound


def _dtype_of(kernel):
    return torch.bfloat16 if "bf16" in mla.LATENT_SCORES_KERNELS[kernel].entry else torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", mla.LATENT_SCORES_KERNELS.versions)
@pytest.mark.parametrize("args,batch,n_q,n_keys", [
    (TINY, 3, 1, 77), (TINY, 2, 5, 130), (MMA_ARGS, 3, 1, 77), (MMA_ARGS, 2, 7, 65),
    (MMA_ARGS, 45, 1, 700), (MMA_ARGS, 2, 33, 131),
    (V32, 2, 1, 200), (V32, 3, 2, 63), (V32, 3, 1, 1000),
], ids=["tiny-decode", "tiny-T5", "mma-dims", "mma-dims-T7", "mma-dims-many-tiles", "mma-dims-2-row-blocks",
        "v32-decode", "v32-T2", "v32-8-key-tiles"])
def test_latent_scores_cuda(kernel, args, batch, n_q, n_keys):
    """Tolerance: |error| <= gamma_n sum_d |q_d latent_d| * scale with n = d_c + d_R + 1 (Higham), for
    float32 accumulation of exact products: bf16 products are exact in float32, so the same bound
    holds for the tensor-core kernels (doubled there: the tensor-core adder may truncate instead of round).
    "many-tiles": 45 x 6 = 270 tiles of 128 keys over at most 132 persistent blocks, so block ranges
    hold several tiles and cross batch entries (the query tile is reloaded); "2-row-blocks": 132 rows,
    a second, almost empty row block; odd S: the scalar store path of the last key."""
    dtype = _dtype_of(kernel)
    tensor_cores = dtype == torch.bfloat16
    if tensor_cores and (args.kv_lora_rank % 16 or args.qk_rope_head_dim % 16):
        pytest.skip("the tensor-core kernels need d_c and d_R multiples of 16")
    if not tensor_cores and n_keys * batch > 5000:
        pytest.skip("the CUDA-core kernels have no persistent schedule to exercise")
    q_abs, q_rope, latent = _scores_inputs(args, batch, n_q, n_keys, dtype)
    out = compare.poisoned((batch, n_q, args.n_heads, n_keys), torch.float32, "cuda")
    got = mla.latent_scores_cuda(q_abs, q_rope, latent, args, out=out, kernel=kernel)
    assert got.data_ptr() == out.data_ptr()
    want, dot_bound = _scores_reference(q_abs, q_rope, latent, args)
    compare.assert_close(got, want, atol=_scores_atol(args, dot_bound, tensor_cores),
                         name=f"latent_scores_cuda kernel {kernel}")


@pytest.mark.gpu
def test_latent_scores_cuda_default_kernels():
    """kernel=None: kernel 2 for float32 and kernel 4 for bf16 (the H200 fits its shared memory), bit
    for bit; the two tensor-core kernels differ only in the order of their float32 additions."""
    for dtype, default in ((torch.float32, 2), (torch.bfloat16, 4)):
        inputs = _scores_inputs(V32, 2, 1, 300, dtype, seed=10)
        got = mla.latent_scores_cuda(*inputs, V32)
        assert torch.equal(got, mla.latent_scores_cuda(*inputs, V32, kernel=default))
    mma = mla.latent_scores_cuda(*inputs, V32, kernel=3)
    _, dot_bound = _scores_reference(*inputs, V32)
    compare.assert_close(got, mma, atol=2 * _scores_atol(V32, dot_bound, True), name="kernel 4 vs kernel 3")


@pytest.mark.gpu
def test_latent_scores_cuda_grid_limits_are_each_kernels_own():
    """Review fix, on the GPU: kernel 4 (a 1-D grid) runs 65536 batch entries, which the old check
    refused; kernel 3 runs 65535 * 64 + 64 query rows (32768 row blocks of 128), which it refused too.
    Kernel 3's real limit, 65535 batch entries in grid z, still refuses the first."""
    q_abs, q_rope, latent = _scores_inputs(MMA_ARGS, 65536, 1, 3, torch.bfloat16)
    out = compare.poisoned((65536, 1, MMA_ARGS.n_heads, 3), torch.float32, "cuda")
    got = mla.latent_scores_cuda(q_abs, q_rope, latent, MMA_ARGS, out=out, kernel=4)
    want, dot_bound = _scores_reference(q_abs, q_rope, latent, MMA_ARGS)
    compare.assert_close(got, want, atol=_scores_atol(MMA_ARGS, dot_bound, True), name="kernel 4, B = 65536")
    with pytest.raises(ValueError, match="kernel 3 .* 65535"):
        mla.latent_scores_cuda(q_abs, q_rope, latent, MMA_ARGS, kernel=3)
    n_q = (65535 * 64 + 64) // MMA_ARGS.n_heads  # rows = T n_h = 4194304
    q_abs, q_rope, latent = _scores_inputs(MMA_ARGS, 1, n_q, 3, torch.bfloat16, seed=11)
    out = compare.poisoned((1, n_q, MMA_ARGS.n_heads, 3), torch.float32, "cuda")
    got = mla.latent_scores_cuda(q_abs, q_rope, latent, MMA_ARGS, out=out, kernel=3)
    want, dot_bound = _scores_reference(q_abs, q_rope, latent, MMA_ARGS)
    compare.assert_close(got, want, atol=_scores_atol(MMA_ARGS, dot_bound, True), name="kernel 3, 2^22 rows")


@pytest.mark.gpu
def test_latent_scores_cuda_on_a_real_cache():
    """End to end: the module's latent cache, its absorbed queries, the kernel, the module's scores."""
    m = make_mla(dtype=torch.float32, device="cuda")
    h = torch.randn(2, 45, 64, device="cuda")
    cache = mla.LatentCache(TINY, batch_size=2, device="cuda")
    m(h[:, :44], cache=cache)
    positions = torch.tensor([44], device="cuda")
    q_nope, q_rope = m.queries(m.query_latent(h[:, 44:]), positions)
    c_kv, k_rope = m.latents(h[:, 44:], positions)
    cache.append(c_kv, k_rope)
    q_abs = m.absorb_query(q_nope).contiguous()
    got = mla.latent_scores_cuda(q_abs, q_rope.contiguous(), cache.kv, TINY)
    want = m.latent_scores(q_abs, q_rope, cache.c_kv, cache.k_rope)
    compare.assert_close(got, want, atol=1e-4, rtol=1e-4, name="latent scores on the cache")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", mla.KV_COMPRESS_KERNELS.versions)
def test_kv_compress_cuda_wild_positions_with_data_checks_off(kernel):
    """Data checks off (the default): positions far outside the table are not read back, and the
    kernels write NaN for those tokens' k^R, read nothing outside the table (compute-sanitizer:
    benchmarks/sanitize_mla.py), and leave every other value right. With data checks on they are refused."""
    args = V32 if kernel == 2 else TINY
    kv = torch.randn(6, args.latent_dim, device="cuda")
    weight = torch.rand(args.kv_lora_rank, device="cuda") + 0.5
    positions = torch.tensor([3, args.max_seq_len, 7, -1, 2**62, -(2**62)], device="cuda")
    with checks.data_checks(False):
        out = mla.kv_compress_cuda(kv, weight, args, positions, kernel=kernel)
    d_c = args.kv_lora_rank
    assert out[[1, 3, 4, 5], d_c:].isnan().all()
    ok = torch.tensor([0, 2], device="cuda")
    compare.assert_close(out[ok], _compress_reference(kv[ok], weight, args, positions[ok]), atol=1e-5, rtol=1e-4)
    compare.assert_close(out[:, :d_c], _compress_reference(kv, weight, args, None)[:, :d_c], atol=1e-5, rtol=1e-4)
    with checks.data_checks(True), pytest.raises(ValueError, match="positions must be >= 0"):
        mla.kv_compress_cuda(kv, weight, args, positions, kernel=kernel)


@pytest.mark.gpu
def test_latent_scores_cuda_bad_inputs():
    with pytest.raises(ValueError, match="kernel 3 .* built for bfloat16"):
        mla.latent_scores_cuda(*_scores_inputs(MMA_ARGS, 1, 1, 9, torch.float32), MMA_ARGS, kernel=3)
    for kernel in (3, 4):
        with pytest.raises(ValueError, match="multiples of 16"):
            mla.latent_scores_cuda(*_scores_inputs(TINY, 1, 1, 9, torch.bfloat16), TINY, kernel=kernel)
    q_abs, q_rope, latent = _scores_inputs(TINY, 1, 1, 9, torch.float32)
    with pytest.raises(ValueError, match="latent has L = 23"):
        mla.latent_scores_cuda(q_abs, q_rope, latent[..., :23].contiguous(), TINY)
    with pytest.raises(ValueError, match="one device|CUDA device"):
        mla.latent_scores_cuda(q_abs, q_rope, latent.cpu(), TINY)
    with pytest.raises(ValueError, match="contiguous"):
        mla.latent_scores_cuda(q_abs, q_rope, latent.transpose(1, 2).contiguous().transpose(1, 2), TINY)
    with pytest.raises(ValueError, match="kernel must be None or a version"):
        mla.latent_scores_cuda(q_abs, q_rope, latent, TINY, kernel="tiled")
    bf = [t.bfloat16() for t in _scores_inputs(MMA_ARGS, 1, 1, 9, torch.float32)]
    shifted = torch.empty(bf[2].numel() + 1, dtype=torch.bfloat16, device="cuda")[1:].view_as(bf[2])
    shifted.copy_(bf[2])
    for kernel in (3, 4):
        with pytest.raises(ValueError, match="16-byte aligned"):
            mla.latent_scores_cuda(bf[0], bf[1], shifted, MMA_ARGS, kernel=kernel)
    # an output that is 4- but not 8-byte aligned: kernel 4's scalar store path
    q_abs, q_rope, latent = _scores_inputs(MMA_ARGS, 2, 1, 130, torch.bfloat16)
    out = torch.full((2 * 4 * 130 + 1,), float("nan"), device="cuda")[1:].view(2, 1, 4, 130)
    got = mla.latent_scores_cuda(q_abs, q_rope, latent, MMA_ARGS, out=out, kernel=4)
    want, dot_bound = _scores_reference(q_abs, q_rope, latent, MMA_ARGS)
    compare.assert_close(got, want, atol=_scores_atol(MMA_ARGS, dot_bound, True), name="kernel 4, odd output")


@pytest.mark.gpu
def test_kv_compress_cuda_kernel_choice():
    """Kernel 2 needs V3.2's dims and 16-byte alignment; the default falls back to kernel 1."""
    kv = torch.randn(2 * V32.latent_dim + 2, device="cuda")[2:].view(2, V32.latent_dim)  # 8-byte aligned only
    weight = torch.ones(V32.kv_lora_rank, device="cuda")
    with pytest.raises(ValueError, match="kernel 2 of cuda/kv_compress.cu .* 16-byte aligned"):
        mla.kv_compress_cuda(kv, weight, V32, kernel=2)
    with pytest.raises(ValueError, match=r"compiled for \(d_c, d_R\) = \(512, 64\), got \(16, 8\)"):
        mla.kv_compress_cuda(torch.randn(3, TINY.latent_dim, device="cuda"), torch.ones(16, device="cuda"), TINY,
                             kernel=2)
    with pytest.raises(ValueError, match="kernel must be None or a version"):
        mla.kv_compress_cuda(kv, weight, V32, kernel="vector")
    got = mla.kv_compress_cuda(kv, weight, V32)  # falls back to kernel 1
    assert torch.equal(got, mla.kv_compress_cuda(kv, weight, V32, kernel=1))


# ------------------------------------------------------------------- the RMSNorm of formula (1)
# cuda/rms_norm.cu's table, every version (tests/test_foundation.py checks the default call).

@pytest.mark.gpu
@pytest.mark.parametrize("kernel", RMS_NORM_KERNELS.versions)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows,dim", [(1, 8), (7, 129), (333, 512), (130, 7168), (2, 8192), (3, 8200)])
def test_rms_norm_cuda_every_kernel(kernel, dtype, n_rows, dim):
    """float32: the sum of squares reordered, ~1e-6 relative; bf16: the output's own rounding (2^-9
    relative, 2^-8 of a value near 2 at most). Kernel 2 runs bf16 rows of a multiple of 8, up to 8192."""
    most = RMS_NORM_KERNELS.defines()["RMS_THREADS"] * 8 * RMS_NORM_KERNELS.defines()["RMS_VECS"]
    if kernel == 2 and (dtype != torch.bfloat16 or dim % 8 or dim > most):
        with pytest.raises(ValueError, match="kernel 2 of cuda/rms_norm.cu"):
            rms_norm_cuda(torch.randn(n_rows, dim, device="cuda").to(dtype), torch.ones(dim, device="cuda").to(dtype),
                          kernel=kernel)
        return
    x = torch.randn(n_rows, dim, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(dim, device="cuda")).to(dtype)
    out = compare.poisoned(x.shape, dtype, "cuda")
    assert rms_norm_cuda(x, w, 1e-6, out=out, kernel=kernel).data_ptr() == out.data_ptr()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=8e-3)
    compare.assert_close(out, rms_norm(x.double(), w.double(), 1e-6), **tol, name=f"rms_norm_cuda kernel {kernel}")
