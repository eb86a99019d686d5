"""The paged FP8 indexer-key cache and the decode-time logits over it.

Cache layout (DeepGEMM's, fused): uint8 [num_blocks, 64, 1, D + 4]. A physical block holds 64
tokens as 64 * D e4m3 bytes first, then 64 float32 scales, so token `slot` of a block keeps its
values at bytes [slot * D, (slot + 1) * D) and its scale at bytes 64 D + 4 slot .. + 4 of that
block (8448 bytes a block for D = 128: 132 bytes a token). A sequence's logical block n lives in
physical block block_table[b, n]; its token at position p is slot p % 64 of logical block p // 64.

Paged logits, for batch b, draft position j = 0 .. next_n - 1 (row b * next_n + j) and position p:

    logits[b next_n + j, p] = sum_h w[b next_n + j, h] * ReLU(q[b, j, h] . k[p] * k_scale[p])
                              for p < len[b, j], -inf elsewhere (clean_logits)

    len[b, j] = context_lens[b] - next_n + j + 1   context_lens int32 [B]: p <= context_lens[b] - next_n + j
    len[b, j] = context_lens[b, j]                 context_lens int32 [B, next_n] (DeepGEMM's per-row form)

The [B] form is the [B, next_n] one with context_lens[b, j] = context_lens[b] - next_n + j + 1.
The logits are stored as logits_dtype: float32, or bfloat16 (the float32 values rounded, -inf kept).

Schedule (DeepGEMM's get_paged_mqa_logits_metadata): each context is cut into segments of
SPLIT_KV = 4 * block_kv = 256 tokens; the segments, in batch order, are dealt out evenly to the
persistent blocks of the kernel; row s of the [num_sms + 1, 2] int32 table is the (batch, segment)
where block s starts; the last row is (B, 0). A context is its longest row: context_lens[b], or
max_j context_lens[b, j]. `paged_mqa_logits_metadata` computes it with torch ops where
context_lens is, on the GPU without a host round trip (capturable in a CUDA graph).

Which function runs where:

* `paged_mqa_logits` is the specification (float64, pure torch, any device): both forms of
  context_lens, float32 or bfloat16 logits.
* `paged_mqa_logits_cuda` runs a kernel of `cuda/paged_mqa_logits.cu`, `kernel=` a version of
  PAGED_MQA_LOGITS_KERNELS (what the .cu header and chapter 7 call "kernel N"): 1 (4 warps a block,
  mma.sync e4m3, which sm_90 emulates with f16 mma and per-call conversions), 2 (4 x next_n x H / 32
  warps a block, e4m3 converted to f16 once, f16 mma.sync), 3 (6 warps a block, each with its own
  cp.async pipeline of 32-key units and no block-wide barrier between them; q of all heads and
  draft positions as f16 fragments in shared memory, so every key is converted once), 4 (2
  warpgroups a block, each with its own pipeline of 64-token physical blocks, Hopper's warpgroup MMA
  on the e4m3 keys and the next_n x H rows of q in shared memory) or 5 (kernel 4's MMA fed by TMA: a
  producer warp keeps one ring of blocks full for two consumer warpgroups, handed over through
  mbarriers; weights 16-byte aligned). 4 and 5 are compiled for sm_90a, so they run on compute
  capability 9.0 only, and are refused elsewhere. kernel=None takes the best that runs here: 5,
  else 4, else 3 (PAGED_MQA_LOGITS_KERNELS.best_first; kernel 5 measured 1.03 to 1.05 times kernel
  4's speed at one draft token and 1.14 to 1.16 at two, with enough work, on the H200). Each
  launches one block per schedule row; ask the schedule for `schedule_size(device)` = CTAS_PER_SM
  (a #define of the .cu) x the SM count (any size is correct).
  Every kernel takes both forms of context_lens as they are (an argument says which, and the kernel
  derives len[b, j] itself: no conversion, no extra launch) and is compiled once per logits_dtype
  (the `out` variant, entry suffix _f32 / _bf16: bfloat16 writes half the bytes).

No host synchronisation in `paged_mqa_logits_cuda` nor in `paged_mqa_logits_metadata` on GPU
tensors: the values of context_lens, block_table and schedule_meta are checked only with data
checks on (`checks.set_data_checks`, or DSA_CHECK=1). With them off, the kernels stay memory-safe
for any values (see paged_mqa_logits_cuda for what an invalid value produces).

clean_logits=False: the kernel still writes every position p < L_b, the longest row of sequence b (a
value, or -inf where p >= len[b, j]), and leaves p >= L_b untouched (unspecified).
"""
from __future__ import annotations

import torch

from . import kernels
from .checks import check_range, check_same_device, check_tensor, data_checks_wanted
from .fp8 import _FLOAT_INPUTS, LOGITS_OUT, check_logits_dtype, mqa_logits, wgmma_why_not
from .kernels import Kernel, KernelTable

__all__ = [
    "BLOCK_KV",
    "SPLIT_KV",
    "PAGED_MQA_LOGITS_KERNELS",
    "kv_cache_block_bytes",
    "new_kv_cache",
    "store_kv",
    "gather_kv",
    "row_lengths",
    "paged_mqa_logits_metadata",
    "schedule_size",
    "check_paged_inputs",
    "paged_mqa_logits",
    "paged_mqa_logits_cuda",
]

# The cache format (DeepGEMM's), which the layout helpers below need without reading a .cu: a test
# checks that cuda/paged_mqa_logits.cu #defines the same BLOCK_KV and SPLIT_KV.
BLOCK_KV = 64  # tokens per physical block
SPLIT_KV = 4 * BLOCK_KV  # tokens per schedule segment (DeepGEMM: block_kv x 4 math warpgroups)

PAGED_MQA_LOGITS_KERNELS = KernelTable("paged_mqa_logits", [
    Kernel(1, "paged_mqa_logits_e4m3_h{H}_{out}", "4 warps a block, mma.sync e4m3 (sm_90 emulates it with f16 mma)"),
    Kernel(2, "paged_mqa_logits_f16_h{H}_{out}",
           "e4m3 converted to f16 once, f16 mma.sync, a warp per (16 keys, draft, 32 heads)"),
    Kernel(3, "paged_mqa_logits_warps_h{H}_n{next_n}_{out}",
           "6 warps, each its own cp.async pipeline of 32-key units, f16 mma.sync"),
    Kernel(4, "paged_mqa_logits_wgmma_h{H}_n{next_n}_{out}",
           "2 warpgroups, each its own ring of physical blocks, wgmma on e4m3", needs="compute capability 9.0 (sm_90a)"),
    Kernel(5, "paged_mqa_logits_tma_h{H}_n{next_n}_{out}",
           "kernel 4's wgmma fed by TMA: a producer warp, two consumer warpgroups sharing one ring, the next "
           "block's product issued before this one's epilogue where the registers allow",
           needs="compute capability 9.0 (sm_90a), weights 16-byte aligned, fewer than 2^31 rows of q and of "
                 "the cache"),
], variants={"H": (64, 32), "next_n": (1, 2), "out": ("f32", "bf16")}, best_first=(5, 4, 3, 2, 1))


def kv_cache_block_bytes(head_dim: int = 128) -> int:
    """Bytes of one physical block: 64 x D e4m3 values, then 64 float32 scales."""
    return BLOCK_KV * (head_dim + 4)


def new_kv_cache(num_blocks: int, head_dim: int = 128, device="cpu") -> torch.Tensor:
    """An empty paged indexer-key cache, uint8 [num_blocks, 64, 1, D + 4] (zeros)."""
    if num_blocks <= 0 or head_dim <= 0:
        raise ValueError(f"num_blocks and head_dim must be positive, got {num_blocks}, {head_dim}")
    return torch.zeros(num_blocks, BLOCK_KV, 1, head_dim + 4, dtype=torch.uint8, device=device)


def _cache_dims(kv_cache: torch.Tensor, dims: dict | None = None, **kwargs) -> tuple[int, int]:
    check_tensor(kv_cache, "kv_cache", shape=("num_blocks", BLOCK_KV, 1, None), dims=dims, dtype=torch.uint8,
                 **kwargs)
    head_dim = kv_cache.shape[-1] - 4
    if head_dim <= 0 or head_dim % 16:
        raise ValueError(f"kv_cache's last dim must be D + 4 with D a positive multiple of 16, got {kv_cache.shape[-1]}")
    return kv_cache.shape[0], head_dim


def store_kv(kv_cache: torch.Tensor, k_fp8: torch.Tensor, k_scale: torch.Tensor, slots: torch.Tensor) -> None:
    """Write tokens into the cache in place: token n goes to slot slots[n] = block * 64 + offset.

    k_fp8 [T, D] e4m3, k_scale [T] (or [T, 1]) float32, slots [T] int. Values land at byte
    offset * D of the block, the scale at byte 64 D + 4 offset."""
    num_blocks, D = _cache_dims(kv_cache)
    dims: dict[str, int] = {}
    check_tensor(k_fp8, "k_fp8", shape=("T", D), dims=dims, dtype=torch.float8_e4m3fn, device=kv_cache.device)
    if k_scale.dim() == 2 and k_scale.shape[-1] == 1:
        k_scale = k_scale.squeeze(-1)
    check_tensor(k_scale, "k_scale", shape=("T",), dims=dims, dtype=torch.float32, device=kv_cache.device)
    check_tensor(slots, "slots", shape=("T",), dims=dims, dtype=(torch.int32, torch.int64), device=kv_cache.device)
    check_range(slots, "slots", 0, num_blocks * BLOCK_KV - 1)
    flat = kv_cache.view(num_blocks, BLOCK_KV * (D + 4))  # one row of bytes per block
    block, offset = (slots.long() // BLOCK_KV).unsqueeze(-1), (slots.long() % BLOCK_KV).unsqueeze(-1)
    # values: bytes offset * D + [0, D) of the block
    flat[block, offset * D + torch.arange(D, device=flat.device)] = k_fp8.view(torch.uint8)
    # scales: bytes 64 D + 4 offset + [0, 4), the float32's own bytes
    flat[block, BLOCK_KV * D + 4 * offset + torch.arange(4, device=flat.device)] = \
        k_scale.contiguous().view(torch.uint8).view(-1, 4)


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, context_len: int):
    """The first `context_len` tokens of a sequence whose logical blocks are `block_ids`:
    (k_fp8 [context_len, D] e4m3, k_scale [context_len] float32)."""
    num_blocks, D = _cache_dims(kv_cache)
    flat = kv_cache.view(num_blocks, BLOCK_KV * (D + 4))[block_ids.long()]  # [n_blocks, 64 (D + 4)]
    # values: the first 64 D bytes of each block, token-major: [n_blocks * 64, D]
    k_fp8 = flat[:, : BLOCK_KV * D].reshape(-1, D).view(torch.float8_e4m3fn)
    # scales: the last 256 bytes, as float32: [n_blocks * 64]
    k_scale = flat[:, BLOCK_KV * D:].contiguous().view(torch.float32).reshape(-1)
    return k_fp8[:context_len], k_scale[:context_len]


def _check_context_lens(context_lens, dims: dict | None = None, **kwargs) -> None:
    """context_lens: int32 [B] (one length a sequence) or [B, next_n] (one a draft row, next_n >= 1)."""
    if isinstance(context_lens, torch.Tensor) and context_lens.dim() not in (1, 2):
        raise ValueError(f"context_lens must be [B] or [B, next_n], got shape {list(context_lens.shape)}")
    per_row = isinstance(context_lens, torch.Tensor) and context_lens.dim() == 2
    check_tensor(context_lens, "context_lens", shape=("B", "next_n") if per_row else ("B",), dims=dims,
                 dtype=torch.int32, **kwargs)
    if per_row and context_lens.shape[1] == 0:
        raise ValueError(f"context_lens [B, next_n] needs next_n >= 1, got shape {list(context_lens.shape)}")


def _longest_rows(context_lens: torch.Tensor) -> torch.Tensor:
    """Each sequence's longest row, [B]: context_lens itself, or max_j context_lens[b, j]."""
    return context_lens.amax(dim=1) if context_lens.dim() == 2 else context_lens


def row_lengths(context_lens: torch.Tensor, next_n: int) -> torch.Tensor:
    """len[b, j] = the positions row (b, j) sees, p < len[b, j]: [B, next_n] (the [B] form made per-row,
    context_lens[b] - next_n + j + 1, at least 0)."""
    if context_lens.dim() == 2:
        return context_lens
    j = torch.arange(next_n, device=context_lens.device)
    return torch.clamp(context_lens.unsqueeze(1) - next_n + j + 1, min=0).to(torch.int32)


def paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int = BLOCK_KV, num_sms: int = 132) -> torch.Tensor:
    """The schedule: int32 [num_sms + 1, 2], row s = (batch, segment) where persistent block s starts.

    context_lens int32 [B], L_b = context_lens[b]; or [B, next_n] (a length a draft row), and then a
    sequence's segments cover its longest row, L_b = max_j context_lens[b, j] (a device op: still no
    host round trip). Segments of 4 * block_kv tokens; total = sum_b ceil(L_b / (4 block_kv)) of them,
    block s gets segments [s q + min(s, r), (s + 1) q + min(s + 1, r)) with q, r = divmod(total, num_sms).
    Torch ops on context_lens's device: on a GPU no device-to-host copy (q and r stay tensors), so a
    decode step can be captured in a CUDA graph with it. A negative length (checked only where data
    checks apply) counts as 0."""
    _check_context_lens(context_lens)
    if not isinstance(block_kv, int) or block_kv <= 0 or not isinstance(num_sms, int) or num_sms <= 0:
        raise ValueError(f"block_kv and num_sms must be positive ints, got {block_kv!r}, {num_sms!r}")
    check_range(context_lens, "context_lens", 0, None)
    split_kv = 4 * block_kv
    longest = _longest_rows(context_lens)  # [B]
    # segments per batch, and their running total, from 0: [B + 1]
    num_segs = (longest.long().clamp(min=0) + split_kv - 1) // split_kv
    prefix = torch.cat([num_segs.new_zeros(1), num_segs.cumsum(0)])
    # q, r = divmod(total, num_sms), as tensors on the device: [1]
    total = prefix[-1:]
    q, r = total // num_sms, total % num_sms
    # first segment of block s: s q + min(s, r), for s = 0 .. num_sms: [num_sms + 1]
    s = torch.arange(num_sms + 1, device=longest.device)
    seg_start = s * q + torch.minimum(s, r)
    # its batch: the first b whose inclusive prefix exceeds seg_start (B past the end)
    batch = torch.searchsorted(prefix[1:], seg_start, right=True)
    before = prefix.index_select(0, batch)  # segments of the batches before
    return torch.stack([batch, seg_start - before], dim=1).to(torch.int32)


def schedule_size(device=None) -> int:
    """How many schedule rows (persistent blocks) the CUDA kernels want: CTAS_PER_SM per SM."""
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return PAGED_MQA_LOGITS_KERNELS.defines()["CTAS_PER_SM"] * props.multi_processor_count


def check_paged_inputs(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                       *, cuda: bool) -> dict:
    """Every check of fp8_paged_mqa_logits, before any launch; returns the named dims.

    Always (host metadata, free): dtypes, shapes (context_lens [B] or [B, next_n]), one device,
    next_n in {1, 2}, max_context_len; for the kernels (cuda=True) e4m3 q, H and D they are compiled
    for, contiguous CUDA tensors and a schedule_meta of >= 2 rows. The values
    (every length in [0, max_context_len] and each sequence's longest within its table row, the
    block ids it uses in [0, num_blocks), schedule_meta equal to paged_mqa_logits_metadata(context_lens))
    only where checks.data_checks_wanted: always on the CPU, on a GPU with data checks on (reading
    them waits for the device)."""
    dims: dict[str, int] = {}
    on_gpu = dict(contiguous=True) if cuda else {}  # the kernels take contiguous tensors (on the GPU: below)
    check_tensor(q, "q", shape=("B", "next_n", "H", "D"), dims=dims,
                 dtype=(torch.float8_e4m3fn,) if cuda else _FLOAT_INPUTS, **on_gpu)
    if dims["next_n"] not in (1, 2):
        raise ValueError(f"next_n (dim 1 of q) must be 1 or 2, got {dims['next_n']}")
    num_blocks, D = _cache_dims(kv_cache, dims, **on_gpu)
    if D != dims["D"]:
        raise ValueError(f"kv_cache holds D = {D} values a token (last dim D + 4 = {D + 4}), q has D = {dims['D']}")
    check_tensor(weights, "weights", shape=(dims["B"] * dims["next_n"], "H"), dims=dims, dtype=torch.float32,
                 **on_gpu)
    _check_context_lens(context_lens, dims, **on_gpu)
    check_tensor(block_table, "block_table", shape=("B", "max_blocks"), dims=dims, dtype=torch.int32, **on_gpu)
    tensors = dict(q=q, kv_cache=kv_cache, weights=weights, context_lens=context_lens, block_table=block_table)
    if not isinstance(max_context_len, int) or isinstance(max_context_len, bool) or max_context_len < 0:
        raise ValueError(f"max_context_len must be an int >= 0, got {max_context_len!r}")
    table = PAGED_MQA_LOGITS_KERNELS
    if cuda and dims["H"] not in table.variants["H"]:
        raise ValueError(f"the CUDA paged_mqa_logits supports H in {table.variants['H']} heads, got H = {dims['H']}")
    if cuda and D != table.defines()["HEAD_DIM"]:
        raise ValueError(f"the CUDA paged_mqa_logits supports head_dim D = {table.defines()['HEAD_DIM']}, got D = {D}")
    if schedule_meta is not None or cuda:
        check_tensor(schedule_meta, "schedule_meta", shape=(None, 2), dtype=torch.int32, **on_gpu)
        if schedule_meta.shape[0] < 2:
            raise ValueError(f"schedule_meta must have num_sms + 1 >= 2 rows, got {schedule_meta.shape[0]}")
        tensors["schedule_meta"] = schedule_meta
    check_same_device(**tensors)
    if cuda:
        check_tensor(q, "q", cuda=True)  # and so every tensor (one device)
    if data_checks_wanted(context_lens, block_table, schedule_meta):
        _check_paged_values(context_lens, block_table, schedule_meta, max_context_len, num_blocks, dims)
    return dims


def _check_paged_values(context_lens, block_table, schedule_meta, max_context_len, num_blocks, dims) -> None:
    """The device-data checks of check_paged_inputs (they read the tensors back to the host)."""
    check_range(context_lens, "context_lens", 0, max_context_len)
    # a context (its longest row) must fit the blocks its table row has
    longest = _longest_rows(context_lens)  # [B]
    n_blocks = (longest.long() + BLOCK_KV - 1) // BLOCK_KV  # [B]
    if dims["B"] and int(n_blocks.max()) > dims["max_blocks"]:
        b = int(n_blocks.argmax())
        where = f"[{b}]" if context_lens.dim() == 1 else f"[{b}, {int(context_lens[b].argmax())}]"
        raise ValueError(f"context_lens{where} = {int(longest[b])} needs {int(n_blocks[b])} blocks of {BLOCK_KV} "
                         f"tokens, but block_table has {dims['max_blocks']} a row")
    # every block a context uses must be a physical block of the cache
    used = torch.arange(dims["max_blocks"], device=block_table.device) < n_blocks.unsqueeze(-1)  # [B, max_blocks]
    if bool(used.any()):
        ids = block_table[used]
        if int(ids.min()) < 0 or int(ids.max()) >= num_blocks:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"block_table holds block id {bad} for a used block; ids must be in [0, {num_blocks})")
    if schedule_meta is not None:
        expected = paged_mqa_logits_metadata(context_lens, BLOCK_KV, schedule_meta.shape[0] - 1)
        if not torch.equal(schedule_meta, expected):
            raise ValueError("schedule_meta does not match context_lens: compute it with "
                             f"paged_mqa_logits_metadata(context_lens, {BLOCK_KV}, num_sms) for these context_lens")


def paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta=None,
                     max_context_len: int = 0, clean_logits: bool = True, *,
                     logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Paged logits in float64: [B * next_n, max_context_len] logits_dtype (float32 or bfloat16),
    -inf where invisible.

    context_lens int32 [B] (row (b, j) sees p <= context_lens[b] - next_n + j) or [B, next_n] (row
    (b, j) sees p < context_lens[b, j]). Gathers each sequence's keys, up to its longest row, from
    its blocks and calls fp8.mqa_logits with ks = 0, ke = len[b, j] (the module docstring's).
    schedule_meta is checked when given, not used."""
    check_logits_dtype(logits_dtype)
    dims = check_paged_inputs(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                              cuda=False)
    B, next_n = dims["B"], dims["next_n"]
    lens = row_lengths(context_lens, next_n)  # [B, next_n]: row (b, j) sees p < lens[b, j]
    logits = torch.full((B * next_n, max_context_len), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        context_len = int(lens[b].max())  # the longest row: the keys the sequence needs
        n_blocks = (context_len + BLOCK_KV - 1) // BLOCK_KV
        k_fp8, k_scale = gather_kv(kv_cache, block_table[b, :n_blocks], context_len)
        ke = lens[b].to(torch.int32)
        rows = slice(b * next_n, (b + 1) * next_n)
        logits[rows, :context_len] = mqa_logits(q[b], (k_fp8, k_scale), weights[rows], torch.zeros_like(ke), ke)
    return logits.to(logits_dtype)


def paged_mqa_logits_cuda(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len: int,
                          clean_logits: bool = True, *, kernel: int | None = None,
                          out: torch.Tensor | None = None, logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`cuda/paged_mqa_logits.cu`: one block per schedule row; kernel = a version of
    PAGED_MQA_LOGITS_KERNELS (1 to 5, 4 and 5 on compute capability 9.0 only) or None, the best that
    runs here (5, else 4, else 3).

    q [B, next_n, H, D] e4m3 (next_n in {1, 2}), kv_cache uint8 [num_blocks, 64, 1, D + 4],
    weights [B * next_n, H] float32, context_lens int32 [B] or [B, next_n] (DeepGEMM's per-row form:
    row (b, j) sees p < context_lens[b, j]), block_table [B, max_blocks] int32, schedule_meta from
    paged_mqa_logits_metadata(context_lens) -> logits [B * next_n, max_context_len] of logits_dtype:
    torch.float32, or torch.bfloat16 (the float32 logits rounded to nearest even as the kernel stores
    them, -inf kept). `out` (optional, that shape and dtype, contiguous) receives them: tests pass a
    poisoned buffer. Both forms of context_lens go to the kernel as they are, with a flag: no
    conversion, no extra launch.

    No host synchronisation: the values of context_lens, block_table and schedule_meta are checked
    only with data checks on. With them off, invalid values never make a kernel read or write out
    of bounds, and produce:
    * a context length below 0 or above min(max_context_len, 64 * max_blocks): the length clipped
      to that range (rows of a negative one are all -inf with clean_logits); in the [B] form the
      sequence's length is clipped and its rows derived from it, in the [B, next_n] form each row's;
    * a block id outside [0, num_blocks): the id clipped into it, so those 64 positions hold the
      logits of another block's keys (unspecified values);
    * a schedule_meta that does not match context_lens: positions that no block of the grid walks
      stay as `out` had them (unspecified); a wild entry is clipped to a batch >= 0 and a block in
      [0, max_blocks]."""
    if kernel is not None:
        PAGED_MQA_LOGITS_KERNELS[kernel]  # a version of the table, or a clear error naming them
    check_logits_dtype(logits_dtype)
    dims = check_paged_inputs(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                              cuda=True)
    for name, x in (("q", q), ("kv_cache", kv_cache)):  # every kernel copies them in 16-byte pieces (cp.async)
        if x.data_ptr() % 16:
            raise ValueError(f"{name} must start at a 16-byte aligned address (the kernels copy it in 16-byte "
                             f"pieces), but it starts {x.data_ptr() % 16} bytes past one: pass a copy")
    chosen = PAGED_MQA_LOGITS_KERNELS.choose(kernel, _paged_why_not(q, kv_cache, weights))
    shape = (dims["B"] * dims["next_n"], max_context_len)
    if out is None:
        out = torch.empty(shape, dtype=logits_dtype, device=q.device)
    else:
        check_tensor(out, "out", shape=shape, dtype=logits_dtype, device=q.device, contiguous=True)
    _launch_paged(chosen.version, q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                  clean_logits, out)
    return out


def _launch_geometry(version: int, next_n: int, H: int) -> tuple[int, int]:
    """(threads a block, dynamic shared memory bytes) of kernel `version`, from the .cu's #defines."""
    d = PAGED_MQA_LOGITS_KERNELS.defines()
    N = next_n * H  # rows of q a block holds: (draft position, head)
    if version == 1:
        return d["THREADS"], 0
    if version == 2:  # one warp per (16-key m-tile, draft position, 32-head half)
        return 32 * d["K2_MTILES"] * next_n * (H // d["K2_HEADS_PER_WARP"]), 0
    if version == 3:  # q fragments and weights, then every warp's ring
        return d["K3_THREADS"], N * d["K3_SMEM_PER_ROW"] + d["K3_SMEM_STAGES"]
    if version == 4:  # alignment slack, the q tile and its weights, then both warpgroups' rings
        return d["K4_THREADS"], d["K4_SMEM_ALIGN"] + N * d["K4_SMEM_PER_ROW"] + d["K4_SMEM_STAGES"]
    # 5: alignment slack, the ring (values, scales) and its barriers, two buffers of q and w
    return d["K5_THREADS"], d["WGMMA_SMEM_ALIGN"] + d["K5_FIXED_SMEM"] + N * d["K5_SMEM_PER_ROW"]


def _paged_why_not(q, kv_cache, weights) -> dict:
    """The versions of PAGED_MQA_LOGITS_KERNELS that cannot run these inputs here, and why (host
    metadata only; see KernelTable.choose)."""
    wgmma = wgmma_why_not(q.device)
    tma = wgmma
    if tma is None and weights.data_ptr() % 16:
        tma = f"reads the weights through a TMA tensor map: 16-byte aligned, but they start {weights.data_ptr() % 16} bytes past"
    D = q.shape[3]  # a row: D bytes (q: one (b, j, h); the cache: a block is kv_cache_block_bytes(D) / D rows)
    rows = max(q.shape[0] * q.shape[1] * q.shape[2], kv_cache.shape[0] * kv_cache_block_bytes(D) // D)
    if tma is None and rows >= 2**31:
        tma = f"addresses q and the cache by rows of {D} bytes with int32 TMA coordinates: fewer than 2^31, got {rows}"
    return {4: wgmma, 5: tma}


def _launch_paged(version: int, q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                  clean_logits, out) -> None:
    """Launch kernel `version` on checked inputs: one block per schedule row, the entry that stores
    out's dtype; context_lens as it is, with lens_per_row = 1 for the [B, next_n] form."""
    B, next_n, H, _ = q.shape
    if B == 0 or max_context_len == 0:
        return
    threads, smem = _launch_geometry(version, next_n, H)
    if version == 5:  # TMA: q as [B next_n H] rows, the cache as [66 num_blocks] rows of 128 bytes, w [B next_n][H]
        D, N = q.shape[3], next_n * H
        # an empty cache (num_blocks 0) has no map, and nothing is read from it (every context clips to 0):
        # the values map then points at q, never used
        cache_rows = kv_cache.view(-1, D) if kv_cache.shape[0] else q.view(B * N, D)
        maps = (kernels.tensor_map_2d(q.view(B * N, D), N, D, swizzle=128),
                kernels.tensor_map_2d(cache_rows, BLOCK_KV, D, swizzle=128),
                kernels.tensor_map_2d(weights, next_n, H))
        PAGED_MQA_LOGITS_KERNELS.launch(
            5, grid=schedule_meta.shape[0] - 1, block=threads, shared_mem=smem, H=H, next_n=next_n,
            out=LOGITS_OUT[out.dtype],
            args=(*maps, kv_cache, context_lens, context_lens.dim() == 2, block_table, schedule_meta, out, B,
                  block_table.shape[1], kv_cache.shape[0], max_context_len, bool(clean_logits)))
        return
    PAGED_MQA_LOGITS_KERNELS.launch(
        version, grid=schedule_meta.shape[0] - 1, block=threads, shared_mem=smem, H=H, next_n=next_n,
        out=LOGITS_OUT[out.dtype],
        args=(q, kv_cache, weights, context_lens, context_lens.dim() == 2, block_table, schedule_meta, out, B, next_n,
              block_table.shape[1], kv_cache.shape[0], max_context_len, bool(clean_logits)))
