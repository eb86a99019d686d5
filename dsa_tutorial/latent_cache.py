"""The FP8 latent cache of DeepSeek-V3.2, in FlashMLA's layout, and sparse MLA decoding over it.

DeepSeek-V3.2 is deployed with its MLA latent cache in FP8: per token, the 512 values of c^KV in
e4m3 with one power-of-two scale per 128 of them, and the 64 values of the rotary key k^R left in
bf16 (RoPE does not survive 3 mantissa bits well). One token is one row of 656 bytes (FlashMLA's
"V3.2 FP8 sparse" layout, the format its sparse decoding kernel reads):

    byte 0                              512          528                               656
         | c^KV as 512 e4m3 values      | 4 float32  | k^R as 64 bf16 values           |
         | tile 0 | tile 1 | tile 2 | t3| s0 s1 s2 s3|  (copied, not quantised)        |
           tile i = c^KV[128 i : 128 i + 128], bytes 128 i .. 128 i + 127, worth e4m3 value * s_i

    s_i = 2^ceil(log2(max(amax_i, 1e-4) / 448))   amax_i = max |c^KV| over tile i (ue8m0: a power of 2)
    e4m3 byte = e4m3(c^KV / s_i)                  round to nearest even (|c^KV / s_i| <= 448)

The scales are float32 little-endian (bytes 512 + 4 i .. + 3), the rotary values bf16 little-endian
(bytes 528 + 2 d .. + 1): exactly `fp8.act_quant(c_kv, 128, "ue8m0")` and the bf16 bytes of k^R.
Storage is `torch.float8_e4m3fn`, as FlashMLA allocates it (the 144 bytes that are not e4m3 values
are read through byte views). The cache is paged: kv_cache [num_blocks, block_size, 1, 656], token
i of a sparse selection lives in block i // block_size, row i % block_size; block b starts
`kv_cache.stride(0)` bytes after block b - 1, which may be more than block_size * 656 (a slice of a
bigger buffer, as FlashMLA's own tests allocate it); the rows of a block are contiguous.

Where this differs from FlashMLA's test helper (`quantize_k_cache`): it floors the SCALE at 1e-4
(s = 2^ceil(log2(max(amax / 448, 1e-4)))) where the official model's act_quant floors the AMAX at
1e-4, as `fp8.act_quant` does and this module follows. The two agree for every tile with
amax > 448 * 2^-14 (about 0.027); below that (an all-zero token, say) FlashMLA stores 2^-13 and we
a smaller power of two. Both decode to the same values through the stored scale, so either cache
runs through either kernel.

Decoding (one step of sparse MLA over the cache, FlashMLA's `flash_mla_with_kvcache` with
`is_fp8_kvcache=True, indices=...`), for query row (b, t) and head i, over the selected tokens
S = { indices[b, t, j] valid }:

    score_j = softmax_scale * q[b, t, i] . kv_j      kv_j = the dequantised token [c^KV | k^R], 576 wide
    out[b, t, i] = sum_j softmax(score)_j kv_j[:512]  (MQA over the latent: d_v = 512)
    lse[b, t, i] = ln sum_j exp(score_j)             (natural log)

A row with no valid index gets out = 0 and lse = +inf (FlashMLA's convention: its kernel writes
+inf, and exp(-lse) = 0 is the weight such a row gets when partial results are merged). FlashMLA
returns lse as [B, h, s_q]; here it is [B, s_q, h] (its transpose), like `out`.

Which function runs where:

* `quantize`, `dequantize`, `latent_round_trip` and `sparse_mla_decode_fp8` are the specification:
  pure torch, any device, float32 arithmetic.
* `sparse_mla_decode_fp8_cuda` runs `cuda/sparse_mla_decode_fp8.cu`; SPARSE_MLA_DECODE_FP8_KERNELS
  lists its kernels: 1, float32 CUDA cores; 2, tensor cores (mma.sync) with the selection split over
  several blocks when the batch is too small to fill the GPU; 3, the same with Hopper's wgmma (compute
  capability 9.0 only); 4, kernel 3's math warp-specialised (a producer warpgroup gathers and dequantises
  the next tile while two consumer warpgroups compute this one; compute capability 9.0 only: the default
  there, kernel 2 elsewhere).
  No host synchronisation.

Index values are device data: the reference checks them (in [-1, num_blocks * block_size), no
repeats) where checks.data_checks_wanted (always on the CPU); unchecked, any index outside
[0, num_blocks * block_size) counts as an unused slot, in the reference and in the kernels.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import fp8, kernels
from .checks import check_shapes, check_tensor
from .kernels import Kernel, KernelTable
from .sparse_attention import _check_indices, _check_scale

__all__ = ["D_NOPE", "D_ROPE", "D_QK", "QUANT_TILE", "TOKEN_BYTES", "quantize", "dequantize",
           "latent_round_trip", "check_cache", "check_decode_inputs", "sparse_mla_decode_fp8",
           "sparse_mla_decode_fp8_cuda", "decode_splits", "SPARSE_MLA_DECODE_FP8_KERNELS", "COMBINE_ENTRY"]

D_NOPE = 512  # c^KV, quantised (kv_lora_rank)
D_ROPE = 64  # k^R, kept in bf16 (qk_rope_head_dim)
D_QK = D_NOPE + D_ROPE  # 576: one latent [c^KV | k^R], the width q . kv runs over
QUANT_TILE = 128  # c^KV values per scale
SCALES_AT = D_NOPE  # byte offsets in a token's row
ROPE_AT = SCALES_AT + 4 * (D_NOPE // QUANT_TILE)  # 528
TOKEN_BYTES = ROPE_AT + 2 * D_ROPE  # 656 bytes a token (tests check these against the .cu's #defines)


# ----------------------------------------------------------------------------- the cache format

def check_cache(kv_cache: torch.Tensor, name: str = "kv_cache") -> dict[str, int]:
    """A cache in the layout above: float8_e4m3fn [num_blocks, block_size, 1, 656], rows of a block
    contiguous, blocks `block_stride` >= block_size * 656 bytes apart. Returns num_blocks, block_size
    and block_stride (bytes; block_size * 656 when there is a single block)."""
    check_tensor(kv_cache, name, shape=("num_blocks", "block_size", 1, TOKEN_BYTES),
                 dtype=torch.float8_e4m3fn)
    num_blocks, block_size = kv_cache.shape[:2]
    packed = block_size * TOKEN_BYTES
    # strides of a dimension of size 1 mean nothing (torch may report anything there)
    if kv_cache.stride(3) != 1 or (block_size > 1 and kv_cache.stride(1) != TOKEN_BYTES):
        raise ValueError(f"{name}: the {TOKEN_BYTES} bytes of a token and the tokens of a block must be "
                         f"contiguous (strides [?, {TOKEN_BYTES}, ?, 1]), got {list(kv_cache.stride())}")
    block_stride = kv_cache.stride(0) if num_blocks > 1 else packed
    if block_stride < packed:
        raise ValueError(f"{name}: blocks overlap: block stride {block_stride} bytes, less than block_size * "
                         f"{TOKEN_BYTES} = {packed}")
    return {"num_blocks": num_blocks, "block_size": block_size, "block_stride": block_stride}


def quantize(kv: torch.Tensor) -> torch.Tensor:
    """bf16 latents [num_blocks, block_size, 1, 576] = [c^KV (512) | k^R (64)] -> the FP8 cache
    float8_e4m3fn [num_blocks, block_size, 1, 656] (contiguous), each token's row laid out as the
    module docstring draws it."""
    check_tensor(kv, "kv", shape=(None, None, 1, D_QK), dtype=torch.bfloat16)
    c_kv, k_rope = kv.split([D_NOPE, D_ROPE], dim=-1)
    # c^KV in e4m3 with one power-of-two scale per 128 values: [..., 512] e4m3, [..., 4] float32
    x_q, scales = fp8.act_quant(c_kv, QUANT_TILE, "ue8m0")
    # the row: 512 e4m3 bytes | 16 bytes of float32 scales | 128 bytes of bf16 k^R
    row = torch.cat([x_q.view(torch.uint8), scales.view(torch.uint8), k_rope.contiguous().view(torch.uint8)],
                    dim=-1)
    return row.view(torch.float8_e4m3fn)


def dequantize(kv_cache: torch.Tensor) -> torch.Tensor:
    """The FP8 cache [num_blocks, block_size, 1, 656] (blocks may be strided) -> bf16 latents
    [num_blocks, block_size, 1, 576]: c^KV = e4m3 value * its tile's scale, k^R as stored.

    With power-of-two scales (what `quantize` writes) every value is exact in bf16: an e4m3 value has
    3 mantissa bits and a scale moves only its exponent, which stays well inside bf16's range."""
    check_cache(kv_cache)
    token = kv_cache.view(torch.uint8)  # [num_blocks, block_size, 1, 656] bytes, same strides
    x_q = token[..., :D_NOPE].view(torch.float8_e4m3fn)  # [..., 512]
    # the scales and k^R are read as bytes, copied into fresh tensors (whose alignment any view allows)
    scales = token[..., SCALES_AT:ROPE_AT].contiguous().view(torch.float32)  # [..., 4]
    k_rope = token[..., ROPE_AT:].contiguous().view(torch.bfloat16)  # [..., 64]
    # c^KV = x_q * s_tile, in float32 (exact for power-of-two scales), then bf16
    c_kv = fp8.act_dequant(x_q, scales, QUANT_TILE)
    return torch.cat([c_kv.to(torch.bfloat16), k_rope], dim=-1)


def latent_round_trip(c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What attention reads back from an FP8 latent cache, as the official V3.2 inference model
    simulates it: c^KV rounded to bf16 (the model's dtype), then to e4m3 with a power-of-two scale
    per 128 values (`fp8.act_quant`, ue8m0) and back; k^R rounded to bf16. Any width and dtype:
    c_kv [..., d_c], k_rope [..., d_R]; a d_c below 128 (ModelArgs.tiny()) is one tile. Returned in
    the input dtypes. For d_c = 512, d_R = 64 this is dequantize(quantize(.)) exactly (tested)."""
    check_tensor(c_kv, "c_kv", dtype=(torch.float32, torch.float64, torch.bfloat16))
    check_tensor(k_rope, "k_rope", dtype=(torch.float32, torch.float64, torch.bfloat16))
    d_c = c_kv.shape[-1] if c_kv.dim() else 0
    tile = min(QUANT_TILE, d_c)
    if tile == 0 or d_c % tile:
        raise ValueError(f"c_kv's last dim ({d_c}) must be below {QUANT_TILE} or a multiple of it (one scale "
                         f"per {QUANT_TILE} values)")
    x_q, scales = fp8.act_quant(c_kv.to(torch.bfloat16), tile, "ue8m0")
    return fp8.act_dequant(x_q, scales, tile).to(c_kv.dtype), k_rope.to(torch.bfloat16).to(k_rope.dtype)


# ----------------------------------------------------------------------------- the reference

def check_decode_inputs(q, kv_cache, indices, softmax_scale, *, for_kernels: bool = False,
                        cuda: bool = False) -> dict[str, int]:
    """Every check of sparse MLA decoding over the FP8 cache; returns the named dims (B, s_q, h, k,
    num_blocks, block_size, block_stride).

    Always (host metadata, free): shapes, dtypes, one device, the scale, the cache layout
    (check_cache). for_kernels=True adds what the kernels need: bfloat16 q, contiguous q and
    indices, h a multiple of MMA_HEADS up to MAX_HEADS (the .cu's #defines: 64 or 128), and with
    cuda=True tensors on a CUDA device (tests pass cuda=False to check the rest on the CPU). The index
    values (in [-1, num_blocks * block_size), no repeats) only where checks.data_checks_wanted."""
    rules = dict(contiguous=True, cuda=cuda) if for_kernels else {}
    q_dtypes = torch.bfloat16 if for_kernels else (torch.bfloat16, torch.float32)
    dims = check_shapes("q[B, s_q, h, 576]", q, dtype=q_dtypes, **rules)
    check_shapes("indices[B, s_q, k]", indices, dims=dims, dtype=torch.int32, device=q.device, **rules)
    check_tensor(kv_cache, "kv_cache", device=q.device)
    dims.update(check_cache(kv_cache))
    _check_scale(softmax_scale)
    if for_kernels:
        d = SPARSE_MLA_DECODE_FP8_KERNELS.defines()
        if dims["h"] % d["MMA_HEADS"] or not 0 < dims["h"] <= d["MAX_HEADS"]:
            supported = list(range(d["MMA_HEADS"], d["MAX_HEADS"] + 1, d["MMA_HEADS"]))
            raise ValueError(f"the kernels serve h in {supported} heads (DeepSeek-V3.2's 128, or 64 a GPU "
                             f"with two-way tensor parallelism), got h = {dims['h']}")
    _check_indices(indices, dims["num_blocks"] * dims["block_size"])  # device data: only where wanted
    return dims


def sparse_mla_decode_fp8(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                          softmax_scale: float, d_v: int = D_NOPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA decoding over the FP8 cache, in float32: (out [B, s_q, h, d_v], lse [B, s_q, h]).

    q [B, s_q, h, 576] bfloat16 (or float32); kv_cache float8_e4m3fn [num_blocks, block_size, 1, 656];
    indices int32 [B, s_q, k], entry = block * block_size + row, -1 for an unused slot, distinct in a
    row. d_v: the output width (FlashMLA's head_dim_v, 512: the c^KV part of each latent). A row with
    nothing selected gets out = 0 and lse = +inf (module docstring)."""
    dims = check_decode_inputs(q, kv_cache, indices, softmax_scale)
    if isinstance(d_v, bool) or not isinstance(d_v, int) or not 0 < d_v <= D_QK:
        raise ValueError(f"d_v must be an int in [1, {D_QK}], got {d_v!r}")
    n_tokens = dims["num_blocks"] * dims["block_size"]
    valid = (indices >= 0) & (indices < n_tokens)  # [B, s_q, k]; anything else is an unused slot
    token = torch.where(valid, indices, 0).long()  # unused slots read token 0, masked below
    if n_tokens == 0:  # nothing to read at all: every slot is unused
        kv = torch.zeros(*indices.shape, D_QK, device=q.device)
    else:
        # the selected tokens' rows (as bytes: any device indexes those) [B, s_q, k, 1, 656], dequantised
        rows = kv_cache.view(torch.uint8)[token // dims["block_size"], token % dims["block_size"]]
        rows = rows.view(torch.float8_e4m3fn).reshape(-1, 1, 1, TOKEN_BYTES)
        kv = dequantize(rows).float().view(*token.shape, D_QK)  # [B, s_q, k, 576]
    # score_j = softmax_scale * q . kv_j over all 576 dims: [B, s_q, h, k]
    scores = torch.einsum("bthd,btjd->bthj", q.float(), kv) * softmax_scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, s_q, h]; -inf where nothing is selected
    empty = torch.isneginf(lse)
    # p_j = exp(score_j - lse); 0 for a row with nothing selected (where the subtraction is NaN)
    p = torch.exp(scores - lse.unsqueeze(-1)).masked_fill(empty.unsqueeze(-1), 0.0)
    # out = sum_j p_j kv_j[:d_v]: [B, s_q, h, d_v]
    out = torch.einsum("bthj,btjv->bthv", p, kv[..., :d_v])
    return out, lse.masked_fill(empty, float("inf"))


# ----------------------------------------------------------------------------- CUDA

#: The kernels of cuda/sparse_mla_decode_fp8.cu, "kernel N" as its header numbers them.
SPARSE_MLA_DECODE_FP8_KERNELS = KernelTable("sparse_mla_decode_fp8", [
    Kernel(1, "sparse_mla_decode_fp8_simt", "float32 CUDA cores: 32 heads a block, 32 tokens at a time "
           "dequantised to float32 in shared memory, online softmax",
           needs="149 KiB of shared memory a block"),
    Kernel(2, "sparse_mla_decode_fp8_mma", "tensor cores (mma.sync bf16): 64 heads a block, 64 tokens at a "
           "time gathered by cp.async and dequantised to bf16 in shared memory; the selection split over "
           "several blocks (then merged by a combine kernel) when the batch leaves SMs idle",
           needs="16-byte aligned q, kv_cache and out, a block stride a multiple of 16 bytes; 226.5 of the "
                 "227 KiB of shared memory a block"),
    Kernel(3, "sparse_mla_decode_fp8_wgmma", "Hopper's warpgroup MMA (wgmma bf16, both operands in shared "
           "memory): kernel 2's gather, dequantisation and split, two warpgroups of 32 keys each for Q K^T "
           "and 256 output values each for P V",
           needs="compute capability 9.0 (sm_90a); 16-byte aligned q, kv_cache and out, a block stride a "
                 "multiple of 16 bytes; all 227 KiB of shared memory a block"),
    Kernel(4, "sparse_mla_decode_fp8_ws", "kernel 3's wgmma math, warp-specialised: a producer warpgroup "
           "loads the next tile's FP8 rows into registers and dequantises them into one of two bf16 buffers "
           "while two consumer warpgroups compute on the other (mbarrier hand-over, setmaxnreg); the same "
           "split and combine",
           needs="compute capability 9.0 (sm_90a); 16-byte aligned q, kv_cache and out, a block stride a "
                 "multiple of 16 bytes; 226 of the 227 KiB of shared memory a block"),
], best_first=(4, 3, 2, 1))  # the fastest that runs: kernels 3 and 4 need compute capability 9.0
# (sm_90a), else mma.sync

#: The combine kernel of the same file: merges kernel 2's, 3's or 4's partial results (not a version of the table).
COMBINE_ENTRY = "sparse_mla_decode_fp8_combine"


def decode_splits(n_rows: int, n_heads: int, k: int, n_sms: int) -> tuple[int, int]:
    """(n_splits, tiles_per_split) for kernels 2, 3 and 4, from shapes only: n_rows = B * s_q query rows of
    n_heads heads, k selected slots, n_sms SMs. Kernel 2 runs n_rows * n_heads / MMA_HEADS blocks of
    one per SM (kernels 3 and 4 the same); when there are fewer than half as many blocks as SMs, each row's ceil(k / MMA_TILE)
    tiles are cut into splits of at least SPLIT_MIN_TILES tiles, each split a block of its own: as many
    splits as fit the SMs in one wave (n_sms // blocks; more would make a second wave, which costs as
    much as it saves)."""
    d = SPARSE_MLA_DECODE_FP8_KERNELS.defines()
    n_tiles = max(1, math.ceil(k / d["MMA_TILE"]))
    blocks = n_rows * max(1, n_heads // d["MMA_HEADS"])
    splits = min(n_sms // blocks, n_tiles // d["SPLIT_MIN_TILES"])
    if splits <= 1:
        return 1, n_tiles
    tiles_per_split = math.ceil(n_tiles / splits)
    return math.ceil(n_tiles / tiles_per_split), tiles_per_split  # no split left empty


def _device_limits(device: torch.device) -> tuple[int, int]:
    """(shared memory one block may ask for, SMs) of a GPU: host metadata (torch caches it)."""
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)
    return smem, props.multi_processor_count


def _why_not(q, kv_cache, out, block_stride: int, smem_limit: int) -> dict[int, str | None]:
    """For SPARSE_MLA_DECODE_FP8_KERNELS.choose: why each version cannot run these inputs (None: it can)."""
    d = SPARSE_MLA_DECODE_FP8_KERNELS.defines()
    misaligned = [name for name, x in (("q", q), ("kv_cache", kv_cache), ("out", out)) if x.data_ptr() % 16]

    def tensor_cores(smem: int) -> str | None:  # kernels 2 to 4: 16-byte rows (cp.async, loads), `smem` bytes
        return (f"{', '.join(misaligned)} must start on a 16-byte boundary (cp.async and 16-byte rows)"
                if misaligned else
                f"the cache's block stride ({block_stride} bytes) must be a multiple of 16 (cp.async rows)"
                if block_stride % 16 else
                f"needs {smem} bytes of shared memory a block, this GPU allows {smem_limit}"
                if smem_limit < smem else None)

    return {
        1: (f"needs {d['SIMT_SMEM_BYTES']} bytes of shared memory a block, this GPU allows {smem_limit}"
            if smem_limit < d["SIMT_SMEM_BYTES"] else None),
        2: tensor_cores(d["MMA_SMEM_BYTES"]),
        # sm_90a first: the reason that matters most
        3: fp8.wgmma_why_not(q.device) or tensor_cores(d["WGMMA_DYNAMIC_SMEM"]),
        4: fp8.wgmma_why_not(q.device) or tensor_cores(d["WS_DYNAMIC_SMEM"]),
    }


def _launch(version: int, q, kv_cache, indices, softmax_scale: float, out, lse, n_sms: int,
            block_stride: int) -> None:
    """The launches of kernel `version` (and of the combine kernel after a split kernel 2, 3 or 4).
    Kernels read the cache through its address and block stride (it need not be contiguous)."""
    d = SPARSE_MLA_DECODE_FP8_KERNELS.defines()
    batch, s_q, n_heads, _ = q.shape
    n_rows, k = batch * s_q, indices.shape[-1]
    num_blocks, block_size = kv_cache.shape[:2]
    cache = np.uint64(kv_cache.data_ptr())  # by address: the cache may be strided, launch wants contiguous
    common = (num_blocks, block_size, np.int64(block_stride))
    if version == 1:
        args = (q, cache, indices, out, lse, n_heads, k, *common, float(softmax_scale))
        SPARSE_MLA_DECODE_FP8_KERNELS.launch(1, (n_rows, n_heads // d["SIMT_HEADS"]), d["SIMT_THREADS"], args,
                                             shared_mem=d["SIMT_SMEM_BYTES"])
        return
    n_splits, tiles_per_split = decode_splits(n_rows, n_heads, k, n_sms)
    if n_splits == 1:  # one block a (row, head group) writes out and lse itself: no workspace (null pointers)
        o_partial = lse_partial = np.uint64(0)
    else:  # each split writes its normalised partial output and lse; the combine kernel merges them
        o_partial = torch.empty(n_splits, n_rows, n_heads, D_NOPE, dtype=torch.float32, device=q.device)
        lse_partial = torch.empty(n_splits, n_rows, n_heads, dtype=torch.float32, device=q.device)
    args = (q, cache, indices, out, lse, o_partial, lse_partial, n_heads, k, *common, tiles_per_split,
            float(softmax_scale))
    grid = (n_rows * (n_heads // d["MMA_HEADS"]), 1, n_splits)  # the head groups of a row next to each other
    threads, smem = {2: (d["MMA_THREADS"], d["MMA_SMEM_BYTES"]), 3: (d["WGMMA_THREADS"], d["WGMMA_DYNAMIC_SMEM"]),
                     4: (d["WS_THREADS"], d["WS_DYNAMIC_SMEM"])}[version]
    SPARSE_MLA_DECODE_FP8_KERNELS.launch(version, grid, threads, args, shared_mem=smem)
    if n_splits > 1:
        pairs = n_rows * n_heads
        kernels.launch(SPARSE_MLA_DECODE_FP8_KERNELS.source, COMBINE_ENTRY, -(-pairs // d["COMBINE_WARPS"]),
                       d["COMBINE_THREADS"], (o_partial, lse_partial, out, lse, pairs, n_splits))


def _outputs(dims: dict[str, int], out, lse, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`out` bfloat16 [B, s_q, h, 512] and `lse` float32 [B, s_q, h], contiguous: checked when given,
    else new."""
    shape = (dims["B"], dims["s_q"], dims["h"])
    if out is None:
        out = torch.empty(*shape, D_NOPE, dtype=torch.bfloat16, device=device)
    check_tensor(out, "out", shape=(*shape, D_NOPE), dtype=torch.bfloat16, device=device, contiguous=True)
    if lse is None:
        lse = torch.empty(shape, dtype=torch.float32, device=device)
    check_tensor(lse, "lse", shape=shape, dtype=torch.float32, device=device, contiguous=True)
    return out, lse


def sparse_mla_decode_fp8_cuda(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                               softmax_scale: float, *, kernel: int | None = None,
                               out: torch.Tensor | None = None,
                               lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`cuda/sparse_mla_decode_fp8.cu`: sparse_mla_decode_fp8 on the GPU. Returns (out bfloat16
    [B, s_q, h, 512], lse float32 [B, s_q, h]), written into `out` and `lse` when given.

    q [B, s_q, h, 576] bfloat16, contiguous, h in {64, 128} (a multiple of MMA_HEADS up to MAX_HEADS
    of the .cu); any s_q; kv_cache float8_e4m3fn [num_blocks, block_size, 1, 656] (any block_size,
    blocks may be strided); indices int32 [B, s_q, k], contiguous, any k >= 0 (a ragged last tile
    is padded with unused slots). `kernel`: a version of SPARSE_MLA_DECODE_FP8_KERNELS (1 float32
    CUDA cores; 2 tensor cores, mma.sync; 3 tensor cores, wgmma, compute capability 9.0 only; 4 kernel 3
    warp-specialised, compute capability 9.0 only); None takes kernel 3 where it applies (compute
    capability 9.0), else 2, else 1.

    No host synchronisation (CUDA-graph capturable): shapes, dtypes, strides and alignment are
    checked always; the index values only with data checks on (checks.set_data_checks, DSA_CHECK=1).
    Unchecked, an index outside [0, num_blocks * block_size) is an unused slot: never read."""
    dims = check_decode_inputs(q, kv_cache, indices, softmax_scale, for_kernels=True, cuda=True)
    out, lse = _outputs(dims, out, lse, q.device)
    smem_limit, n_sms = _device_limits(q.device)
    why_not = _why_not(q, kv_cache, out, dims["block_stride"], smem_limit)
    chosen = SPARSE_MLA_DECODE_FP8_KERNELS.choose(kernel, why_not)
    batch, s_q, k = dims["B"], dims["s_q"], dims["k"]
    if batch * s_q == 0:
        return out, lse
    if k == 0 or dims["num_blocks"] * dims["block_size"] == 0:  # nothing can be selected: the empty sum
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    _launch(chosen.version, q, kv_cache, indices, softmax_scale, out, lse, n_sms, dims["block_stride"])
    return out, lse
