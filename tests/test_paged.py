"""paged: the fused FP8 key cache, the schedule metadata and the paged logits
(reference and cuda/fp8_paged_mqa_logits.cu)."""
import pytest
import torch

from dsa_tutorial import compare, fp8, kernels, paged
from dsa_tutorial.hadamard import rotate_activation
from test_fp8 import cu_defines, pretend_no_wgmma, skip_unless_available


def make_batch(context_lens, next_n=1, H=64, D=128, extra_blocks=3, max_blocks=None, seed=0):
    """Random rotated keys and queries, quantised; keys stored in a cache whose physical blocks are
    a random permutation; unused block-table entries are -1."""
    g = torch.Generator().manual_seed(seed)
    B = len(context_lens)
    n_blocks = [(c + 63) // 64 for c in context_lens]
    max_blocks = max_blocks or max(max(n_blocks), 1) + 1
    num_blocks = sum(n_blocks) + extra_blocks
    physical = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    kv_cache = paged.new_kv_cache(num_blocks, D)
    kv_cache.view(torch.uint8).random_(0, 256, generator=g)  # garbage (NaN bytes too) where nothing is stored
    keys, used = [], 0
    for b, c in enumerate(context_lens):
        block_table[b, : n_blocks[b]] = physical[used: used + n_blocks[b]].int()
        used += n_blocks[b]
        k_raw = rotate_activation(torch.randn(c, D, generator=g))
        k_fp8, k_scale = fp8.act_quant(k_raw, block_size=D)
        pos = torch.arange(c)
        paged.store_kv(kv_cache, k_fp8, k_scale, block_table[b, pos // 64].long() * 64 + pos % 64)
        keys.append((k_raw, k_fp8, k_scale.squeeze(-1)))
    q_raw = rotate_activation(torch.randn(B, next_n, H, D, generator=g))
    q_fp8, q_scale = fp8.act_quant(q_raw, block_size=D)
    w_raw = torch.randn(B * next_n, H, generator=g)
    w = w_raw * q_scale.reshape(B * next_n, H)
    context_lens = torch.tensor(context_lens, dtype=torch.int32)
    return dict(q=q_fp8, kv_cache=kv_cache, weights=w, context_lens=context_lens, block_table=block_table,
                keys=keys, q_raw=q_raw, w_raw=w_raw)


def dense_logits(batch, next_n, raw=False):
    """The formula straight from the dense keys (not through the cache), float64."""
    B = len(batch["keys"])
    width = int(batch["context_lens"].max()) if B else 0
    out = torch.full((B * next_n, width), float("-inf"), dtype=torch.float64)
    for b, (k_raw, k_fp8, k_scale) in enumerate(batch["keys"]):
        c = k_raw.shape[0]
        k = k_raw.double() if raw else k_fp8.double() * k_scale.double().unsqueeze(-1)  # [c, D]
        for j in range(next_n):
            row = b * next_n + j
            q = batch["q_raw"][b, j].double() if raw else batch["q"][b, j].double()  # [H, D]
            w = batch["w_raw"][row].double() if raw else batch["weights"][row].double()  # [H]
            visible = max(c - next_n + j + 1, 0)  # p <= c - next_n + j
            out[row, :visible] = ((q @ k[:visible].T).clamp(min=0) * w.unsqueeze(-1)).sum(0)
    return out


def call_args(batch, num_sms=5, max_context_len=None, device="cpu"):
    ctx = batch["context_lens"]
    max_context_len = max_context_len if max_context_len is not None else int(ctx.max())
    meta = paged.paged_mqa_logits_metadata(ctx, 64, num_sms)
    args = (batch["q"], batch["kv_cache"], batch["weights"], ctx, batch["block_table"], meta)
    return tuple(t.to(device) for t in args) + (max_context_len,)


# ---------------------------------------------------------------------------------- cache layout


def test_fused_layout_values_then_scales():
    kv_cache = paged.new_kv_cache(3, 128)
    assert kv_cache.shape == (3, 64, 1, 132) and paged.kv_cache_block_bytes(128) == 8448
    k_fp8, k_scale = fp8.act_quant(torch.randn(2, 128) * 5)
    paged.store_kv(kv_cache, k_fp8, k_scale, torch.tensor([2 * 64 + 5, 0 * 64 + 63]))
    block2 = kv_cache[2].reshape(-1)  # the 8448 bytes of physical block 2
    assert torch.equal(block2[5 * 128: 6 * 128], k_fp8[0].view(torch.uint8))  # values of slot 5
    assert torch.equal(block2[64 * 128 + 4 * 5: 64 * 128 + 4 * 6].view(torch.float32), k_scale[0])  # its scale
    block0 = kv_cache[0].reshape(-1)
    assert torch.equal(block0[63 * 128: 64 * 128], k_fp8[1].view(torch.uint8))
    assert torch.equal(block0[8444:8448].view(torch.float32), k_scale[1])
    assert int(kv_cache[1].count_nonzero()) == 0  # nothing else written


def test_gather_returns_what_was_stored():
    batch = make_batch([130, 5])
    for b, (_, k_fp8, k_scale) in enumerate(batch["keys"]):
        c = k_fp8.shape[0]
        got_fp8, got_scale = paged.gather_kv(batch["kv_cache"], batch["block_table"][b, : (c + 63) // 64], c)
        assert torch.equal(got_fp8.view(torch.uint8), k_fp8.view(torch.uint8))
        assert torch.equal(got_scale, k_scale)


def test_store_rejects_bad_slots():
    kv_cache = paged.new_kv_cache(2, 128)
    k_fp8, k_scale = fp8.act_quant(torch.randn(1, 128))
    with pytest.raises(ValueError, match="slots must be <= 127"):
        paged.store_kv(kv_cache, k_fp8, k_scale, torch.tensor([128]))


# ---------------------------------------------------------------------------------- schedule


def schedule_by_loops(context_lens, num_sms, split=256):
    """DeepGEMM's metadata kernel, spelled out with loops."""
    num_segs = [(c + split - 1) // split for c in context_lens]
    prefix, total = [], 0
    for n in num_segs:
        total += n
        prefix.append(total)
    q, r = divmod(total, num_sms)
    rows = []
    for s in range(num_sms + 1):
        start = s * q + min(s, r)
        b = next((i for i, p in enumerate(prefix) if p > start), len(context_lens))
        rows.append([b, start - (prefix[b - 1] if b > 0 else 0)])
    return rows


@pytest.mark.parametrize("context_lens, num_sms", [([1, 256, 257, 0, 5000, 33], 4), ([32768] * 7, 132),
                                                   ([0, 0, 3], 2), ([700], 1), ([10, 20], 9)])
def test_metadata_matches_the_loop_algorithm(context_lens, num_sms):
    meta = paged.paged_mqa_logits_metadata(torch.tensor(context_lens, dtype=torch.int32), 64, num_sms)
    assert meta.dtype == torch.int32 and meta.shape == (num_sms + 1, 2)
    assert meta.tolist() == schedule_by_loops(context_lens, num_sms)
    assert meta[-1].tolist() == [len(context_lens), 0]


def test_metadata_spreads_segments_evenly():
    context_lens = torch.tensor([100, 9000, 0, 3000, 65536, 1], dtype=torch.int32)
    meta = paged.paged_mqa_logits_metadata(context_lens, 64, 17)
    num_segs = ((context_lens.long() + 255) // 256).tolist()
    offsets = [0]
    for n in num_segs:
        offsets.append(offsets[-1] + n)
    flat = [offsets[b] + s for b, s in meta.tolist()]  # each row as a global segment index
    shares = [b - a for a, b in zip(flat, flat[1:])]
    assert sum(shares) == offsets[-1] and max(shares) - min(shares) <= 1


def test_metadata_rejects_bad_input():
    with pytest.raises(ValueError, match="context_lens must be >= 0"):
        paged.paged_mqa_logits_metadata(torch.tensor([-1], dtype=torch.int32), 64, 4)
    with pytest.raises(ValueError, match="num_sms"):
        paged.paged_mqa_logits_metadata(torch.tensor([1], dtype=torch.int32), 64, 0)
    with pytest.raises(TypeError, match="int32"):
        paged.paged_mqa_logits_metadata(torch.tensor([1]), 64, 4)


# ---------------------------------------------------------------------------------- paged logits


@pytest.mark.parametrize("next_n", [1, 2])
def test_paged_reference_matches_dense_formula(next_n):
    batch = make_batch([1, 64, 65, 200, 0, 2], next_n=next_n, H=4, D=32, seed=next_n)
    args = call_args(batch, num_sms=3, max_context_len=210)
    out = paged.paged_mqa_logits(*args)  # CPU: the reference
    expected = torch.full((6 * next_n, 210), float("-inf"), dtype=torch.float64)
    expected[:, :200] = dense_logits(batch, next_n)
    compare.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if next_n == 2:  # draft 0 of a batch sees one position less than draft 1
        assert torch.isneginf(out[2 * 3, 199]) and torch.isfinite(out[2 * 3 + 1, 199])


def test_paged_fp8_close_to_unquantised():
    batch = make_batch([300, 77, 129], next_n=2, H=64, seed=3)
    out = paged.paged_mqa_logits(*call_args(batch))
    compare.assert_close(out, dense_logits(batch, 2, raw=True), atol=float("inf"), max_calc_diff=1e-3)


def _bad_paged(**change):
    batch = make_batch([70, 10], next_n=1, H=64, seed=4)
    q, kv_cache, w, ctx, bt, meta, max_len = call_args(batch, num_sms=2)
    args = dict(q=q, kv_cache=kv_cache, weights=w, context_lens=ctx, block_table=bt, schedule_meta=meta,
                max_context_len=max_len)
    args.update(change)
    return args


def _table(*rows):
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("change, match", [
    (dict(q=torch.zeros(2, 3, 64, 128).to(torch.float8_e4m3fn), weights=torch.randn(6, 64)), "next_n"),
    (dict(context_lens=torch.tensor([70, 10], dtype=torch.int32), max_context_len=60), "context_lens must be <= 60"),
    (dict(context_lens=torch.tensor([70, 200], dtype=torch.int32), max_context_len=200), "needs 4 blocks"),
    (dict(block_table=_table([0, 1, -1], [-2, -1, -1])), "block id -2"),
    (dict(block_table=_table([0, 1, -1], [99, -1, -1])), "block id 99"),
    (dict(context_lens=torch.tensor([70, 10])), "context_lens must be int32"),
    (dict(block_table=_table([0, 1, -1], [2, -1, -1]).long()), "block_table must be int32"),
    (dict(weights=torch.randn(2, 64).bfloat16()), "weights must be float32"),
    (dict(kv_cache=torch.zeros(5, 64, 1, 68, dtype=torch.uint8)), "D = 64"),
    (dict(kv_cache=torch.zeros(5, 32, 1, 132, dtype=torch.uint8)), "kv_cache"),
    (dict(schedule_meta=torch.tensor([[1, 0], [2, 0]], dtype=torch.int32)), "schedule_meta does not match"),
    (dict(max_context_len=70.0), "max_context_len"),
])
def test_paged_rejects_bad_input(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        paged.paged_mqa_logits_reference(**_bad_paged(**change))


@pytest.mark.parametrize("change, match", [
    (dict(), "must be on a CUDA device"),
    (dict(q=torch.randn(2, 1, 64, 128)), "q must be float8_e4m3fn"),
    (dict(kernel="wmma"), "kernel must be one of"),
])
def test_paged_cuda_checks_before_launch(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        paged.paged_mqa_logits_cuda(**_bad_paged(**change))


def test_default_paged_kernel_is_wgmma_where_it_runs(monkeypatch):
    assert paged.default_paged_kernel("cpu") == "tensor_core_f16_v3" and "wgmma" in paged.PAGED_KERNELS
    monkeypatch.setattr(paged, "wgmma_available", lambda device=None: True)
    assert paged.default_paged_kernel() == "wgmma"


@pytest.mark.parametrize("next_n, H", [(1, 64), (2, 64), (1, 32), (2, 32)])
def test_wgmma_launch_geometry(monkeypatch, next_n, H):
    # what _launch_paged asks of kernel 4, recorded instead of launched: one block per schedule row
    launches = []
    monkeypatch.setattr(kernels, "wgmma_available", lambda device=None: True)
    monkeypatch.setattr(paged, "launch", lambda *args, **kwargs: launches.append((args, kwargs)))
    batch = make_batch([65, 0, 3], next_n=next_n, H=H, seed=6)
    q, kv_cache, w, ctx, bt, meta, max_len = call_args(batch, num_sms=7)
    out = torch.empty(3 * next_n, max_len)
    paged._launch_paged(q, kv_cache, w, ctx, bt, meta, max_len, True, out, "wgmma")
    (args, kwargs), = launches
    assert args == ("fp8_paged_mqa_logits", f"fp8_paged_mqa_logits_wgmma_h{H}_n{next_n}")
    assert kwargs["grid"] == 7 and kwargs["block"] == 256
    N = next_n * H  # the contract: 1024 + N 128 + N 4 + 2 warpgroups x 5 stages x (64 x 128 + 64 x 4)
    assert kwargs["shared_mem"] == 1024 + N * 128 + N * 4 + 2 * 5 * (64 * 128 + 64 * 4)
    assert kwargs["args"] == (q, kv_cache, w, ctx, bt, meta, out, 3, next_n, bt.shape[1], max_len, True)


def test_paged_cuda_rejects_unsupported_heads():
    batch = make_batch([70, 10], H=16, seed=5)
    q, kv_cache, w, ctx, bt, meta, max_len = call_args(batch)
    with pytest.raises(ValueError, match="supports H in"):
        paged.check_paged_inputs(q, kv_cache, w, ctx, bt, meta, max_len, cuda=True)


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", paged.PAGED_KERNELS)
@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("H", [64, 32])
@pytest.mark.parametrize("num_sms", [1, 7, "device"])
def test_paged_cuda_matches_reference(next_n, H, num_sms, kernel):
    skip_unless_available(kernel)
    # partial blocks, an empty context, 256-token edges, a few thousand tokens
    context_lens = [1, 63, 64, 65, 0, 300, 1000, 2, 513, 3001]
    batch = make_batch(context_lens, next_n=next_n, H=H, seed=10 + next_n)
    num_sms = paged.schedule_size() if num_sms == "device" else num_sms
    q, kv_cache, w, ctx, bt, meta, _ = call_args(batch, num_sms=num_sms, device="cuda")
    max_len = 3029  # wider than any context: the clean fill must reach the end of every row
    ref = paged.paged_mqa_logits_reference(*(t.cpu() for t in (q, kv_cache, w, ctx, bt, meta)), max_len)
    out = compare.poisoned((len(context_lens) * next_n, max_len), torch.float32, "cuda")
    paged.paged_mqa_logits_cuda(q, kv_cache, w, ctx, bt, meta, max_len, True, out=out, kernel=kernel)
    # same tolerance and reasoning as test_fp8.test_mqa_logits_cuda_matches_reference
    scale = ref[torch.isfinite(ref)].abs().max().item()
    compare.assert_close(out, ref, atol=1e-3 * scale, max_calc_diff=1e-6, name="paged logits")
    raw = torch.full_like(ref, float("-inf"), dtype=torch.float64)
    raw[:, :3001] = dense_logits(batch, next_n, raw=True)
    compare.assert_close(out, raw, atol=float("inf"), max_calc_diff=1e-3, name="paged logits vs unquantised")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", paged.PAGED_KERNELS)
@pytest.mark.parametrize("next_n, H", [(2, 64), (1, 64), (2, 32), (1, 32)])
def test_paged_cuda_unclean_defines_context_positions(kernel, next_n, H):
    skip_unless_available(kernel)
    batch = make_batch([129, 7, 256], next_n=next_n, H=H, seed=20)
    q, kv_cache, w, ctx, bt, meta, _ = call_args(batch, num_sms=4, device="cuda")
    ref = paged.paged_mqa_logits_reference(*(t.cpu() for t in (q, kv_cache, w, ctx, bt, meta)), 300)
    out = compare.poisoned((3 * next_n, 300), torch.float32, "cuda")
    paged.paged_mqa_logits_cuda(q, kv_cache, w, ctx, bt, meta, 300, False, out=out, kernel=kernel)
    out = out.cpu()
    for b, c in enumerate([129, 7, 256]):  # p < context_len is defined: values and -inf alike
        rows = slice(next_n * b, next_n * b + next_n)
        scale = ref[rows, :c][torch.isfinite(ref[rows, :c])].abs().max().item()
        compare.assert_close(out[rows, :c], ref[rows, :c], atol=1e-3 * scale, max_calc_diff=1e-6)


@pytest.mark.gpu
def test_paged_dispatch_and_errors_on_gpu():
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _bad_paged().items()}
    out = paged.paged_mqa_logits(*args.values())
    assert out.is_cuda and out.shape == (2, 70)
    fastest = paged.default_paged_kernel(torch.device("cuda"))
    assert fastest == ("wgmma" if kernels.wgmma_available() else "tensor_core_f16_v3")
    assert torch.equal(out, paged.paged_mqa_logits_cuda(**args, kernel=fastest))
    with pytest.raises(ValueError, match="block id"):
        paged.paged_mqa_logits(**{**args, "block_table": _table([0, 1, -1], [-5, -1, -1]).cuda()})
    with pytest.raises(ValueError, match="kernel must be one of"):
        paged.paged_mqa_logits_cuda(**args, kernel="wmma")
    with pytest.raises(ValueError, match="schedule_meta does not match"):
        paged.paged_mqa_logits(**{**args, "schedule_meta": paged.paged_mqa_logits_metadata(
            torch.tensor([700, 10], dtype=torch.int32, device="cuda"), 64, 2)})


@pytest.mark.gpu
def test_paged_cuda_refuses_wgmma_where_it_does_not_run(monkeypatch):
    pretend_no_wgmma(monkeypatch)
    batch = make_batch([129, 0, 70], next_n=2, H=64, seed=21)
    q, kv_cache, w, ctx, bt, meta, max_len = call_args(batch, num_sms=3, device="cuda")
    out = compare.poisoned((6, max_len), torch.float32, "cuda")
    refusal = r"capability 9\.0 .*has compute capability \d+\.\d+: use kernel='tensor_core_f16_v3'"
    with pytest.raises(ValueError, match=refusal):
        paged.paged_mqa_logits_cuda(q, kv_cache, w, ctx, bt, meta, max_len, out=out, kernel="wgmma")
    torch.cuda.synchronize()
    assert torch.isnan(out).all()  # refused before any launch
    assert paged.default_paged_kernel(q.device) == "tensor_core_f16_v3"
    ref = paged.paged_mqa_logits_reference(*(t.cpu() for t in (q, kv_cache, w, ctx, bt, meta)), max_len)
    scale = ref[torch.isfinite(ref)].abs().max().item()
    compare.assert_close(paged.paged_mqa_logits(q, kv_cache, w, ctx, bt, meta, max_len), ref, atol=1e-3 * scale,
                         max_calc_diff=1e-6)


# ---------------------------------------------------------------------------------- kernels 3 and 4 on the CPU


def test_v3_launch_constants_match_the_source():
    d = cu_defines("fp8_paged_mqa_logits")
    assert d["K3_WARPS"] == paged.PAGED_V3_WARPS and d["K3_STAGES"] == paged.PAGED_V3_STAGES
    assert d["K3_UNIT_KEYS"] * (128 + 4) == paged.PAGED_V3_UNIT_BYTES
    for H in (32, 64):
        for next_n in (1, 2):  # two blocks an SM must fit the H200's 227 KiB (1 KiB reserved a block)
            smem = next_n * H * 128 * 2 + next_n * H * 4 + paged.PAGED_V3_WARPS * paged.PAGED_V3_STAGES * 4224
            assert 2 * (smem + 1024) <= 227 * 1024


def test_wgmma_launch_constants_match_the_source():
    d = cu_defines("fp8_paged_mqa_logits")
    assert d["K4_WARPGROUPS"] == paged.PAGED_WGMMA_WARPGROUPS and d["K4_THREADS"] == 128 * d["K4_WARPGROUPS"]
    assert d["K4_STAGES"] == paged.PAGED_WGMMA_STAGES
    assert paged.PAGED_WGMMA_STAGE_BYTES == d["BLOCK_BYTES"]  # a stage is one physical block: values, scales
    # 1024 alignment slack, q (N = next_n H rows of 128 bytes), w (N float32), the warpgroups' stages
    assert paged._wgmma_smem(2, 64) == 102400 and paged._wgmma_smem(1, 64) == paged._wgmma_smem(2, 32) == 93952
    for H in (32, 64):
        for next_n in (1, 2):  # two blocks an SM fit the H200's 227 KiB (1 KiB reserved a block)
            assert 2 * (paged._wgmma_smem(next_n, H) + 1024) <= 227 * 1024


def _e4m3(byte_array):
    """uint8 array -> float64 values of e4m3fn."""
    return torch.from_numpy(byte_array.copy()).view(torch.float8_e4m3fn).double().numpy()


def _emulate_v3_unit(stage_values, q_bytes, w, scales):
    """One warp's unit of kernel 3 with its exact lane mappings: stage_values uint8 [32, 128] (key rows,
    unswizzled), q_bytes uint8 [next_n, H, 128], w [next_n, H], scales [32] -> logits [next_n, 32] as
    stored by lane (g, t) at key 8t + g."""
    import numpy as np
    next_n, H = q_bytes.shape[:2]
    NT = H // 8
    # the stage, swizzled as k3_load_unit writes it: lane l, copy i -> chunk l + 32 i
    flat = np.zeros(4096, np.uint8)
    for lane in range(32):
        dst_even = (lane // 8) * 128 + (((lane % 8) ^ (lane // 8)) * 16)
        for i in range(8):
            chunk = lane + 32 * i
            dst = 512 * i + (dst_even ^ 64 if i % 2 else dst_even)
            row, col = chunk // 8, chunk % 8
            assert dst == row * 128 + ((col ^ (row % 8)) * 16)  # == swizzled(row, col)
            flat[dst:dst + 16] = stage_values[row, col * 16:(col + 1) * 16]
    # q fragments: entry (j, nt, p, lane) = head 8nt + g, bytes 32p + 4t .. +3 and 32p + 16 + 4t .. +3
    qf = np.zeros((next_n, NT, 4, 32, 8))
    for j in range(next_n):
        for nt in range(NT):
            for p in range(4):
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    src = q_bytes[j, nt * 8 + g]
                    qf[j, nt, p, lane, :4] = _e4m3(src[32 * p + 4 * t: 32 * p + 4 * t + 4])
                    qf[j, nt, p, lane, 4:] = _e4m3(src[32 * p + 16 + 4 * t: 32 * p + 16 + 4 * t + 4])
    # ldmatrix x4: lane L gives row address of matrix L / 8; register r of lane l = matrix r, row l / 4,
    # bytes 4 (l % 4) .. + 3
    def ldmatrix(m, kk):
        rows = []
        for L in range(32):
            row, chunk = 16 * m + L % 16, 2 * kk + L // 16
            off = row * 128 + ((chunk ^ (row % 8)) * 16)
            rows.append(flat[off:off + 16])
        return [[rows[8 * r + l // 4][4 * (l % 4): 4 * (l % 4) + 4] for r in range(4)] for l in range(32)]
    # A fragments per lane: a[m][c] = 4 registers x 2 f16 (lo = bytes 0, 1; hi = bytes 2, 3)
    A = np.zeros((32, 2, 8, 4, 2))
    for m in range(2):
        for kk in range(4):
            regs = ldmatrix(m, kk)
            for lane in range(32):
                for s in range(2):
                    kg, kg8 = _e4m3(regs[lane][2 * s]), _e4m3(regs[lane][2 * s + 1])
                    A[lane, m, 2 * kk + s, 0], A[lane, m, 2 * kk + s, 2] = kg[:2], kg[2:]
                    A[lane, m, 2 * kk + s, 1], A[lane, m, 2 * kk + s, 3] = kg8[:2], kg8[2:]
    # mma m16n8k16 on fragments: C[row, col] = sum_k A[row, k] B[k, col]
    def mma(acc, a_frag, b0, b1):  # a_frag [lane][4][2], b0/b1 [lane][2]; acc [lane][4]
        Am = np.zeros((16, 16))
        Bm = np.zeros((16, 8))
        for lane in range(32):
            g, t = lane // 4, lane % 4
            Am[g, 2 * t:2 * t + 2] = a_frag[lane][0]
            Am[g + 8, 2 * t:2 * t + 2] = a_frag[lane][1]
            Am[g, 2 * t + 8:2 * t + 10] = a_frag[lane][2]
            Am[g + 8, 2 * t + 8:2 * t + 10] = a_frag[lane][3]
            Bm[2 * t:2 * t + 2, g] = b0[lane]
            Bm[2 * t + 8:2 * t + 10, g] = b1[lane]
        C = Am @ Bm
        for lane in range(32):
            g, t = lane // 4, lane % 4
            acc[lane] += [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]
    out = np.zeros((next_n, 32))
    for j in range(next_n):
        sums = np.zeros((32, 2, 2))
        for nt in range(NT):
            acc = np.zeros((2, 32, 4))
            for p in range(4):
                bq = qf[j, nt, p]  # [lane][8]: b0 = 0:2, b1 = 2:4 (k-step 2p), 4:6, 6:8 (k-step 2p + 1)
                for m in range(2):
                    mma(acc[m], A[:, m, 2 * p], bq[:, 0:2], bq[:, 2:4])
                    mma(acc[m], A[:, m, 2 * p + 1], bq[:, 4:6], bq[:, 6:8])
            for lane in range(32):
                t = lane % 4
                wx, wy = w[j, 8 * nt + 2 * t], w[j, 8 * nt + 2 * t + 1]
                for m in range(2):
                    sums[lane, m, 0] += wx * max(acc[m, lane, 0], 0) + wy * max(acc[m, lane, 1], 0)
                    sums[lane, m, 1] += wx * max(acc[m, lane, 2], 0) + wy * max(acc[m, lane, 3], 0)
        # the transposing reduction over the 4 lanes of a key row
        keep0, keep1, give0, give1 = (np.zeros(32) for _ in range(4))
        for lane in range(32):
            t = lane % 4
            hi2 = bool(t & 2)
            keep0[lane] = sums[lane, 1, 0] if hi2 else sums[lane, 0, 0]
            keep1[lane] = sums[lane, 1, 1] if hi2 else sums[lane, 0, 1]
            give0[lane] = sums[lane, 0, 0] if hi2 else sums[lane, 1, 0]
            give1[lane] = sums[lane, 0, 1] if hi2 else sums[lane, 1, 1]
        k0 = keep0 + give0[np.arange(32) ^ 2]
        k1 = keep1 + give1[np.arange(32) ^ 2]
        hi1 = (np.arange(32) % 4) & 1
        total = np.where(hi1, k1, k0)
        give = np.where(hi1, k0, k1)
        total = total + give[np.arange(32) ^ 1]
        for lane in range(32):
            g, t = lane // 4, lane % 4
            out[j, 8 * t + g] = total[lane] * scales[8 * t + g]
    return out


@pytest.mark.parametrize("next_n, H", [(1, 64), (2, 32)])
def test_v3_fragment_mappings_emulated(next_n, H):
    """Kernel 3's swizzle, ldmatrix, q fragment layout, mma fragments, head sum and the transposing
    3-shuffle reduction, emulated lane by lane, give the formula."""
    import numpy as np
    rng = np.random.default_rng(next_n + H)
    keys = torch.from_numpy(rng.standard_normal((32, 128)).astype(np.float32)).to(torch.float8_e4m3fn)
    q = torch.from_numpy(rng.standard_normal((next_n, H, 128)).astype(np.float32)).to(torch.float8_e4m3fn)
    w = rng.standard_normal((next_n, H))
    scales = 2.0 ** rng.integers(-6, 2, 32)
    got = _emulate_v3_unit(keys.view(torch.uint8).numpy(), q.view(torch.uint8).numpy(), w, scales)
    scores = np.einsum("jhd,kd->jhk", q.double().numpy(), keys.double().numpy())
    expected = (np.maximum(scores, 0) * w[:, :, None]).sum(1) * scales[None, :]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def _v3_walk(context_lens, meta, next_n, warps):
    """Kernel 3's walk over the schedule, as the CUDA code does it: per block of the grid its runs
    (one batch each), the run's 32-key units, unit u = warp + warps i of warp `warp`. Returns every
    (row, position) stored and every block-table index read."""
    B = len(context_lens)
    stored, table_reads = [], []
    for bid in range(len(meta) - 1):
        start_b, start_seg = meta[bid]
        end_b, end_seg = meta[bid + 1]
        b = start_b
        while b < B and (b < end_b or (b == end_b and end_seg > 0)):
            ctx = context_lens[b]
            n_blocks = (ctx + 63) // 64
            n_begin = start_seg * 4 if b == start_b else 0
            n_end = min(end_seg * 4, n_blocks) if b == end_b else n_blocks
            if n_begin < n_end:
                first = n_begin * 64
                n_units = (min(ctx, n_end * 64) - first + 31) // 32
                for warp in range(warps):
                    my_units = (n_units - warp + warps - 1) // warps if warp < n_units else 0
                    for i0 in range(0, my_units, 32):  # the id fetch: lane k, unit i0 + k
                        for lane in range(32):
                            u = warp + warps * (i0 + lane)
                            if u < n_units:
                                table_reads.append((b, first // 64 + u // 2))
                    for i in range(my_units):
                        u = warp + warps * i
                        for lane in range(32):
                            pos = first + 32 * u + 8 * (lane % 4) + lane // 4
                            if pos < ctx:
                                for j in range(next_n):
                                    stored.append((b * next_n + j, pos))
            b += 1
    return stored, table_reads


@pytest.mark.parametrize("num_sms", [1, 2, 7, 264])
def test_v3_walk_writes_every_context_position_once(num_sms):
    context_lens = [1, 63, 64, 65, 0, 300, 1000, 2, 513, 32, 33]
    meta = paged.paged_mqa_logits_metadata(torch.tensor(context_lens, dtype=torch.int32), 64, num_sms).tolist()
    for next_n in (1, 2):
        stored, reads = _v3_walk(context_lens, meta, next_n, paged.PAGED_V3_WARPS)
        expected = [(b * next_n + j, p) for b, c in enumerate(context_lens) for j in range(next_n) for p in range(c)]
        assert sorted(stored) == sorted(expected)  # each once, nothing past a context
        assert all(n < (context_lens[b] + 63) // 64 for b, n in reads)  # only blocks of the context
