"""The paged FP8 indexer-key cache and the decode-time logits over it (SPEC section 6).

Cache layout (DeepGEMM's, fused): uint8 [num_blocks, 64, 1, D + 4]. A physical block holds 64
tokens as 64 * D e4m3 bytes first, then 64 float32 scales, so token `slot` of a block keeps its
values at bytes [slot * D, (slot + 1) * D) and its scale at bytes 64 D + 4 slot .. + 4 of that
block (8448 bytes a block for D = 128: 132 bytes a token). A sequence's logical block n lives in
physical block block_table[b, n]; its token at position p is slot p % 64 of logical block p // 64.

Paged logits, for batch b, draft position j = 0 .. next_n - 1 (row b * next_n + j) and position p:

    logits[b next_n + j, p] = sum_h w[b next_n + j, h] * ReLU(q[b, j, h] . k[p] * k_scale[p])
                              for p <= context_lens[b] - next_n + j, -inf elsewhere (clean_logits)

Schedule (DeepGEMM's get_paged_mqa_logits_metadata): each context is cut into segments of
SPLIT_KV = 4 * block_kv = 256 tokens; the segments, in batch order, are dealt out evenly to the
persistent blocks of the kernel; row s of the [num_sms + 1, 2] int32 table is the (batch, segment)
where block s starts; the last row is (B, 0).

Which function runs where:

* `paged_mqa_logits` dispatches: `paged_mqa_logits_cuda` (cuda/fp8_paged_mqa_logits.cu) for CUDA
  inputs, `paged_mqa_logits_reference` (float64, any device) otherwise.
* `paged_mqa_logits_metadata` is plain torch and runs where context_lens is.
* `paged_mqa_logits_cuda` runs one of four kernels of cuda/fp8_paged_mqa_logits.cu (`kernel=`):
  "tensor_core" (kernel 1: 4 warps a block, mma.sync e4m3, which sm_90 emulates with f16 mma and
  per-call conversions), "tensor_core_f16" (kernel 2: 4 x next_n x H / 32 warps a block, e4m3
  converted to f16 once, f16 mma.sync), "tensor_core_f16_v3" (kernel 3: 6 warps a block, each with
  its own cp.async pipeline of 32-key units and no block-wide barrier between them; q of all heads
  and draft positions as f16 fragments in shared memory, so every key is converted once) or "wgmma"
  (kernel 4: 2 warpgroups a block, each with its own pipeline of 64-token physical blocks, Hopper's
  warpgroup MMA on the e4m3 keys and the next_n x H rows of q in shared memory; compiled for sm_90a,
  so it runs on compute capability 9.0 only, and is refused elsewhere). kernel=None, the default,
  takes `default_paged_kernel(device)`: "wgmma" where it runs, else "tensor_core_f16_v3".
  Each launches one block per schedule row;
  ask the schedule for `schedule_size(device)` = CTAS_PER_SM x the SM count (any size is correct).

clean_logits=False: the kernel still writes every position p < context_lens[b] (a value or -inf
for the draft positions j cannot see yet) and leaves p >= context_lens[b] untouched (unspecified).
"""
from __future__ import annotations

import torch

from .checks import check_range, check_same_device, check_tensor
from .fp8 import MQA_SUPPORTED_HEAD_DIM, MQA_SUPPORTED_HEADS, mqa_logits_reference
from .kernels import launch, require_wgmma, wgmma_available

__all__ = [
    "BLOCK_KV",
    "SPLIT_KV",
    "CTAS_PER_SM",
    "kv_cache_block_bytes",
    "new_kv_cache",
    "store_kv",
    "gather_kv",
    "paged_mqa_logits_metadata",
    "schedule_size",
    "check_paged_inputs",
    "paged_mqa_logits",
    "paged_mqa_logits_reference",
    "paged_mqa_logits_cuda",
    "PAGED_KERNELS",
    "default_paged_kernel",
]

BLOCK_KV = 64  # tokens per physical block
SPLIT_KV = 4 * BLOCK_KV  # tokens per schedule segment (DeepGEMM: block_kv x 4 math warpgroups)
# Schedule rows per SM. Kernel 2 at next_n = 1, H = 64 (8 warps of <= 128 registers) fits 2 blocks an
# SM: 2 rows an SM make one full wave; at next_n = 2 (16 warps, 1 block an SM) two full waves.
CTAS_PER_SM = 2
PAGED_THREADS = 128  # kernel 1, as #defined in cuda/fp8_paged_mqa_logits.cu
PAGED_KERNELS = ("tensor_core", "tensor_core_f16", "tensor_core_f16_v3", "wgmma")
# kernel 3, as #defined in cuda/fp8_paged_mqa_logits.cu: warps a block, cp.async stages a warp, bytes a stage
PAGED_V3_WARPS, PAGED_V3_STAGES, PAGED_V3_UNIT_BYTES = 6, 3, 32 * (128 + 4)
# kernel 4, mirroring the #defines of cuda/fp8_paged_mqa_logits.cu: warpgroups a block, stages a warpgroup
# (one 64-token physical block each: 64 x 128 e4m3 bytes, then 64 float32 scales)
PAGED_WGMMA_WARPGROUPS, PAGED_WGMMA_STAGES = 2, 5
PAGED_WGMMA_STAGE_BYTES = BLOCK_KV * 128 + BLOCK_KV * 4
# the fastest kernel where there is no wgmma (204 us vs 381 us for kernel 2 on the H200, B=128, ctx 32768)
PAGED_FALLBACK_KERNEL = "tensor_core_f16_v3"


def _wgmma_smem(next_n: int, H: int) -> int:
    """Dynamic shared memory of kernel 4: 1024 alignment slack, the N = next_n H rows of q (128 e4m3
    bytes each) and their weights (float32), and every warpgroup's stages (102400 bytes for N = 128)."""
    N = next_n * H
    return 1024 + N * 128 + N * 4 + PAGED_WGMMA_WARPGROUPS * PAGED_WGMMA_STAGES * PAGED_WGMMA_STAGE_BYTES


def kv_cache_block_bytes(head_dim: int = 128) -> int:
    """Bytes of one physical block: 64 x D e4m3 values, then 64 float32 scales."""
    return BLOCK_KV * (head_dim + 4)


def new_kv_cache(num_blocks: int, head_dim: int = 128, device="cpu") -> torch.Tensor:
    """An empty paged indexer-key cache, uint8 [num_blocks, 64, 1, D + 4] (zeros)."""
    if num_blocks <= 0 or head_dim <= 0:
        raise ValueError(f"num_blocks and head_dim must be positive, got {num_blocks}, {head_dim}")
    return torch.zeros(num_blocks, BLOCK_KV, 1, head_dim + 4, dtype=torch.uint8, device=device)


def _cache_dims(kv_cache: torch.Tensor, dims: dict | None = None) -> tuple[int, int]:
    check_tensor(kv_cache, "kv_cache", shape=("num_blocks", BLOCK_KV, 1, None), dims=dims, dtype=torch.uint8)
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


def paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int = BLOCK_KV, num_sms: int = 132) -> torch.Tensor:
    """The schedule: int32 [num_sms + 1, 2], row s = (batch, segment) where persistent block s starts.

    Segments of 4 * block_kv tokens; total = sum_b ceil(context_lens[b] / (4 block_kv)) of them,
    block s gets segments [s q + min(s, r), (s + 1) q + min(s + 1, r)) with q, r = divmod(total, num_sms)."""
    check_tensor(context_lens, "context_lens", shape=("B",), dtype=torch.int32)
    if not isinstance(block_kv, int) or block_kv <= 0 or not isinstance(num_sms, int) or num_sms <= 0:
        raise ValueError(f"block_kv and num_sms must be positive ints, got {block_kv!r}, {num_sms!r}")
    check_range(context_lens, "context_lens", 0, None)
    split_kv = 4 * block_kv
    # segments per batch, and their running total: [B]
    num_segs = (context_lens.long() + split_kv - 1) // split_kv
    prefix = num_segs.cumsum(0)
    total = int(prefix[-1]) if prefix.numel() else 0
    q, r = divmod(total, num_sms)
    # first segment of block s: s q + min(s, r), for s = 0 .. num_sms: [num_sms + 1]
    s = torch.arange(num_sms + 1, device=context_lens.device)
    seg_start = s * q + torch.clamp(s, max=r)
    # its batch: the first b whose inclusive prefix exceeds seg_start (B past the end)
    batch = torch.searchsorted(prefix, seg_start, right=True)
    before = torch.cat([prefix.new_zeros(1), prefix])[batch]  # segments of the batches before
    return torch.stack([batch, seg_start - before], dim=1).to(torch.int32)


def schedule_size(device=None) -> int:
    """How many schedule rows (persistent blocks) the CUDA kernel wants: CTAS_PER_SM per SM."""
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return CTAS_PER_SM * props.multi_processor_count


def check_paged_inputs(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                       *, cuda: bool) -> dict:
    """Every check of fp8_paged_mqa_logits, before any launch; returns the named dims."""
    dims: dict[str, int] = {}
    float_types = (torch.float8_e4m3fn, torch.float32, torch.bfloat16, torch.float16, torch.float64)
    check_tensor(q, "q", shape=("B", "next_n", "H", "D"), dims=dims,
                 dtype=(torch.float8_e4m3fn,) if cuda else float_types)
    if dims["next_n"] not in (1, 2):
        raise ValueError(f"next_n (dim 1 of q) must be 1 or 2, got {dims['next_n']}")
    num_blocks, D = _cache_dims(kv_cache, dims)
    if D != dims["D"]:
        raise ValueError(f"kv_cache holds D = {D} values a token (last dim D + 4 = {D + 4}), q has D = {dims['D']}")
    check_tensor(weights, "weights", shape=(dims["B"] * dims["next_n"], "H"), dims=dims, dtype=torch.float32)
    check_tensor(context_lens, "context_lens", shape=("B",), dims=dims, dtype=torch.int32)
    check_tensor(block_table, "block_table", shape=("B", "max_blocks"), dims=dims, dtype=torch.int32)
    check_same_device(q=q, kv_cache=kv_cache, weights=weights, context_lens=context_lens, block_table=block_table)
    if not isinstance(max_context_len, int) or isinstance(max_context_len, bool) or max_context_len < 0:
        raise ValueError(f"max_context_len must be an int >= 0, got {max_context_len!r}")
    if cuda and dims["H"] not in MQA_SUPPORTED_HEADS:
        raise ValueError(f"the CUDA fp8_paged_mqa_logits supports H in {MQA_SUPPORTED_HEADS} heads, got H = {dims['H']}")
    if cuda and D != MQA_SUPPORTED_HEAD_DIM:
        raise ValueError(f"the CUDA fp8_paged_mqa_logits supports head_dim D = {MQA_SUPPORTED_HEAD_DIM}, got D = {D}")
    check_range(context_lens, "context_lens", 0, max_context_len)
    # a context must fit the blocks its table row has
    n_blocks = (context_lens.long() + BLOCK_KV - 1) // BLOCK_KV  # [B]
    if dims["B"] and int(n_blocks.max()) > dims["max_blocks"]:
        b = int(n_blocks.argmax())
        raise ValueError(f"context_lens[{b}] = {int(context_lens[b])} needs {int(n_blocks[b])} blocks of {BLOCK_KV} "
                         f"tokens, but block_table has {dims['max_blocks']} a row")
    # every block a context uses must be a physical block of the cache
    used = torch.arange(dims["max_blocks"], device=block_table.device) < n_blocks.unsqueeze(-1)  # [B, max_blocks]
    if bool(used.any()):
        ids = block_table[used]
        if int(ids.min()) < 0 or int(ids.max()) >= num_blocks:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"block_table holds block id {bad} for a used block; ids must be in [0, {num_blocks})")
    if schedule_meta is not None or cuda:
        check_tensor(schedule_meta, "schedule_meta", shape=(None, 2), dtype=torch.int32)
        if schedule_meta.shape[0] < 2:
            raise ValueError(f"schedule_meta must have num_sms + 1 >= 2 rows, got {schedule_meta.shape[0]}")
        check_same_device(context_lens=context_lens, schedule_meta=schedule_meta)
        expected = paged_mqa_logits_metadata(context_lens, BLOCK_KV, schedule_meta.shape[0] - 1)
        if not torch.equal(schedule_meta, expected):
            raise ValueError("schedule_meta does not match context_lens: compute it with "
                             f"paged_mqa_logits_metadata(context_lens, {BLOCK_KV}, num_sms) for these context_lens")
    if cuda:
        for name, x in (("q", q), ("kv_cache", kv_cache), ("weights", weights), ("context_lens", context_lens),
                        ("block_table", block_table), ("schedule_meta", schedule_meta)):
            check_tensor(x, name, cuda=True, contiguous=True)
    return dims


def paged_mqa_logits_reference(q, kv_cache, weights, context_lens, block_table, schedule_meta=None,
                               max_context_len: int = 0, clean_logits: bool = True) -> torch.Tensor:
    """Reference paged logits in float64: [B * next_n, max_context_len] float32, -inf where invisible.

    Gathers each sequence's keys from its blocks and calls fp8.mqa_logits_reference with
    ks = 0, ke = context_len - next_n + j + 1. schedule_meta is checked when given, not used."""
    dims = check_paged_inputs(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                              cuda=False)
    B, next_n = dims["B"], dims["next_n"]
    logits = torch.full((B * next_n, max_context_len), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        context_len = int(context_lens[b])
        n_blocks = (context_len + BLOCK_KV - 1) // BLOCK_KV
        k_fp8, k_scale = gather_kv(kv_cache, block_table[b, :n_blocks], context_len)
        # query j sees positions p <= context_len - next_n + j: ke = context_len - next_n + j + 1
        j = torch.arange(next_n, device=q.device)
        ke = torch.clamp(context_len - next_n + j + 1, min=0).to(torch.int32)
        rows = slice(b * next_n, (b + 1) * next_n)
        logits[rows, :context_len] = mqa_logits_reference(q[b], (k_fp8, k_scale), weights[rows],
                                                          torch.zeros_like(ke), ke)
    return logits


def default_paged_kernel(device=None) -> str:
    """The fastest kernel of `cuda/fp8_paged_mqa_logits.cu` that runs on `device` (default: the
    current GPU): "wgmma" (kernel 4) on compute capability 9.0, else "tensor_core_f16_v3" (kernel 3)."""
    return "wgmma" if wgmma_available(device) else PAGED_FALLBACK_KERNEL


def paged_mqa_logits_cuda(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len: int,
                          clean_logits: bool = True, *, out: torch.Tensor | None = None,
                          kernel: str | None = None) -> torch.Tensor:
    """`cuda/fp8_paged_mqa_logits.cu`: one block per schedule row; kernel "tensor_core" (kernel 1),
    "tensor_core_f16" (kernel 2), "tensor_core_f16_v3" (kernel 3), "wgmma" (kernel 4, compute
    capability 9.0 only) or None (the fastest here: default_paged_kernel).

    `out` (optional, [B * next_n, max_context_len] float32) receives the logits; a test passes a
    poisoned buffer to see that every position that must be written is."""
    if kernel is not None and kernel not in PAGED_KERNELS:
        raise ValueError(f"kernel must be one of {PAGED_KERNELS} or None, got {kernel!r}")
    dims = check_paged_inputs(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                              cuda=True)
    shape = (dims["B"] * dims["next_n"], max_context_len)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=q.device)
    else:
        check_tensor(out, "out", shape=shape, dtype=torch.float32, device=q.device, contiguous=True)
    _launch_paged(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits, out,
                  kernel)
    return out


def _launch_paged(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits,
                  out, kernel: str | None = None) -> None:
    """The launch alone, on inputs already checked (the benchmark times this)."""
    if kernel is None:
        kernel = default_paged_kernel(q.device)
    elif kernel == "wgmma":
        require_wgmma(q.device, instead=PAGED_FALLBACK_KERNEL)
    B, next_n, H, _ = q.shape
    if B == 0 or max_context_len == 0:
        return
    smem = 0
    if kernel == "tensor_core":
        name, threads = f"fp8_paged_mqa_logits_h{H}", PAGED_THREADS
    elif kernel == "tensor_core_f16":  # one warp per (16-key m-tile, draft position, 32-head half)
        name, threads = f"fp8_paged_mqa_logits_f16_h{H}", 4 * 32 * next_n * (H // 32)
    elif kernel == "tensor_core_f16_v3":  # warp-private pipelines of 32-key units; q as f16 fragments in smem
        name, threads = f"fp8_paged_mqa_logits_v3_h{H}_n{next_n}", 32 * PAGED_V3_WARPS
        # dynamic shared memory: q fragments (next_n H D f16), w (next_n H float32), the warps' stages
        smem = next_n * H * 128 * 2 + next_n * H * 4 + PAGED_V3_WARPS * PAGED_V3_STAGES * PAGED_V3_UNIT_BYTES
    elif kernel == "wgmma":  # warpgroup-private pipelines of physical blocks; q (next_n H rows) as e4m3 in smem
        name, threads = f"fp8_paged_mqa_logits_wgmma_h{H}_n{next_n}", 128 * PAGED_WGMMA_WARPGROUPS
        smem = _wgmma_smem(next_n, H)
    else:
        raise ValueError(f"kernel must be one of {PAGED_KERNELS}, got {kernel!r}")
    launch("fp8_paged_mqa_logits", name, grid=schedule_meta.shape[0] - 1, block=threads, shared_mem=smem,
           args=(q, kv_cache, weights, context_lens, block_table, schedule_meta, out, B, next_n,
                 block_table.shape[1], max_context_len, bool(clean_logits)))


def paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len: int,
                     clean_logits: bool = True) -> torch.Tensor:
    """fp8_paged_mqa_logits (SPEC section 6): the fastest CUDA kernel that runs on the inputs' GPU
    (default_paged_kernel) for CUDA inputs, else the reference.

    q [B, next_n, H, D] e4m3 (next_n in {1, 2}), kv_cache uint8 [num_blocks, 64, 1, D + 4],
    weights [B * next_n, H] float32, context_lens [B] int32, block_table [B, max_blocks] int32,
    schedule_meta from paged_mqa_logits_metadata -> logits [B * next_n, max_context_len] float32."""
    if isinstance(q, torch.Tensor) and q.is_cuda:
        return paged_mqa_logits_cuda(q, kv_cache, weights, context_lens, block_table, schedule_meta,
                                     max_context_len, clean_logits)
    return paged_mqa_logits_reference(q, kv_cache, weights, context_lens, block_table, schedule_meta,
                                      max_context_len, clean_logits)
