"""paged: the fused FP8 key cache, the schedule metadata and the paged logits (paged_mqa_logits and
every version of PAGED_MQA_LOGITS_KERNELS, cuda/paged_mqa_logits.cu)."""
import pytest
import torch

from dsa_tutorial import checks, compare, fp8, paged
from dsa_tutorial.hadamard import rotate_activation
from test_fp8 import assert_bf16_logits, pretend_no_wgmma, recorded_launches, skip_unless_available

TABLE = paged.PAGED_MQA_LOGITS_KERNELS


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


def dense_logits(batch, next_n, raw=False, row_lens=None):
    """The formula straight from the dense keys (not through the cache), float64. row_lens [B, next_n]:
    row (b, j) sees p < row_lens[b, j] (the per-row form), else p <= context_len - next_n + j."""
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
            visible = max(c - next_n + j + 1, 0) if row_lens is None else int(row_lens[b, j])
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


def test_metadata_of_an_empty_batch():
    meta = paged.paged_mqa_logits_metadata(torch.zeros(0, dtype=torch.int32), 64, 3)
    assert meta.tolist() == [[0, 0]] * 4


def test_metadata_rejects_bad_input():
    with pytest.raises(ValueError, match="context_lens must be >= 0"):
        paged.paged_mqa_logits_metadata(torch.tensor([-1], dtype=torch.int32), 64, 4)
    with checks.data_checks(False), pytest.raises(ValueError, match="context_lens must be >= 0"):
        paged.paged_mqa_logits_metadata(torch.tensor([-1], dtype=torch.int32), 64, 4)  # CPU data: always checked
    with pytest.raises(ValueError, match="num_sms"):
        paged.paged_mqa_logits_metadata(torch.tensor([1], dtype=torch.int32), 64, 0)
    with pytest.raises(TypeError, match="int32"):
        paged.paged_mqa_logits_metadata(torch.tensor([1]), 64, 4)


# ---------------------------------------------------------------------------------- paged logits


@pytest.mark.parametrize("next_n", [1, 2])
def test_paged_reference_matches_dense_formula(next_n):
    batch = make_batch([1, 64, 65, 200, 0, 2], next_n=next_n, H=4, D=32, seed=next_n)
    args = call_args(batch, num_sms=3, max_context_len=210)
    out = paged.paged_mqa_logits(*args)
    expected = torch.full((6 * next_n, 210), float("-inf"), dtype=torch.float64)
    expected[:, :200] = dense_logits(batch, next_n)
    compare.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if next_n == 2:  # draft 0 of a batch sees one position less than draft 1
        assert torch.isneginf(out[2 * 3, 199]) and torch.isfinite(out[2 * 3 + 1, 199])


def per_row(context_lens, next_n):
    """The [B] form as DeepGEMM's [B, next_n] one: context_lens[b] - next_n + j + 1 (at least 0)."""
    j = torch.arange(next_n)
    return (context_lens.unsqueeze(1) - next_n + j + 1).clamp(min=0).int()


@pytest.mark.parametrize("next_n", [1, 2])
def test_per_row_context_lens_give_the_1d_form_bit_for_bit(next_n):
    batch = make_batch([1, 64, 65, 200, 0, 2], next_n=next_n, H=4, D=32, seed=next_n)
    q, kv_cache, w, ctx, bt, meta, _ = call_args(batch, num_sms=3)
    lens = per_row(ctx, next_n)
    assert lens.shape == (6, next_n) and torch.equal(lens[:, -1], ctx)
    assert torch.equal(paged.paged_mqa_logits_metadata(lens, 64, 3), meta)
    one_d = paged.paged_mqa_logits(q, kv_cache, w, ctx, bt, meta, 210)
    two_d = paged.paged_mqa_logits(q, kv_cache, w, lens, bt, meta, 210)
    assert torch.equal(two_d, one_d)


def test_per_row_context_lens_of_unrelated_lengths():
    # rows of one sequence need not grow with j: 0, max_context_len, a draft row longer than the next
    lens = torch.tensor([[0, 130], [200, 0], [5, 5], [0, 0], [64, 65]], dtype=torch.int32)
    batch = make_batch(lens.amax(1).tolist(), next_n=2, H=4, D=32, seed=7)
    meta = paged.paged_mqa_logits_metadata(lens, 64, 4)
    out = paged.paged_mqa_logits(batch["q"], batch["kv_cache"], batch["weights"], lens, batch["block_table"], meta, 200)
    # independent: the formula on the dense keys, row by row
    expected = dense_logits(batch, 2, row_lens=lens)
    assert expected.shape == out.shape == (10, 200)
    compare.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # row (b, j) sees exactly p < lens[b, j]
    assert torch.equal(torch.isfinite(out), torch.arange(200) < lens.reshape(-1, 1))
    # and each row is fp8.mqa_logits over the sequence's keys with ks = 0, ke = lens[b, j]
    for b, (_, k_fp8, k_scale) in enumerate(batch["keys"]):
        for j in range(2):
            row = 2 * b + j
            one = fp8.mqa_logits(batch["q"][b, j:j + 1], (k_fp8, k_scale), batch["weights"][row:row + 1],
                                 torch.zeros(1, dtype=torch.int32), lens[b, j:j + 1])
            assert torch.equal(out[row, :k_fp8.shape[0]], one[0])


@pytest.mark.parametrize("num_sms", [1, 3, 17])
def test_metadata_of_per_row_lengths_is_that_of_the_longest_rows(num_sms):
    lens = torch.tensor([[0, 257], [1000, 3], [0, 0], [256, 255], [4097, 4096]], dtype=torch.int32)
    meta = paged.paged_mqa_logits_metadata(lens, 64, num_sms)
    assert torch.equal(meta, paged.paged_mqa_logits_metadata(lens.amax(1), 64, num_sms))
    assert meta.tolist() == schedule_by_loops([257, 1000, 0, 256, 4097], num_sms)
    empty = paged.paged_mqa_logits_metadata(torch.zeros(0, 2, dtype=torch.int32), 64, num_sms)
    assert empty.tolist() == [[0, 0]] * (num_sms + 1)


@pytest.mark.parametrize("lens, match", [
    (torch.zeros(2, 1, 1, dtype=torch.int32), r"context_lens must be \[B\] or \[B, next_n\]"),
    (torch.zeros(2, 0, dtype=torch.int32), "needs next_n >= 1"),
    (torch.tensor([[0, -1]], dtype=torch.int32), "context_lens must be >= 0"),
    (torch.zeros(2, 2), "context_lens must be int32"),
])
def test_metadata_rejects_bad_per_row_lengths(lens, match):
    with pytest.raises((ValueError, TypeError), match=match):
        paged.paged_mqa_logits_metadata(lens, 64, 4)


def test_paged_logits_in_bfloat16_round_the_float32_logits():
    batch = make_batch([130, 0, 64], next_n=2, H=4, D=32, seed=8)
    q, kv_cache, w, ctx, bt, meta, _ = call_args(batch, num_sms=2)
    for lens in (ctx, per_row(ctx, 2).flip(1)):  # both forms of context_lens
        f32 = paged.paged_mqa_logits(q, kv_cache, w, lens, bt, meta, 140)
        bf16 = paged.paged_mqa_logits(q, kv_cache, w, lens, bt, meta, 140, logits_dtype=torch.bfloat16)
        assert f32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
        assert torch.equal(bf16, f32.to(torch.bfloat16))
        assert torch.equal(torch.isneginf(bf16), torch.isneginf(f32)) and torch.isfinite(f32).any()
    with pytest.raises(ValueError, match="logits_dtype must be torch.float32 or torch.bfloat16"):
        paged.paged_mqa_logits(q, kv_cache, w, ctx, bt, meta, 140, logits_dtype=torch.float16)


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
    # the per-row form [B, next_n] (next_n = 1 here): each row's length, the longest within its table row
    (dict(context_lens=_table([70], [71])), "context_lens must be <= 70"),
    (dict(context_lens=_table([70], [-1])), "context_lens must be >= 0"),
    (dict(context_lens=_table([70], [200]), max_context_len=200), r"context_lens\[1, 0\] = 200 needs 4 blocks"),
    (dict(context_lens=_table([70, 10], [10, 10])), "next_n = 2"),
    (dict(context_lens=_table([70], [10]).unsqueeze(-1)), r"context_lens must be \[B\] or \[B, next_n\]"),
    (dict(context_lens=_table([70], [10]), block_table=_table([0, 1, -1], [-3, -1, -1])), "block id -3"),
    (dict(context_lens=_table([0], [10])), "schedule_meta does not match"),  # made for [70, 10]
])
def test_paged_rejects_bad_input(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        paged.paged_mqa_logits(**_bad_paged(**change))


@pytest.mark.parametrize("change, match", [
    (dict(context_lens=torch.tensor([70, 10], dtype=torch.int32), max_context_len=60), "context_lens must be <= 60"),
    (dict(context_lens=torch.tensor([70, 200], dtype=torch.int32), max_context_len=200), "needs 4 blocks"),
    (dict(block_table=_table([0, 1, -1], [-2, -1, -1])), "block id -2"),
    (dict(schedule_meta=torch.tensor([[1, 0], [2, 0]], dtype=torch.int32)), "schedule_meta does not match"),
    (dict(context_lens=_table([70], [71])), "context_lens must be <= 70"),
    (dict(context_lens=_table([70], [200]), max_context_len=200), r"context_lens\[1, 0\] = 200 needs 4 blocks"),
])
def test_cpu_values_are_checked_even_with_data_checks_off(change, match):
    # reading a CPU tensor costs no device synchronisation: its values are always checked
    with checks.data_checks(False), pytest.raises(ValueError, match=match):
        paged.paged_mqa_logits(**_bad_paged(**change))


@pytest.mark.parametrize("change, match", [
    (dict(), "must be on a CUDA device"),
    (dict(q=torch.randn(2, 1, 64, 128)), "q must be float8_e4m3fn"),
    (dict(kernel=0), "kernel must be None or a version of cuda/paged_mqa_logits.cu: 1 \\(4 warps"),
    (dict(kernel="wgmma"), "kernel must be None or a version"),
    # DeepGEMM's newer forms are accepted: past every host check, to the device check (these tensors
    # are on the CPU); a per-row form of the wrong shape is not
    (dict(context_lens=_table([70], [10])), "must be on a CUDA device"),
    (dict(logits_dtype=torch.bfloat16), "must be on a CUDA device"),
    (dict(context_lens=_table([70], [10]), logits_dtype=torch.bfloat16), "must be on a CUDA device"),
    (dict(context_lens=_table([70, 10], [10, 10])), "next_n = 2"),
    (dict(logits_dtype=torch.float16), "logits_dtype must be torch.float32 or torch.bfloat16"),
])
def test_paged_cuda_checks_before_launch(monkeypatch, change, match):
    launches = recorded_launches(monkeypatch)
    with pytest.raises((ValueError, TypeError), match=match):
        paged.paged_mqa_logits_cuda(**_bad_paged(**change))
    assert launches == []


def test_paged_kernel_table_and_constants():
    assert TABLE.source == "paged_mqa_logits" and TABLE.versions == (1, 2, 3, 4, 5)
    # every kernel for each storage type of the logits: _f32 and _bf16 (logits_dtype)
    outs = ("f32", "bf16")
    assert TABLE.entry_points() == [
        *(f"paged_mqa_logits_{name}_h{H}_{out}" for name in ("e4m3", "f16") for H in (64, 32) for out in outs),
        *(f"paged_mqa_logits_{name}_h{H}_n{n}_{out}" for name in ("warps", "wgmma", "tma") for H in (64, 32)
          for n in (1, 2) for out in outs)]
    d = TABLE.defines()
    # the cache format the Python layout helpers use is the one the kernels are compiled for
    assert (d["BLOCK_KV"], d["SPLIT_KV"], d["HEAD_DIM"]) == (paged.BLOCK_KV, paged.SPLIT_KV, 128)
    assert d["BLOCK_BYTES"] == paged.kv_cache_block_bytes(128) and d["CTAS_PER_SM"] == 2
    no_wgmma = fp8.wgmma_why_not("cpu")
    assert TABLE.choose(None, {4: no_wgmma, 5: no_wgmma}).version == 3  # no wgmma: kernel 3
    assert TABLE.choose(None, {}).version == TABLE.best_first[0]


@pytest.mark.parametrize("next_n, H", [(1, 64), (2, 64), (1, 32), (2, 32)])
def test_dynamic_shared_memory_fits_two_blocks_an_sm(next_n, H):
    N = next_n * H
    # kernel 3: q as f16 fragments (256 bytes a row) and w (4), then 6 warps x 3 stages x 4224 bytes
    assert paged._launch_geometry(3, next_n, H) == (192, N * (256 + 4) + 6 * 3 * 4224)
    # kernel 4: 1024 alignment slack + N 128 + N 4 + 2 warpgroups x 5 stages x (64 x 128 + 64 x 4)
    assert paged._launch_geometry(4, next_n, H) == (256, 1024 + N * 128 + N * 4 + 2 * 5 * (64 * 128 + 64 * 4))
    # kernel 5: 1024 alignment slack + 8 stages x (64 x 128 + 64 x 4) + 20 mbarriers + 2 buffers x N (128 + 4)
    assert paged._launch_geometry(5, next_n, H) == (288, 1024 + 8 * (64 * 128 + 64 * 4) + 20 * 8 + 2 * N * (128 + 4))
    for version in (3, 4, 5):  # CTAS_PER_SM = 2 blocks an SM fit the H200's 227 KiB (1 KiB reserved a block)
        assert 2 * (paged._launch_geometry(version, next_n, H)[1] + 1024) <= 227 * 1024
    assert paged._launch_geometry(4, 2, 64)[1] == 102400 and paged._launch_geometry(4, 1, 64)[1] == 93952


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("logits_dtype", fp8.LOGITS_DTYPES)
@pytest.mark.parametrize("version", (1, 2, 3, 4))  # kernel 5's tensor maps need CUDA tensors: tested on the GPU
@pytest.mark.parametrize("next_n, H", [(1, 64), (2, 64), (1, 32), (2, 32)])
def test_paged_launch_geometry(monkeypatch, version, next_n, H, logits_dtype, per_row):
    # what each kernel is launched with, recorded instead of launched: one block per schedule row; the
    # entry that stores the logits' dtype; context_lens as given, with lens_per_row saying which form
    launches = recorded_launches(monkeypatch)
    batch = make_batch([65, 0, 3], next_n=next_n, H=H, seed=6)
    q, kv_cache, w, ctx, bt, meta, max_len = call_args(batch, num_sms=7)
    if per_row:
        ctx = paged.row_lengths(ctx, next_n).flip(1).contiguous()
    out = torch.empty(3 * next_n, max_len, dtype=logits_dtype)
    paged._launch_paged(version, q, kv_cache, w, ctx, bt, meta, max_len, True, out)
    (source, entry, grid, block, args, smem), = launches
    out_name = fp8.LOGITS_OUT[logits_dtype]
    assert (source, entry) == ("paged_mqa_logits", TABLE.entry(version, H=H, next_n=next_n, out=out_name))
    # kernel 1: 4 warps; 2: a warp per (16-key m-tile, draft position, 32-head half); 3: 6 warps; 4: 2 warpgroups
    expected_threads = {1: 128, 2: 32 * 4 * next_n * (H // 32), 3: 192, 4: 256}[version]
    assert grid == 7 and block == expected_threads and smem == paged._launch_geometry(version, next_n, H)[1]
    assert args == (q, kv_cache, w, ctx, per_row, bt, meta, out, 3, next_n, bt.shape[1], kv_cache.shape[0], max_len,
                    True)


def test_paged_cuda_rejects_unsupported_heads():
    batch = make_batch([70, 10], H=16, seed=5)
    q, kv_cache, w, ctx, bt, meta, max_len = call_args(batch)
    with pytest.raises(ValueError, match="supports H in"):
        paged.check_paged_inputs(q, kv_cache, w, ctx, bt, meta, max_len, cuda=True)


def test_paged_kernel5_needs_aligned_weights_and_int32_rows(monkeypatch):
    # kernel 5 reads the weights through a TMA tensor map (16-byte aligned data) and addresses q and the cache
    # by 128-byte rows with int32 coordinates; host metadata only, so checked here without a GPU
    monkeypatch.setattr(fp8.kernels, "wgmma_available", lambda device=None: True)
    q = torch.empty(2, 1, 64, 128, dtype=torch.float8_e4m3fn)
    cache = torch.empty(4, 64, 1, 132, dtype=torch.uint8)
    w = torch.empty(2 * 64 + 4)
    assert paged._paged_why_not(q, cache, w[:128].view(2, 64)) == {4: None, 5: None}
    shifted = w[1:129].view(2, 64)  # 4 bytes past a 16-byte boundary
    assert shifted.data_ptr() % 16 == 4
    with pytest.raises(ValueError, match="kernel 5 .*16-byte aligned, but they start 4 bytes past"):
        TABLE.choose(5, paged._paged_why_not(q, cache, shifted))
    assert TABLE.choose(None, paged._paged_why_not(q, cache, shifted)).version == 4
    huge = torch.empty(2**25, 64, 1, 132, dtype=torch.uint8, device="meta")  # 66 x 2^25 rows > 2^31
    why = paged._paged_why_not(q.to("meta"), huge, w[:128].view(2, 64).to("meta"))
    assert why[4] is None and "fewer than 2^31, got 2214592512" in why[5]


def test_paged_refusal_names_the_capability(monkeypatch):
    monkeypatch.setattr(fp8.kernels, "gpu_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    monkeypatch.setattr(fp8.kernels, "_capability", lambda index: (10, 0))  # cached per device: bypass it
    refusal = r"kernel 4 of cuda/paged_mqa_logits.cu \(.*\) cannot run these inputs: .*has compute capability 10\.0"
    with pytest.raises(ValueError, match=refusal):
        TABLE.choose(4, {4: fp8.wgmma_why_not("cuda:0")})


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", TABLE.versions)
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
    ref = paged.paged_mqa_logits(*(t.cpu() for t in (q, kv_cache, w, ctx, bt, meta)), max_len)
    out = compare.poisoned((len(context_lens) * next_n, max_len), torch.float32, "cuda")
    assert paged.paged_mqa_logits_cuda(q, kv_cache, w, ctx, bt, meta, max_len, True, out=out, kernel=kernel) is out
    # same tolerance and reasoning as test_fp8.test_mqa_logits_cuda_matches_reference
    scale = ref[torch.isfinite(ref)].abs().max().item()
    compare.assert_close(out, ref, atol=1e-3 * scale, max_calc_diff=1e-6, name=f"paged logits, kernel {kernel}")
    raw = torch.full_like(ref, float("-inf"), dtype=torch.float64)
    raw[:, :3001] = dense_logits(batch, next_n, raw=True)
    compare.assert_close(out, raw, atol=float("inf"), max_calc_diff=1e-3, name="paged logits vs unquantised")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", TABLE.versions)
@pytest.mark.parametrize("next_n, H", [(2, 64), (1, 64), (2, 32), (1, 32)])
def test_paged_cuda_unclean_defines_context_positions(kernel, next_n, H):
    skip_unless_available(kernel)
    batch = make_batch([129, 7, 256], next_n=next_n, H=H, seed=20)
    q, kv_cache, w, ctx, bt, meta, _ = call_args(batch, num_sms=4, device="cuda")
    ref = paged.paged_mqa_logits(*(t.cpu() for t in (q, kv_cache, w, ctx, bt, meta)), 300)
    out = compare.poisoned((3 * next_n, 300), torch.float32, "cuda")
    paged.paged_mqa_logits_cuda(q, kv_cache, w, ctx, bt, meta, 300, False, out=out, kernel=kernel)
    out = out.cpu()
    for b, c in enumerate([129, 7, 256]):  # p < context_len is defined: values and -inf alike
        rows = slice(next_n * b, next_n * b + next_n)
        scale = ref[rows, :c][torch.isfinite(ref[rows, :c])].abs().max().item()
        compare.assert_close(out[rows, :c], ref[rows, :c], atol=1e-3 * scale, max_calc_diff=1e-6)


# ragged per-row lengths for the GPU tests: rows of a sequence need not grow with j; zeros, a row of
# a full block table, partial blocks and 256-token segment edges
PER_ROW_LENS = [[0, 130], [200, 0], [5, 5], [0, 0], [64, 65], [1000, 999], [256, 513], [1, 2], [3001, 17]]


@pytest.mark.gpu
@pytest.mark.parametrize("logits_dtype", fp8.LOGITS_DTYPES)
@pytest.mark.parametrize("form", ["[B]", "[B, next_n]"])
@pytest.mark.parametrize("kernel", TABLE.versions)
@pytest.mark.parametrize("next_n, H", [(1, 64), (2, 64), (2, 32)])
def test_paged_cuda_both_forms_of_context_lens_and_both_dtypes(next_n, H, kernel, form, logits_dtype):
    # every kernel x {context_lens [B], [B, next_n]} x {float32, bfloat16}, clean_logits both ways, into
    # poisoned buffers, against the reference. float32: the tolerance of test_paged_cuda_matches_reference;
    # bfloat16: assert_bf16_logits (bit for bit the float32 kernel's logits rounded, so bit for bit the
    # reference's bf16 logits wherever the float32 kernel equals the float32 reference bit for bit, and
    # within that tolerance plus a bf16 ulp elsewhere)
    skip_unless_available(kernel)
    per_row_lens = torch.tensor(PER_ROW_LENS, dtype=torch.int32)[:, 2 - next_n:]  # [B, next_n]
    longest = per_row_lens.amax(1)
    batch = make_batch(longest.tolist(), next_n=next_n, H=H, seed=50 + next_n)
    lens = per_row_lens if form == "[B, next_n]" else longest  # the [B] form: rows context_len - next_n + j + 1
    q, kv_cache, w, bt = batch["q"], batch["kv_cache"], batch["weights"], batch["block_table"]
    meta = paged.paged_mqa_logits_metadata(lens, 64, 7)
    max_len = 3029  # wider than any context: the clean fill must reach the end of every row
    ref_f32 = paged.paged_mqa_logits(q, kv_cache, w, lens, bt, meta, max_len)
    ref = paged.paged_mqa_logits(q, kv_cache, w, lens, bt, meta, max_len, logits_dtype=logits_dtype)
    if form == "[B, next_n]":  # row (b, j) sees exactly p < lens[b, j]
        assert torch.equal(torch.isfinite(ref_f32), torch.arange(max_len) < per_row_lens.reshape(-1, 1))
    scale = ref_f32[torch.isfinite(ref_f32)].abs().max().item()
    args = [t.cuda() for t in (q, kv_cache, w, lens, bt, meta)] + [max_len]
    rows = len(PER_ROW_LENS) * next_n
    for clean in (True, False):
        name = f"paged kernel {kernel} next_n={next_n} H={H} {form} {logits_dtype} clean={clean}"
        out = compare.poisoned((rows, max_len), logits_dtype, "cuda")
        assert paged.paged_mqa_logits_cuda(*args, clean, kernel=kernel, out=out, logits_dtype=logits_dtype) is out
        fresh = paged.paged_mqa_logits_cuda(*args, clean, kernel=kernel, logits_dtype=logits_dtype)
        assert fresh.dtype == logits_dtype and fresh.shape == (rows, max_len)
        # unclean: every p below the sequence's longest row is defined (values and -inf alike)
        where = None if clean else torch.arange(max_len) < longest.repeat_interleave(next_n).unsqueeze(-1)
        if logits_dtype == torch.float32:
            compare.assert_close(out if clean else out.cpu()[where], ref if clean else ref[where], atol=1e-3 * scale,
                                 max_calc_diff=1e-6, name=name)
        else:
            out_f32 = compare.poisoned((rows, max_len), torch.float32, "cuda")
            paged.paged_mqa_logits_cuda(*args, clean, kernel=kernel, out=out_f32)
            assert_bf16_logits(out, out_f32, ref, ref_f32, atol=1e-3 * scale, name=name, where=where)


@pytest.mark.gpu
def test_paged_default_and_errors_on_gpu():
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _bad_paged().items()}
    out = paged.paged_mqa_logits_cuda(*args.values())
    assert out.is_cuda and out.shape == (2, 70)
    best = 5 if fp8.wgmma_why_not(torch.device("cuda")) is None else 3
    assert torch.equal(out, paged.paged_mqa_logits_cuda(**args, kernel=best))
    with checks.data_checks(True):  # device data: checked only when asked for
        with pytest.raises(ValueError, match="block id"):
            paged.paged_mqa_logits_cuda(**{**args, "block_table": _table([0, 1, -1], [-5, -1, -1]).cuda()})
        with pytest.raises(ValueError, match="schedule_meta does not match"):
            paged.paged_mqa_logits_cuda(**{**args, "schedule_meta": paged.paged_mqa_logits_metadata(
                torch.tensor([700, 10], dtype=torch.int32, device="cuda"), 64, 2)})
        with pytest.raises(ValueError, match="context_lens must be <= 70"):
            paged.paged_mqa_logits_cuda(**{**args, "context_lens": args["context_lens"] + 1})
        with pytest.raises(ValueError, match="needs 4 blocks"):  # a row of block_table maps 3 blocks
            paged.paged_mqa_logits_cuda(**{**args, "context_lens": args["context_lens"] * 3, "max_context_len": 210})
    with pytest.raises(ValueError, match="kernel must be None or a version"):
        paged.paged_mqa_logits_cuda(**args, kernel=7)
    # every kernel copies q and the cache in 16-byte pieces: a view at an address 8 bytes past a
    # 16-byte boundary is refused before any launch, by every kernel
    for name in ("q", "kv_cache"):
        x = args[name]
        shifted = torch.empty(x.numel() * x.element_size() + 8, dtype=torch.uint8, device="cuda")[8:]
        shifted = shifted.view(x.dtype).view(x.shape)
        shifted.copy_(x)
        assert shifted.data_ptr() % 16 == 8 and shifted.is_contiguous()
        for kernel in (None, *paged.PAGED_MQA_LOGITS_KERNELS.versions):
            with pytest.raises(ValueError, match=f"{name} must start at a 16-byte aligned address"):
                paged.paged_mqa_logits_cuda(**{**args, name: shifted}, kernel=kernel)
    # kernel 5 reads the weights through a TMA tensor map: weights 4 bytes past a 16-byte boundary are
    # refused by it, and the default takes kernel 4 (the same logits, bit for bit)
    if fp8.wgmma_why_not(torch.device("cuda")) is None:
        w = args["weights"]
        w_shifted = torch.empty(w.numel() + 1, device="cuda")[1:].view(w.shape)
        w_shifted.copy_(w)
        assert w_shifted.data_ptr() % 16 == 4
        with pytest.raises(ValueError, match="kernel 5 of cuda/paged_mqa_logits.cu .*16-byte aligned"):
            paged.paged_mqa_logits_cuda(**{**args, "weights": w_shifted}, kernel=5)
        assert torch.equal(paged.paged_mqa_logits_cuda(**{**args, "weights": w_shifted}), out)
    with pytest.raises(TypeError, match="out must be bfloat16, got float32"):  # out in the dtype asked for
        paged.paged_mqa_logits_cuda(**args, out=torch.empty(2, 70, device="cuda"), logits_dtype=torch.bfloat16)
    # the per-row form: checked on the device data only with data checks on, as the [B] form
    per_row = _table([70], [10]).cuda()
    assert torch.equal(paged.paged_mqa_logits_cuda(**{**args, "context_lens": per_row}), out)  # next_n = 1: the same
    with checks.data_checks(True):
        with pytest.raises(ValueError, match="context_lens must be <= 70"):
            paged.paged_mqa_logits_cuda(**{**args, "context_lens": per_row + 1})


@pytest.mark.gpu
def test_paged_cuda_refuses_wgmma_where_it_does_not_run(monkeypatch):
    pretend_no_wgmma(monkeypatch)
    batch = make_batch([129, 0, 70], next_n=2, H=64, seed=21)
    q, kv_cache, w, ctx, bt, meta, max_len = call_args(batch, num_sms=3, device="cuda")
    out = compare.poisoned((6, max_len), torch.float32, "cuda")
    refusal = r"kernel 4 of cuda/paged_mqa_logits.cu .*capability 9\.0 .*has compute capability \d+\.\d+"
    with pytest.raises(ValueError, match=refusal):
        paged.paged_mqa_logits_cuda(q, kv_cache, w, ctx, bt, meta, max_len, out=out, kernel=4)
    with pytest.raises(ValueError, match=refusal.replace("kernel 4", "kernel 5")):
        paged.paged_mqa_logits_cuda(q, kv_cache, w, ctx, bt, meta, max_len, out=out, kernel=5)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()  # refused before any launch
    ref = paged.paged_mqa_logits(*(t.cpu() for t in (q, kv_cache, w, ctx, bt, meta)), max_len)
    scale = ref[torch.isfinite(ref)].abs().max().item()
    compare.assert_close(paged.paged_mqa_logits_cuda(q, kv_cache, w, ctx, bt, meta, max_len), ref,
                         atol=1e-3 * scale, max_calc_diff=1e-6)  # kernel 3, the best without wgmma


@pytest.mark.gpu
def test_metadata_on_the_gpu_is_sync_free_and_capturable():
    # paged_mqa_logits_metadata on GPU tensors: no device-to-host copy (q, r = divmod(total, num_sms)
    # stay tensors), the same schedule as on the CPU, and it can be captured in a CUDA graph
    lens = torch.tensor([300, 4000, 70, 2600, 0, 1200, 65536, 1], dtype=torch.int32)
    num_sms = paged.schedule_size()
    static = lens.cuda()
    with checks.data_checks(False):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            meta = paged.paged_mqa_logits_metadata(static, 64, num_sms)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(meta.cpu(), paged.paged_mqa_logits_metadata(lens, 64, num_sms))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            paged.paged_mqa_logits_metadata(static, 64, num_sms)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = paged.paged_mqa_logits_metadata(static, 64, num_sms)
        for seed in (1, 2):  # new lengths in the same buffer, then the replay
            fresh = torch.randint(0, 40000, (8,), generator=torch.Generator().manual_seed(seed)).int()
            static.copy_(fresh)
            graph.replay()
            assert torch.equal(captured.cpu(), paged.paged_mqa_logits_metadata(fresh, 64, num_sms))
        # the per-row form [B, next_n]: the longest row of each sequence (an amax on the device), still
        # without a device-to-host copy, and capturable
        per_row = torch.stack([lens, (lens - 300).clamp(min=0)], dim=1).flip(1).contiguous()  # [8, 2]
        static2 = per_row.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            meta2 = paged.paged_mqa_logits_metadata(static2, 64, num_sms)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(meta2.cpu(), paged.paged_mqa_logits_metadata(per_row, 64, num_sms))
        assert torch.equal(meta2, meta)  # the same longest rows as lens
        with torch.cuda.stream(side):
            paged.paged_mqa_logits_metadata(static2, 64, num_sms)
        torch.cuda.current_stream().wait_stream(side)
        graph2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph2):
            captured2 = paged.paged_mqa_logits_metadata(static2, 64, num_sms)
        for seed in (3, 4):
            fresh = torch.randint(0, 40000, (8, 2), generator=torch.Generator().manual_seed(seed)).int()
            static2.copy_(fresh)
            graph2.replay()
            assert torch.equal(captured2.cpu(), paged.paged_mqa_logits_metadata(fresh, 64, num_sms))


def wild_batch(next_n, H, seed):
    """A batch whose block table is full of valid ids (so that a context clipped longer or shorter reads
    real blocks), with every kind of invalid context length: negative, past max_context_len, longer
    than its table row, and the int32 extremes, mixed with valid ones."""
    batch = make_batch([65, 250, 7, 129, 0, 200, 64, 1], next_n=next_n, H=H, seed=seed, max_blocks=4)
    num_blocks = batch["kv_cache"].shape[0]
    g = torch.Generator().manual_seed(seed)
    unused = batch["block_table"] < 0
    batch["block_table"][unused] = torch.randint(0, num_blocks, (int(unused.sum()),), generator=g).int()
    # the slots no context stores hold random bytes; a clipped context reads them: make them finite keys
    flat = batch["kv_cache"].view(num_blocks, -1)
    values, scales = flat[:, : 64 * 128], flat[:, 64 * 128:].view(torch.float32)
    values[(values & 0x7F) == 0x7F] = 0  # the e4m3fn NaN bytes
    scales[~torch.isfinite(scales) | (scales.abs() > 1) | (scales.abs() < 1e-6)] = 2.0 ** -4
    scales.abs_()  # scales are positive (act_quant's): the kernels apply ReLU before the scale, the reference after
    lens = torch.tensor([65, 300, -5, 2 ** 31 - 1, -(2 ** 31), 200, 1000, 1], dtype=torch.int32)
    return batch, lens


@pytest.mark.gpu
@pytest.mark.parametrize("logits_dtype", fp8.LOGITS_DTYPES)
@pytest.mark.parametrize("form", ["[B]", "[B, next_n]"])
@pytest.mark.parametrize("clean", [True, False])
@pytest.mark.parametrize("kernel", TABLE.versions)
@pytest.mark.parametrize("next_n, H", [(1, 64), (2, 32)])
def test_paged_cuda_wild_values_with_data_checks_off(kernel, next_n, H, clean, form, logits_dtype):
    # data checks off (the default): nothing reads context_lens, block_table or schedule_meta on the
    # host, and the kernels clip every value they take from them (compute-sanitizer:
    # benchmarks/sanitize_fp8.py). Checked here: no access outside `out` (guard rows stay NaN), and
    # what each invalid value produces, as paged_mqa_logits_cuda documents; for both forms of
    # context_lens (the per-row one: each row's length clipped, wild values in either row) and both
    # storage types of the logits (bfloat16: the float32 tolerance plus one bf16 ulp, see
    # test_fp8.assert_bf16_logits).
    skip_unless_available(kernel)
    batch, lens = wild_batch(next_n, H, seed=30 + next_n)
    max_len, max_blocks = 250, 4  # a table row maps 256 tokens: some contexts fit it, not max_len
    num_blocks = batch["kv_cache"].shape[0]
    if form == "[B, next_n]":  # wild values in both rows: negative, past max_len, past the table row, extremes
        other = torch.tensor([-5, 7, 300, 3, 2 ** 31 - 1, 199, 257, -(2 ** 31)], dtype=torch.int32)
        lens = torch.stack([other, lens], dim=1)[:, 2 - next_n:].contiguous()  # [8, next_n]
    clipped = lens.long().clamp(0, min(max_len, 64 * max_blocks)).int()  # each length (row) clipped
    longest = clipped.amax(1) if clipped.dim() == 2 else clipped  # the context a sequence's walk covers
    inside = torch.arange(max_len) < longest.long().repeat_interleave(next_n).unsqueeze(-1)  # defined unclean
    q, kv_cache, w, bt = (batch[k].cuda() for k in ("q", "kv_cache", "weights", "block_table"))
    rows = 8 * next_n

    def run(lens_, table_, meta_, cache_=kv_cache, clean_=clean):
        guard = compare.poisoned((rows + 2, max_len), logits_dtype, "cuda")  # a NaN row on each side
        with checks.data_checks(False):
            paged.paged_mqa_logits_cuda(q, cache_, w, lens_.cuda(), table_.cuda(), meta_.cuda(), max_len, clean_,
                                        kernel=kernel, out=guard[1:-1], logits_dtype=logits_dtype)
        torch.cuda.synchronize()
        assert torch.isnan(guard[0]).all() and torch.isnan(guard[-1]).all(), "a write outside out"
        return guard[1:-1].cpu()

    def reference(lens_, table_):
        return paged.paged_mqa_logits(batch["q"], batch["kv_cache"], batch["weights"], lens_, table_,
                                      None, max_len, logits_dtype=logits_dtype)

    rtol = 2.0 ** -7 if logits_dtype == torch.bfloat16 else 0.0

    def assert_matches(out, ref, name):
        finite = torch.isfinite(ref)
        scale = ref[finite].abs().max().item() if finite.any() else 1.0
        if clean:
            compare.assert_close(out, ref, atol=1e-3 * scale, rtol=rtol, max_calc_diff=1e-6, name=name)
        else:  # positions below each clipped context (its longest row) are defined
            compare.assert_close(out[inside], ref[inside], atol=1e-3 * scale, rtol=rtol, max_calc_diff=1e-6,
                                 name=name)

    # 1. wild context lengths (schedule from the clipped ones): each computed as its clipped length
    meta = paged.paged_mqa_logits_metadata(clipped, 64, 5)
    assert_matches(run(lens, batch["block_table"], meta), reference(clipped, batch["block_table"]),
                   f"kernel {kernel}, wild context_lens {form}")
    # 2. wild block ids, used ones among them: each read as the id clipped to [0, num_blocks)
    table = batch["block_table"].clone()
    table[0, 0], table[1, 1], table[3, 2], table[5, 3] = -1, num_blocks, -(2 ** 31), 2 ** 31 - 1
    assert_matches(run(clipped, table, meta), reference(clipped, table.clamp(0, num_blocks - 1)),
                   f"kernel {kernel}, wild block ids")
    # 3. schedules that do not match the lengths, or hold wild values: whatever a block of the grid
    # writes is right (NaN elsewhere: unwritten), and nothing is written outside out
    ref = reference(clipped, batch["block_table"])
    g = torch.Generator().manual_seed(kernel)
    for bad_meta in (paged.paged_mqa_logits_metadata(torch.full((8,), 2000, dtype=torch.int32), 64, 5),
                     paged.paged_mqa_logits_metadata(torch.zeros(8, dtype=torch.int32), 64, 5),
                     torch.randint(-2 ** 31, 2 ** 31 - 1, (6, 2), generator=g, dtype=torch.int64).int(),
                     torch.randint(-3, 12, (6, 2), generator=g).int(),
                     torch.tensor([[0, 0], [8, 0], [-1, -1], [3, 2 ** 30], [2 ** 31 - 1, 5], [8, 0]], dtype=torch.int32)):
        out = run(lens, batch["block_table"], bad_meta)
        written = ~torch.isnan(out)
        if clean:  # the -inf fill past each context does not depend on the schedule
            assert written[~inside].all()
        scale = ref[torch.isfinite(ref)].abs().max().item()
        compare.assert_close(out[written], ref[written], atol=1e-3 * scale, rtol=rtol,
                             name=f"kernel {kernel}, wild schedule")
    # 4. an empty cache: nothing to read, every context counts as empty
    empty = torch.zeros(0, 64, 1, 132, dtype=torch.uint8, device="cuda")
    out = run(lens, batch["block_table"], meta, cache_=empty, clean_=True)
    assert torch.isneginf(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", TABLE.versions)
def test_paged_cuda_with_an_empty_batch_or_width(kernel):
    skip_unless_available(kernel)
    batch = make_batch([65, 3], next_n=1, H=64, seed=40)
    q, kv_cache, w, ctx, bt, meta, _ = call_args(batch, num_sms=3, device="cuda")
    zeros = torch.zeros_like(ctx)  # max_context_len 0: only empty contexts are valid
    width0 = paged.paged_mqa_logits_cuda(q, kv_cache, w, zeros, bt, paged.paged_mqa_logits_metadata(zeros, 64, 3), 0,
                                         kernel=kernel)
    assert width0.shape == (2, 0)
    empty = paged.paged_mqa_logits_cuda(q[:0], kv_cache, w[:0], ctx[:0], bt[:0],
                                        paged.paged_mqa_logits_metadata(ctx[:0], 64, 3), 70, kernel=kernel)
    assert empty.shape == (0, 70)


# ---------------------------------------------------------------------------------- kernel 3 on the CPU


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


def _context_len(lens_b, limit):
    """context_len_of of the .cu: a sequence's context, its longest row, clipped to [0, limit]; lens_b is
    context_lens[b] (the [B] form) or the list context_lens[b, :] (the [B, next_n] form)."""
    return min(max(lens_b, 0), limit) if isinstance(lens_b, int) else min(max([0, *lens_b]), limit)


def _segment_block(segment, max_blocks):
    """segment_block of the .cu: the logical block where a segment starts, clipped to [0, max_blocks]."""
    return min(max(segment, 0) * 4, max_blocks)


def _v3_walk(context_lens, meta, next_n, warps, max_blocks=1 << 40, limit=1 << 40):
    """Kernel 3's walk over the schedule, as the CUDA code does it (the clipping of wild values
    included: first_run, context_len_of, segment_block): per block of the grid its runs (one batch
    each), the run's 32-key units, unit u = warp + warps i of warp `warp`. Returns every (row,
    position) stored and every block-table index read. context_lens: a list of ints ([B] form) or of
    lists ([B, next_n] form)."""
    B = len(context_lens)
    stored, table_reads = [], []
    for bid in range(len(meta) - 1):
        start_b, start_seg = max(meta[bid][0], 0), meta[bid][1]
        end_b, end_seg = meta[bid + 1]
        b = start_b
        while b < B and (b < end_b or (b == end_b and end_seg > 0)):
            ctx = _context_len(context_lens[b], limit)
            n_blocks = (ctx + 63) // 64
            n_begin = _segment_block(start_seg, max_blocks) if b == start_b else 0
            n_end = min(_segment_block(end_seg, max_blocks), n_blocks) if b == end_b else n_blocks
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


def _cursor_walk(context_lens, meta, next_n, max_blocks, limit):
    """Kernels 1 and 2's walk (schedule_bounds, settle, inside), clipping included: every (row,
    position) stored and every block-table index read."""
    B = len(context_lens)
    blocks_of = [(_context_len(c, limit) + 63) // 64 for c in context_lens]
    stored, table_reads = [], []
    for bid in range(len(meta) - 1):
        b, n = max(meta[bid][0], 0), _segment_block(meta[bid][1], max_blocks)
        end_b, end_n = meta[bid + 1][0], _segment_block(meta[bid + 1][1], max_blocks)
        while b < B and n >= blocks_of[b]:  # settle
            b, n = b + 1, 0
        while b < B and (b < end_b or (b == end_b and n < end_n)):  # inside
            table_reads.append((b, n))
            ctx = _context_len(context_lens[b], limit)
            stored += [(b * next_n + j, p) for j in range(next_n) for p in range(n * 64, min(n * 64 + 64, ctx))]
            n += 1
            while b < B and n >= blocks_of[b]:
                b, n = b + 1, 0
    return stored, table_reads


@pytest.mark.parametrize("num_sms", [1, 2, 7, 264])
def test_walks_write_every_context_position_once(num_sms):
    context_lens = [1, 63, 64, 65, 0, 300, 1000, 2, 513, 32, 33]
    meta = paged.paged_mqa_logits_metadata(torch.tensor(context_lens, dtype=torch.int32), 64, num_sms).tolist()
    for next_n in (1, 2):
        expected = [(b * next_n + j, p) for b, c in enumerate(context_lens) for j in range(next_n) for p in range(c)]
        for stored, reads in (_v3_walk(context_lens, meta, next_n, TABLE.defines()["K3_WARPS"]),
                              _cursor_walk(context_lens, meta, next_n, 16, 1 << 40)):
            assert sorted(stored) == sorted(expected)  # each once, nothing past a context
            assert all(n < (context_lens[b] + 63) // 64 for b, n in reads)  # only blocks of the context
    # the per-row form [B, 2]: a sequence's walk covers its longest row, whichever row that is
    per_row = [[c, max(c - 70, 0)] if b % 2 else [max(c - 5, 0), c] for b, c in enumerate(context_lens)]
    meta2 = paged.paged_mqa_logits_metadata(torch.tensor(per_row, dtype=torch.int32), 64, num_sms).tolist()
    assert meta2 == meta
    expected = [(2 * b + j, p) for b, c in enumerate(context_lens) for j in range(2) for p in range(c)]
    for stored, reads in (_v3_walk(per_row, meta2, 2, TABLE.defines()["K3_WARPS"]),
                          _cursor_walk(per_row, meta2, 2, 16, 1 << 40)):
        assert sorted(stored) == sorted(expected)
        assert all(n < (context_lens[b] + 63) // 64 for b, n in reads)


@pytest.mark.parametrize("seed", range(8))
def test_walks_stay_in_bounds_for_wild_values(seed):
    # the clipping the kernels do on context_lens and schedule_meta (data checks off), mirrored: whatever
    # the values, every block-table read is inside [0, B) x [0, max_blocks) and every store inside
    # [0, B next_n) x [0, max_context_len)
    g = torch.Generator().manual_seed(seed)
    B, max_blocks, max_len, next_n = 6, 5, 300, 1 + seed % 2
    extremes = torch.tensor([-(2 ** 31), 2 ** 31 - 1, -1, 0, 1, 319, 320, 321], dtype=torch.int64)
    lens = torch.where(torch.rand(B, generator=g) < 0.5, torch.randint(-500, 1000, (B,), generator=g),
                       extremes[torch.randint(0, 8, (B,), generator=g)]).tolist()
    metas = [torch.randint(-3, 9, (5, 2), generator=g).tolist(),
             torch.randint(-(2 ** 31), 2 ** 31 - 1, (5, 2), generator=g).tolist(),
             extremes[torch.randint(0, 8, (5, 2), generator=g)].tolist(),
             paged.paged_mqa_logits_metadata(torch.tensor(lens).clamp(0, 2 ** 20).int(), 64, 4).tolist()]
    limit = min(max_len, 64 * max_blocks)
    # and the per-row form [B, next_n]: wild values in any row
    other = torch.where(torch.rand(B, generator=g) < 0.5, torch.randint(-500, 1000, (B,), generator=g),
                        extremes[torch.randint(0, 8, (B,), generator=g)]).tolist()
    per_row = [[o, c][2 - next_n:] for o, c in zip(other, lens)]
    for meta in metas:
        for walk_lens in (lens, per_row):
            for stored, reads in (_v3_walk(walk_lens, meta, next_n, TABLE.defines()["K3_WARPS"], max_blocks, limit),
                                  _cursor_walk(walk_lens, meta, next_n, max_blocks, limit)):
                assert all(0 <= b < B and 0 <= n < max_blocks for b, n in reads)
                assert all(0 <= row < B * next_n and 0 <= p < max_len for row, p in stored)


def test_row_lengths_make_the_per_row_form():
    """The [B] form per draft row: row (b, j) sees p < context_lens[b] - next_n + j + 1 (at least 0); the
    [B, next_n] form is returned as it is."""
    lens = torch.tensor([5, 1, 0], dtype=torch.int32)
    assert paged.row_lengths(lens, 2).tolist() == [[4, 5], [0, 1], [0, 0]]
    assert paged.row_lengths(lens, 1).tolist() == [[5], [1], [0]]
    per_row = torch.tensor([[3, 9]], dtype=torch.int32)
    assert paged.row_lengths(per_row, 2) is per_row
