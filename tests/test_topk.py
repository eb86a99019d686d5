"""Top-k selection: the rules (ties, +-0, NaN, -inf, causality), the leak, bad input, the kernel."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_tutorial import checks, compare
from dsa_tutorial.topk import (SELECT_TOPK_KERNELS, order_key, select_topk, select_topk_cuda,
                               list_capacity, select_topk_default, select_topk_why_not, shared_bytes,
                               topk_without_causal_mask)

NAN, INF = float("nan"), float("inf")


def brute_force_topk(row: list[float], k: int, last: int) -> list[int]:
    """The rules with Python lists: candidates s <= last with a number as score, ranked by
    (value descending, position ascending), +0 == -0; the first k, in increasing position, -1 padded."""
    candidates = [(-(v + 0.0), s) for s, v in enumerate(row[: last + 1]) if v == v]
    chosen = sorted(s for _, s in sorted(candidates)[:k])
    return chosen + [-1] * (k - len(chosen))


def check_against_brute_force(scores, k, positions=None):
    out = select_topk(scores, k, positions)
    T, S = scores.shape[-2:]
    last = positions.tolist() if positions is not None else list(range(S - T, S))
    rows = scores.reshape(-1, T, S)
    flat = out.reshape(-1, T, k)
    for b in range(rows.shape[0]):
        for t in range(T):
            assert flat[b, t].tolist() == brute_force_topk(rows[b, t].tolist(), k, last[t]), (b, t)
    return out


def test_order_key_preserves_order():
    values = torch.tensor([-INF, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, INF])
    keys = order_key(values)
    assert keys[3] == keys[4]  # -0 and +0 are one value
    strictly = torch.cat([keys[:4], keys[5:]])  # without the duplicate zero, strictly increasing
    assert bool((strictly[1:] > strictly[:-1]).all())
    assert order_key(torch.tensor([NAN, -NAN])).tolist() == [0, 0]
    assert int(keys[0]) == 0x007FFFFF and int(keys[-1]) == 0xFF800000
    torch.manual_seed(0)
    x = torch.randn(1000) * 10 ** torch.randint(-30, 30, (1000,)).float()
    order = x.argsort()
    assert bool((order_key(x)[order].diff() >= 0).all())


def test_matches_torch_topk_without_ties():
    torch.manual_seed(1)
    scores = torch.randn(6, 500)
    out = select_topk(scores, 37, torch.full((6,), 499))
    expected = scores.topk(37, dim=-1).indices.sort(dim=-1).values
    assert out.dtype == torch.int32 and torch.equal(out.long(), expected)


def test_ties_lower_position_wins_and_signed_zeros():
    scores = torch.tensor([[1.0, 0.0, -0.0, 2.0, 0.0, 2.0, -0.0]])
    # 2.0 at 3 and 5; then 1.0 at 0; then the zeros 1, 2, 4, 6: the lowest win
    assert select_topk(scores, 5, torch.tensor([6])).tolist() == [[0, 1, 2, 3, 5]]
    assert select_topk(scores, 2, torch.tensor([6])).tolist() == [[3, 5]]
    assert select_topk(scores, 1, torch.tensor([6])).tolist() == [[3]]


def test_nan_is_never_selected_and_inf_is_a_score():
    scores = torch.tensor([[NAN, -INF, 1.0, NAN, INF, -INF]])
    assert select_topk(scores, 3, torch.tensor([5])).tolist() == [[1, 2, 4]]
    assert select_topk(scores, 6, torch.tensor([5])).tolist() == [[1, 2, 4, 5, -1, -1]]
    assert select_topk(torch.full((2, 4), NAN), 2, torch.tensor([3, 3])).tolist() == [[-1, -1], [-1, -1]]


def test_causal_prefill_pads_with_minus_one():
    torch.manual_seed(2)
    T = S = 40
    k = 16
    out = select_topk(torch.randn(3, T, S), k)
    positions = torch.arange(T)[None, :, None]
    assert bool((out <= positions).all())  # the causal mask holds after selection
    n_padded = (out == -1).sum(-1)  # query t sees t + 1 positions
    assert n_padded.tolist() == [[max(0, k - (t + 1)) for t in range(T)]] * 3
    valid = out[out >= 0]
    assert bool((valid >= 0).all())


def test_against_brute_force_with_many_ties():
    torch.manual_seed(3)
    scores = torch.randint(-2, 3, (2, 9, 23)).float()
    scores[0, 0, :5] = NAN
    scores[1, 3, 2] = -INF
    scores[1, 4] = -scores[1, 4]  # negative zeros
    check_against_brute_force(scores, 7)
    check_against_brute_force(scores, 23, torch.arange(9) + 14)
    check_against_brute_force(scores[0], 1, torch.tensor([0, 22, 5, 5, 9, 1, 0, 3, 7]))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_property_against_brute_force(data):
    T = data.draw(st.integers(1, 5))
    S = data.draw(st.integers(T, 30))
    k = data.draw(st.integers(1, S))
    values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, NAN, INF, -INF, 3.25])
    rows = data.draw(st.lists(st.lists(values, min_size=S, max_size=S), min_size=T, max_size=T))
    positions = torch.tensor(data.draw(st.lists(st.integers(0, S - 1), min_size=T, max_size=T)))
    check_against_brute_force(torch.tensor(rows, dtype=torch.float32), k, positions)


def test_the_leak_of_topk_without_the_mask():
    torch.manual_seed(4)
    T = S = 12
    k = 4
    scores = torch.randn(T, S).masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), -INF)
    leaky = topk_without_causal_mask(scores, k)
    future = leaky > torch.arange(T)[:, None]
    # rows t < k - 1 see fewer than k tokens: torch.topk fills the rest with future ones
    assert future.any(dim=-1).tolist() == [t < k - 1 for t in range(T)]
    safe = select_topk(scores, k)
    assert not bool((safe > torch.arange(T)[:, None]).any())


@pytest.mark.parametrize("k, match", [(0, "positive"), (-3, "positive"), (11, "larger than the sequence"),
                                      (2.0, "must be an int"), (True, "must be an int")])
def test_bad_k(k, match):
    with pytest.raises((ValueError, TypeError), match=match):
        select_topk(torch.randn(4, 10), k)


def test_bad_scores_and_positions():
    with pytest.raises(TypeError, match="float32"):
        select_topk(torch.randn(4, 10, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match=r"\[..., T, S\]"):
        select_topk(torch.randn(10), 2)
    with pytest.raises(ValueError, match="more queries"):
        select_topk(torch.randn(12, 10), 2)
    with pytest.raises(ValueError, match="query_positions must have shape"):
        select_topk(torch.randn(4, 10), 2, torch.arange(3))
    with pytest.raises(ValueError, match="<= 9"):
        select_topk(torch.randn(4, 10), 2, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=">= 0"):
        select_topk(torch.randn(4, 10), 2, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="must be on"):
        select_topk(torch.randn(4, 10), 2, torch.arange(4, device="meta"))


def test_the_kernel_table_and_its_limits_come_from_the_cu_file():
    assert SELECT_TOPK_KERNELS.versions == (1, 2, 3, 4)
    assert [k.entry for k in SELECT_TOPK_KERNELS] == ["select_topk_four_passes", "select_topk_compact",
                                                      "select_topk_shared", "select_topk_sampled"]
    limits = SELECT_TOPK_KERNELS.defines()
    assert (limits["TOPK_THREADS"], limits["TOPK_MAX_K"], limits["TOPK_MAX_S"]) == (1024, 2048, 1 << 20)
    # kernel 2's list and the 8 KiB histogram fit the 227 KiB of shared memory a Hopper block may use
    assert limits["TOPK_LIST_MAX"] * limits["TOPK_LIST_ENTRY_BYTES"] + 4 * limits["RADIX_BINS"] <= 227 * 1024
    # kernel 4: its list holds at least k entries (a row with fewer candidates is taken whole)
    assert limits["TOPK_MAX_K"] <= limits["TOPK_SAMPLED_LIST"] <= limits["TOPK_LIST_MAX"]
    # kernel 3: the longest row's keys and the histogram fit; per-warp counts are packed in 16 bits
    most = limits["TOPK_SMEM_MAX_S"]
    assert shared_bytes(3, most) + 1024 <= 227 * 1024 and most % 4 == 0 and most < 2**16
    assert limits["RADIX_BINS"] % limits["TOPK_SMEM_THREADS"] == 0 and limits["TOPK_SMEM_THREADS"] % 32 == 0


def test_the_default_kernel_and_what_each_kernel_takes():
    limits = SELECT_TOPK_KERNELS.defines()
    most, one_block = limits["TOPK_SMEM_MAX_S"], limits["TOPK_ONE_BLOCK_S"]
    assert one_block <= most
    for n_keys, expected in [(1, 3), (8192, 3), (one_block, 3), (one_block + 1, 4), (65536, 4), (131072, 4),
                             (limits["TOPK_MAX_S"], 4)]:
        assert select_topk_default(n_keys) == expected, n_keys
    assert select_topk_why_not(most) == {1: None, 2: None, 3: None, 4: None}
    assert "rows of at most" in select_topk_why_not(most + 1)[3]
    assert [v for v, why in select_topk_why_not(most + 1).items() if why is None] == [1, 2, 4]


def test_shared_memory_requests():
    limits = SELECT_TOPK_KERNELS.defines()
    # kernel 3: the histogram and the row's keys, rounded up to float4s, plus 4 slots of alignment
    for n_keys in (1, 3, 4, 5, 8191, 8192, limits["TOPK_SMEM_MAX_S"]):
        assert shared_bytes(3, n_keys) >= 4 * (limits["RADIX_BINS"] + n_keys + 3)
    # kernels 2 and 4: never more entries than the row has scores, never more than their limit
    assert list_capacity(2, 100) == 100 and list_capacity(2, 10**6) == limits["TOPK_LIST_MAX"]
    assert list_capacity(4, 100) == 100 and list_capacity(4, 10**6) == limits["TOPK_SAMPLED_LIST"]


def test_cuda_wrapper_rejects_cpu_tensors_before_any_launch():
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        select_topk_cuda(torch.randn(4, 10), 2)


# ----------------------------------------------------------------------------- GPU

def _gpu_case(shape, seed, ties=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if ties:  # few distinct values: every selection boundary falls in a long run of equal scores
        scores = torch.randint(-3, 4, shape, device="cuda", generator=gen).float()
        scores[..., ::7] = -scores[..., ::7]  # -0.0 among the +0.0
    else:
        scores = torch.randn(shape, device="cuda", generator=gen)
    scores[..., 3::101] = NAN
    scores[..., 5::211] = -INF
    scores[..., 8::307] = INF
    return scores.contiguous()


def _skip_unless_runs(kernel, n_keys):
    """Kernels 3 and 4 take rows up to their shared memory: elsewhere the call must refuse, clearly."""
    reason = select_topk_why_not(n_keys)[kernel]
    if reason is not None:
        with pytest.raises(ValueError, match="cannot run these inputs"):
            select_topk_cuda(torch.zeros(1, n_keys, device="cuda"), 1, kernel=kernel)
        pytest.skip(f"kernel {kernel}: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", SELECT_TOPK_KERNELS.versions)
@pytest.mark.parametrize("shape, k, ties, causal", [
    ((7, 5000), 100, False, False), ((7, 5000), 100, True, False), ((3, 131072), 2048, False, False),
    ((3, 131072), 2048, True, False), ((50, 50), 16, False, True), ((2, 300, 333), 64, True, True),
    ((5, 4097), 1, False, False), ((4, 100000), 2048, False, True), ((2, 3000), 2048, True, False),
    ((3, 7, 8191), 2048, False, True), ((9, 1030), 1000, True, False),
    # kernels 3-4: rows around kernel 3's limit and the default's switch, none a multiple of 4; rows
    # whose dynamic shared memory lands near 48 KiB (kernel 2's list at 5500, kernel 3 at 10000)
    ((3, 24575), 2048, False, False), ((3, 24575), 2048, True, True), ((4, 16385), 2048, True, False),
    ((2, 5, 40001), 2048, False, True), ((3, 40001), 777, True, False), ((2, 196607), 2048, False, False),
    ((6, 29), 5, True, False), ((5, 9), 9, False, True), ((3, 5500), 300, False, False),
    ((3, 10000), 300, False, True), ((2, 11777), 2048, False, False),
])
def test_select_topk_cuda_is_the_reference_exactly(kernel, shape, k, ties, causal):
    _skip_unless_runs(kernel, shape[-1])
    # S % 4 != 0 in several shapes: rows start off the 16-byte grid, kernels 2-4 read a scalar head and tail
    scores = _gpu_case(shape, seed=k + shape[-1], ties=ties)
    T, S = shape[-2:]
    positions = None if causal else torch.full((T,), S - 1, device="cuda")
    ref = select_topk(scores, k, positions)
    out = compare.poisoned((*shape[:-1], k), torch.int32)
    assert select_topk_cuda(scores, k, positions, kernel=kernel, out=out) is out
    assert torch.equal(out, ref), (out != ref).nonzero()[:5].tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", SELECT_TOPK_KERNELS.versions)
def test_select_topk_cuda_rows_shorter_than_k_and_empty_rows(kernel):
    scores = _gpu_case((6, 3000), seed=9)
    scores[2] = NAN  # nothing to select: all -1
    positions = torch.tensor([0, 10, 2999, 500, 2047, 2048], device="cuda")
    ref = select_topk(scores, 2048, positions)
    out = select_topk_cuda(scores, 2048, positions, kernel=kernel)
    assert torch.equal(out, ref) and bool((out[2] == -1).all()) and int((out[0] >= 0).sum()) == 1
    # int32 positions: the same rows
    assert torch.equal(select_topk_cuda(scores, 2048, positions.int(), kernel=kernel), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", SELECT_TOPK_KERNELS.versions)
def test_select_topk_cuda_when_a_sample_misleads(kernel):
    """Kernel 4 guesses a bucket from a sample, one float4 in TOPK_SAMPLE_STRIDE; rows built so the
    guess is wrong must still come out exact (it falls back to kernel 2's answer): sampled scores far
    above the rest (for k = 2048, fewer than k keys at or above the guess; for k = 100 the guess is
    right), far below the rest (a list longer than shared memory holds), and rows of few distinct
    values (long runs of ties: kernel 2 falls back in turn to kernel 1)."""
    S = 65539
    _skip_unless_runs(kernel, S)
    stride = 4 * SELECT_TOPK_KERNELS.defines()["TOPK_SAMPLE_STRIDE"]  # scores between sampled float4s
    flat = torch.randn(6 * S + 3, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    scores = flat[3:].view(6, S)  # row r starts at float 3 + r * S: off the 16-byte grid by (3 + 3 r) % 4
    for r in range(6):  # the floats the sample reads: float4 number 16 i of each row's aligned body
        head = (4 - (3 + 3 * r) % 4) % 4
        sampled = torch.arange(head, S - 3, stride, device="cuda")
        if r in (0, 1):  # one score of each sampled float4 high: ~1000 keys at or above the guess
            scores[r, sampled] = 100.0 + r
        elif r in (2, 3):  # every sampled score low: the guess is below almost the whole row
            scores[r, (sampled[:, None] + torch.arange(4, device="cuda")).flatten()] = -100.0
    scores[4] = torch.randint(-2, 3, (S,), device="cuda").float()
    scores[5, ::2] = 1.0
    for k in (1, 100, 2048):
        ref = select_topk(scores, k, torch.full((6,), S - 1, device="cuda"))
        out = compare.poisoned((6, k), torch.int32)
        select_topk_cuda(scores, k, torch.full((6,), S - 1, device="cuda"), kernel=kernel, out=out)
        assert torch.equal(out, ref), (k, (out != ref).nonzero()[:5].tolist())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", SELECT_TOPK_KERNELS.versions)
def test_select_topk_cuda_unaligned_rows_and_long_ties(kernel):
    # kernels 1, 2, 4: 65536-long rows (kernel 2's list overflows); kernel 3 takes rows up to its limit
    length = 65536 if select_topk_why_not(65536)[kernel] is None else 24572
    gen = torch.Generator(device="cuda").manual_seed(11)
    # a contiguous view one float past a 16-byte boundary: every row starts off the float4 grid
    flat = torch.randn(4 * length + 1, device="cuda", generator=gen)
    scores = flat[1:].view(4, length)
    # row 1: a long run of equal scores at the threshold (60000 of 65536: more than kernel 2's list
    # holds, it falls back to kernel 1); row 2: all -inf (ordinary scores); row 3: +0.0 and -0.0
    # mixed, then a few larger
    scores[1, : length * 11 // 12] = 0.5
    scores[2] = -INF
    scores[3] = 0.0
    scores[3, ::3] = -0.0
    scores[3, 1000:1100] = 1.0
    last = torch.full((4,), length - 1, device="cuda")
    for k in (1, 2, 2048):
        ref = select_topk(scores, k, last)
        out = compare.poisoned((4, k), torch.int32)
        out.copy_(select_topk_cuda(scores, k, last, kernel=kernel))
        assert torch.equal(out, ref), (k, (out != ref).nonzero()[:5].tolist())


@pytest.mark.gpu
def test_select_topk_cuda_default_is_the_chosen_kernel():
    for shape, expected in [((2, 40, 3001), 3), ((3, 40001), 4), ((2, 250001), 4)]:
        assert select_topk_default(shape[-1]) == expected
        scores = _gpu_case(shape, seed=4, ties=True)
        assert torch.equal(select_topk_cuda(scores, 300), select_topk_cuda(scores, 300, kernel=expected))
        assert torch.equal(select_topk_cuda(scores, 300), select_topk(scores, 300))


@pytest.mark.gpu
def test_select_topk_cuda_bad_input():
    scores = torch.randn(4, 3000, device="cuda")
    with pytest.raises(ValueError, match="at most k = 2048"):
        select_topk_cuda(scores, 2049)
    with pytest.raises(ValueError, match="contiguous"):
        select_topk_cuda(scores.t(), 2)
    with pytest.raises(ValueError, match="CUDA"):
        select_topk_cuda(scores.cpu(), 2)
    with pytest.raises(ValueError, match="larger than the sequence"):
        select_topk_cuda(scores[:, :10].contiguous(), 11)
    with pytest.raises(ValueError, match="kernel must be None or a version of cuda/select_topk.cu"):
        select_topk_cuda(scores, 2, kernel=5)
    with pytest.raises(ValueError, match="kernel 3 .* cannot run these inputs: rows of at most"):
        select_topk_cuda(torch.randn(2, 30000, device="cuda"), 2, kernel=3)
    with pytest.raises(ValueError, match="kernel must be None or a version"):
        select_topk_cuda(scores, 2, kernel="compact")  # the old names are gone: versions are numbers
    with pytest.raises(ValueError, match=r"\[T, S\] or \[B, T, S\]"):
        select_topk_cuda(torch.randn(2, 2, 4, 3000, device="cuda"), 2)
    with pytest.raises(ValueError, match="out must have shape"):
        select_topk_cuda(scores, 2, out=torch.empty(4, 3, dtype=torch.int32, device="cuda"))
    with checks.data_checks(True):  # positions are device data: checked with data checks on
        with pytest.raises(ValueError, match="query_positions must be <= 2999"):
            select_topk_cuda(scores, 2, torch.tensor([0, 1, 2, 3000], device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", SELECT_TOPK_KERNELS.versions)
def test_wild_positions_with_data_checks_off_stay_inside_the_row(kernel):
    """Data checks off (the default): positions outside [0, S) are not checked, and the kernel must
    still never read outside its row; it clamps each row's visible end to [0, S] on the device."""
    scores = torch.randn(8, 300, device="cuda")
    wild = torch.tensor([-7, 0, 150, 299, 10**6, -(2**62), 2**63 - 1, -(2**63)], device="cuda")
    with checks.data_checks(False):
        out = select_topk_cuda(scores, 8, wild, kernel=kernel)
        out32 = select_topk_cuda(scores, 8, wild.clamp(-(2**31), 2**31 - 1).int(), kernel=kernel)
    torch.cuda.synchronize()
    clamped = wild.clamp(-1, 299)
    for row, last in enumerate(clamped.tolist()):
        picked = out[row][out[row] >= 0]
        assert bool((picked <= max(last, -1)).all()) and picked.numel() == min(8, last + 1)
        assert bool((out[row][picked.numel():] == -1).all())
    assert torch.equal(out, select_topk(scores, 8, clamped.clamp(min=0)).masked_fill(clamped[:, None] < 0, -1))
    assert torch.equal(out32, out)
