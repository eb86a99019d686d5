"""FP8 for the lightning indexer: block quantisation and the FP8 MQA logits.

Block quantisation (step 5 of the indexer, one scale per `block_size` values along the last dim):

    amax_b = max(max_{i in b} |x_i|, 1e-4)
    s_b    = amax_b * float32(1 / 448)          (scale_fmt=None: as the official kernel computes it)
    s_b    = 2^ceil(log2(amax_b / 448))         (scale_fmt="ue8m0": a power of two, 8 exponent bits)
    x_q,i  = e4m3(clamp(x_i / s_b, -448, 448))  (round to nearest even; saturate at +-448)
    x_i   ~= x_q,i * s_b                        (act_dequant)

FP8 MQA logits (DeepGEMM's fp8_mqa_logits), for query i and key j in [ks_i, ke_i):

    logits[i, j] = sum_h w[i, h] * ReLU(q[i, h] . k[j] * k_scale[j])

and -inf outside [ks_i, ke_i) when clean_logits. One call serves a packed batch of ragged causal
prefills: sequence n occupies keys [start_n, end_n), and its query at position t has
ks = start_n, ke = start_n + t + 1.

Which function runs where:

* `act_quant` and `mqa_logits` are the specification: pure torch, any device (the logits reference
  computes in float64 and also accepts unquantised float inputs).
* `act_quant_cuda` and `mqa_logits_cuda` run `cuda/act_quant.cu` and `cuda/mqa_logits.cu`; `kernel=`
  is a version of ACT_QUANT_KERNELS / MQA_LOGITS_KERNELS (what the .cu headers and chapter 7 call
  "kernel N"), None the best that runs these inputs on this GPU. Kernels 4 (wgmma) and 5 (TMA,
  warp-specialised, persistent) of the logits are compiled for sm_90a and run on compute capability
  9.0 only; elsewhere they are refused, and None takes kernel 3. Kernel 5 also needs q, k and the
  weights 16-byte aligned (TMA tensor maps); None takes kernel 5 where it runs, else kernel 4
  (MQA_LOGITS_KERNELS.best_first: kernel 5 measured 1.09 to 1.18 times kernel 4's speed on the H200).
  Kernels 2 to 4 copy q and k in 16-byte pieces: a q or k that does not start 16-byte aligned (a view
  at an odd offset) leaves kernel 1, which None then takes.

Neither `_cuda` function synchronises with the host: shapes, dtypes, devices and supported sizes are
checked always; the values of ks and ke only with data checks on (`checks.set_data_checks`, or
DSA_CHECK=1). With them off, a range outside [0, S_k] or reversed is clipped by the kernels to
[max(ks, 0), min(ke, S_k)) (empty when reversed): no access leaves the tensors, and the row holds
the logits of the clipped range.

`mqa_logits_cuda` with clean_logits=False: the kernels write every position of the key range that
their block of queries computes (-inf where the row's own mask says so) and leave the columns
outside that range as `out` (or `torch.empty`) had them: unspecified. Only [ks_i, ke_i) is defined.

Both the reference and the kernels store the logits as logits_dtype (DeepGEMM's keyword): float32,
or bfloat16 = the float32 logit rounded to nearest even (-inf kept). Every kernel is compiled once
per storage type (entry suffix _f32 / _bf16, the `out` variant of MQA_LOGITS_KERNELS), so a bf16
kernel writes exactly its float32 twin's logits rounded, in half the bytes.
"""
from __future__ import annotations

import functools

import torch

from . import kernels
from .checks import check_range, check_shapes, check_tensor, data_checks_wanted
from .kernels import Kernel, KernelTable

__all__ = [
    "FP8_E4M3_MAX",
    "AMAX_FLOOR",
    "LOGITS_DTYPES",
    "LOGITS_OUT",
    "ACT_QUANT_KERNELS",
    "MQA_LOGITS_KERNELS",
    "act_quant",
    "act_quant_cuda",
    "act_dequant",
    "block_scales",
    "round_trip",
    "causal_ks_ke",
    "check_logits_dtype",
    "check_mqa_logits_inputs",
    "mqa_logits",
    "mqa_logits_cuda",
    "wgmma_why_not",
]

FP8_E4M3_MAX = 448.0  # largest finite e4m3fn value: 1.75 * 2^8
AMAX_FLOOR = 1e-4  # an all-zero block still gets a positive scale
SCALE_FORMATS = ("ue8m0", None)
_FLOAT_INPUTS = (torch.float8_e4m3fn, torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOGITS_DTYPES = (torch.float32, torch.bfloat16)  # DeepGEMM's logits_dtype: what the logits are stored as

ACT_QUANT_KERNELS = KernelTable("act_quant", [
    Kernel(1, "act_quant_{dtype}", "one warp a quantisation block, any block_size that is a multiple of 32"),
    Kernel(2, "act_quant_b128_{dtype}", "block_size 128: 4 values a lane kept in registers, 4 blocks a warp in flight",
           needs="block_size 128 and x 16-byte aligned"),
], variants={"dtype": ("f32", "bf16")})

MQA_LOGITS_KERNELS = KernelTable("mqa_logits", [
    Kernel(1, "mqa_logits_naive_{out}", "one thread per (query, key), scalar float32: the formula in CUDA",
           needs="S_q <= 65535 (queries on grid.y)"),
    Kernel(2, "mqa_logits_e4m3_h{H}_{out}", "mma.sync e4m3, one query a warp (sm_90 emulates it with f16 mma)",
           needs="q and k 16-byte aligned"),
    Kernel(3, "mqa_logits_f16_h{H}_{out}", "e4m3 converted to f16 once, f16 mma.sync, float32 accumulation",
           needs="q and k 16-byte aligned"),
    Kernel(4, "mqa_logits_wgmma_h{H}_{out}", "Hopper's warpgroup MMA on the e4m3 values in shared memory",
           needs="compute capability 9.0 (sm_90a), q and k 16-byte aligned"),
    Kernel(5, "mqa_logits_tma_h{H}_{out}", "kernel 4's MMA fed by TMA: a producer thread, two consumer warpgroups "
           "sharing each key tile, a persistent grid",
           needs="compute capability 9.0 (sm_90a), q, k and weights 16-byte aligned, S_q * H < 2^31"),
], variants={"H": (64, 32), "out": ("f32", "bf16")}, best_first=(5, 4, 3, 2, 1))

# The `out` variant of the logits kernels (here and in paged.PAGED_MQA_LOGITS_KERNELS) for each logits_dtype
LOGITS_OUT = {torch.float32: "f32", torch.bfloat16: "bf16"}


def wgmma_why_not(device) -> str | None:
    """None where kernel 4 (wgmma, sm_90a) runs: a GPU of compute capability 9.0. Else the reason,
    naming the device's capability (what TABLE.choose refuses kernel 4 with)."""
    if kernels.wgmma_available(device):
        return None
    if kernels.gpu_available() and torch.device(device).type == "cuda":
        have = "{} has compute capability {}.{}".format(device, *torch.cuda.get_device_capability(device))
    else:
        have = f"{device} is not a usable CUDA GPU"
    return f"needs a GPU of compute capability 9.0 (H100, H200: wgmma, compiled for sm_90a), but {have}"


# ----------------------------------------------------------------------------- quantisation


def _check_quant_args(x: torch.Tensor, block_size: int, scale_fmt) -> None:
    check_tensor(x, "x", dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64))
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the one cut into blocks)")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if x.shape[-1] % block_size:
        raise ValueError(f"the last dim of x ({x.shape[-1]}) must be a multiple of block_size ({block_size})")
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be 'ue8m0' or None, got {scale_fmt!r}")


def block_scales(amax: torch.Tensor, scale_fmt="ue8m0") -> torch.Tensor:
    """The scale s of each block from its amax (float32), as the official act_quant computes it."""
    # s = max(amax, 1e-4) * float32(1/448): one float32 product with the float32 nearest 1/448, as the
    # official kernel computes it (a division by 448 differs from it in the last bit for about half of
    # all amax). The 0-dim float32 tensor keeps the constant in float32 on any device.
    s = torch.clamp(amax.float(), min=AMAX_FLOOR) * torch.tensor(1 / FP8_E4M3_MAX, dtype=torch.float32)
    if scale_fmt is None:
        return s
    # ue8m0 does not depend on that choice: product and quotient differ by at most one ulp, and they could
    # only straddle a power of two 2^e for an amax less than 2^-24 (relative) above 448 * 2^e; but the
    # float32 after 448 * 2^e = 1.75 * 2^(e + 8) is 2^-23 / 1.75 above it.
    # s = 2^ceil(log2 s): s = m 2^e with m in [0.5, 1), so ceil(log2 s) = e, or e - 1 when m = 0.5
    mantissa, exponent = torch.frexp(s)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.ldexp(torch.ones_like(s), exponent)


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt="ue8m0"):
    """Block quantisation: (x_fp8 e4m3 [..., N], scales float32 [..., N // block_size]).

    The specification, pure torch on any device; `act_quant_cuda` is bit-identical to it."""
    _check_quant_args(x, block_size, scale_fmt)
    x_blocks = x.float().unflatten(-1, (x.shape[-1] // block_size, block_size))  # [..., n_b, block]
    # amax_b = max_i |x_i| over each block: [..., n_b]
    amax = x_blocks.abs().amax(dim=-1)
    s = block_scales(amax, scale_fmt)  # [..., n_b]
    # x_q = e4m3(clamp(x / s, -448, 448)), round to nearest even
    x_q = torch.clamp(x_blocks / s.unsqueeze(-1), -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return x_q.flatten(-2), s


def act_dequant(x_fp8: torch.Tensor, scales: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """x ~= x_q * s, in float32: the inverse of act_quant up to the rounding it did."""
    check_tensor(x_fp8, "x_fp8", dtype=(torch.float8_e4m3fn, torch.float8_e5m2))
    if x_fp8.dim() == 0 or block_size <= 0 or x_fp8.shape[-1] % block_size:
        raise ValueError(f"the last dim of x_fp8 {list(x_fp8.shape)} must be a multiple of block_size {block_size}")
    check_tensor(scales, "scales", shape=(*x_fp8.shape[:-1], x_fp8.shape[-1] // block_size),
                 dtype=torch.float32, device=x_fp8.device)
    # x = x_q * s_b, each scale repeated over its block: [..., N]
    return (x_fp8.float().unflatten(-1, (-1, block_size)) * scales.unsqueeze(-1)).flatten(-2)


def act_quant_cuda(x: torch.Tensor, block_size: int = 128, scale_fmt="ue8m0", *, kernel: int | None = None,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """`cuda/act_quant.cu`: x float32 or bfloat16 on the GPU, contiguous; block_size a multiple of 32.

    kernel: a version of ACT_QUANT_KERNELS, 1 (any block_size) or 2 (block_size 128, x 16-byte
    aligned), or None (2 where it applies, else 1). `out` = (x_fp8, scales), preallocated.
    Bit-identical to act_quant for finite inputs; no host synchronisation."""
    if kernel is not None:
        ACT_QUANT_KERNELS[kernel]  # a version of the table, or a clear error naming them
    _check_quant_args(x, block_size, scale_fmt)
    check_tensor(x, "x", dtype=(torch.float32, torch.bfloat16), cuda=True, contiguous=True)
    if block_size % 32:
        raise ValueError(f"the CUDA act_quant needs block_size a multiple of 32 (one warp a block), got {block_size}")
    scales_shape = (*x.shape[:-1], x.shape[-1] // block_size)
    if out is None:
        x_fp8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        scales = torch.empty(scales_shape, dtype=torch.float32, device=x.device)
    else:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError("out must be the pair (x_fp8, scales)")
        x_fp8, scales = out
        check_tensor(x_fp8, "out[0] (x_fp8)", shape=tuple(x.shape), dtype=torch.float8_e4m3fn, device=x.device,
                     contiguous=True)
        check_tensor(scales, "out[1] (scales)", shape=scales_shape, dtype=torch.float32, device=x.device,
                     contiguous=True)
    misaligned = x.data_ptr() % 16
    chosen = ACT_QUANT_KERNELS.choose(kernel, {
        2: None if block_size == 128 and not misaligned else
        f"needs block_size 128 and x 16-byte aligned, got block_size {block_size} and x at {misaligned} bytes past "
        "a 16-byte boundary"})
    n_blocks = scales.numel()
    if n_blocks == 0:
        return x_fp8, scales
    d = ACT_QUANT_KERNELS.defines()
    dtype = "f32" if x.dtype == torch.float32 else "bf16"
    ue8m0 = scale_fmt == "ue8m0"
    if chosen.version == 2:  # B128_BLOCKS_PER_WARP consecutive blocks a warp
        n_warps = -(-n_blocks // d["B128_BLOCKS_PER_WARP"])
        ACT_QUANT_KERNELS.launch(2, grid=-(-n_warps // d["ACT_QUANT_WARPS"]), block=d["ACT_QUANT_THREADS"],
                                 args=(x, x_fp8, scales, n_blocks, ue8m0), dtype=dtype)
    else:  # one block a warp
        ACT_QUANT_KERNELS.launch(1, grid=-(-n_blocks // d["ACT_QUANT_WARPS"]), block=d["ACT_QUANT_THREADS"],
                                 args=(x, x_fp8, scales, n_blocks, block_size, ue8m0), dtype=dtype)
    return x_fp8, scales


def round_trip(x: torch.Tensor, fmt: str = "e4m3", block_size: int = 128) -> torch.Tensor:
    """x after a trip through `fmt` and back, in float32: "e4m3" (act_quant, ue8m0 scales),
    "e5m2" (the same block scales against its own maximum, 57344) or "bf16" (no scale)."""
    if fmt == "bf16":
        return x.bfloat16().float()
    if fmt == "e4m3":
        return act_dequant(*act_quant(x, block_size), block_size)
    if fmt == "e5m2":
        x_blocks = x.float().unflatten(-1, (-1, block_size))  # [..., n_b, block]
        # s = 2^ceil(log2(max(amax, 1e-4) / 57344))
        s = block_scales(x_blocks.abs().amax(-1, keepdim=True) * (FP8_E4M3_MAX / 57344.0))
        x_q = torch.clamp(x_blocks / s, -57344.0, 57344.0).to(torch.float8_e5m2)
        return (x_q.float() * s).flatten(-2)
    raise ValueError(f"fmt must be 'e4m3', 'e5m2' or 'bf16', got {fmt!r}")


# ----------------------------------------------------------------------------- MQA logits


def causal_ks_ke(seq_lens, device="cpu"):
    """ks, ke [sum(seq_lens)] int32 for a packed batch of causal prefills: query t of sequence n
    (keys [start_n, start_n + len_n)) sees keys start_n .. start_n + t."""
    seq_lens = [int(n) for n in seq_lens]
    if any(n < 0 for n in seq_lens):
        raise ValueError(f"sequence lengths must be >= 0, got {seq_lens}")
    starts = torch.tensor([0] + seq_lens[:-1], dtype=torch.int64).cumsum(0)
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    # ks_i = start of the sequence of query i: [S_q]
    ks = torch.repeat_interleave(starts, lens)
    # ke_i = i + 1 (the query itself is visible): [S_q]
    ke = torch.arange(int(lens.sum()), dtype=torch.int64) + 1
    return ks.to(torch.int32).to(device), ke.to(torch.int32).to(device)


def _split_kv(kv):
    if not isinstance(kv, (tuple, list)) or len(kv) != 2:
        raise TypeError("kv must be the pair (k, k_scale)")
    k, k_scale = kv
    if isinstance(k_scale, torch.Tensor) and k_scale.dim() == 2 and k_scale.shape[-1] == 1:
        k_scale = k_scale.squeeze(-1)  # act_quant's [S_k, 1] for D = 128
    return k, k_scale


def check_logits_dtype(logits_dtype) -> None:
    """logits_dtype (DeepGEMM's keyword) is torch.float32 or torch.bfloat16, for the references and the
    kernels alike. Host metadata only: checked before any launch."""
    if not isinstance(logits_dtype, torch.dtype) or logits_dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype must be torch.float32 or torch.bfloat16, got {logits_dtype!r}")


def check_mqa_logits_inputs(q, kv, weights, ks, ke, *, cuda: bool) -> dict:
    """Every check of fp8_mqa_logits, before any launch; returns the named dims (S_q, H, D, S_k).

    Always (host metadata, free): dtypes, shapes, one device; for the kernels (cuda=True) e4m3 q and
    k, H in MQA_LOGITS_KERNELS.variants["H"], D = the .cu's HEAD_DIM, contiguous CUDA tensors. The
    values of ks and ke (0 <= ks <= ke <= S_k) only where checks.data_checks_wanted: always on the
    CPU, on a GPU with data checks on (reading them waits for the device)."""
    k, k_scale = _split_kv(kv)
    values = (torch.float8_e4m3fn,) if cuda else _FLOAT_INPUTS  # the reference also takes unquantised floats
    named = (("q", q, values), ("k (kv[0])", k, values), ("k_scale (kv[1])", k_scale, torch.float32),
             ("weights", weights, torch.float32), ("ks", ks, torch.int32), ("ke", ke, torch.int32))
    for name, x, dtype in named:
        check_tensor(x, name, dtype=dtype)
    dims = check_shapes("q[S_q, H, D] k[S_k, D] k_scale[S_k] weights[S_q, H] ks[S_q] ke[S_q]",
                        q, k, k_scale, weights, ks, ke)
    if cuda and dims["H"] not in MQA_LOGITS_KERNELS.variants["H"]:
        raise ValueError(f"the CUDA mqa_logits supports H in {MQA_LOGITS_KERNELS.variants['H']} heads, "
                         f"got H = {dims['H']}")
    if cuda and dims["D"] != MQA_LOGITS_KERNELS.defines()["HEAD_DIM"]:
        raise ValueError(f"the CUDA mqa_logits supports head_dim D = {MQA_LOGITS_KERNELS.defines()['HEAD_DIM']}, "
                         f"got D = {dims['D']}")
    if cuda:  # the kernels take contiguous CUDA tensors (one device: check_shapes)
        for name, x, _ in named:
            if not (x.is_cuda and x.is_contiguous()):
                check_tensor(x, name, cuda=True, contiguous=True)
    if ks.numel() and data_checks_wanted(ks, ke):
        check_range(ks, "ks", 0, None)
        check_range(ke, "ke", None, dims["S_k"])
        reversed_rows = ks > ke
        if bool(reversed_rows.any()):
            first = int(reversed_rows.nonzero()[0, 0])
            raise ValueError(f"ks must be <= ke, got ks[{first}] = {int(ks[first])} > ke[{first}] = {int(ke[first])}")
    return dims


def mqa_logits(q, kv, weights, ks, ke, clean_logits: bool = True, query_chunk: int = 256, *,
               logits_dtype: torch.dtype = torch.float32):
    """FP8 MQA logits in float64: logits [S_q, S_k] with -inf outside [ks_i, ke_i), stored as
    logits_dtype: float32, or bfloat16 (those float32 values rounded to bfloat16, -inf kept).

    q [S_q, H, D] and k [S_k, D] may be e4m3 (their exact values are used) or unquantised floats
    (with k_scale = 1): that is the higher-precision reference the kernels are judged against.
    The reference always writes -inf outside the ranges (clean_logits only matters to the kernels)."""
    check_logits_dtype(logits_dtype)
    dims = check_mqa_logits_inputs(q, kv, weights, ks, ke, cuda=False)
    k, k_scale = _split_kv(kv)
    S_q, S_k = dims["S_q"], dims["S_k"]
    # k[j] * k_scale[j]: [S_k, D]
    k64 = k.double() * k_scale.double().unsqueeze(-1)
    j = torch.arange(S_k, device=q.device)
    logits = torch.empty(S_q, S_k, dtype=torch.float32, device=q.device)
    for start in range(0, S_q, query_chunk):
        rows = slice(start, min(start + query_chunk, S_q))
        # scores[i, h, j] = q[i, h] . (k[j] k_scale[j]): [chunk, H, S_k]
        scores = torch.einsum("ihd,jd->ihj", q[rows].double(), k64)
        # logits[i, j] = sum_h w[i, h] ReLU(scores[i, h, j]): [chunk, S_k]
        chunk = torch.einsum("ih,ihj->ij", weights[rows].double(), scores.relu())
        # -inf where j is outside [ks_i, ke_i): [chunk, S_k]
        visible = (j >= ks[rows, None].long()) & (j < ke[rows, None].long())
        logits[rows] = chunk.masked_fill(~visible, float("-inf")).float()
    return logits.to(logits_dtype)


def _mqa_logits_why_not(device, S_q: int, H: int = 64, misaligned: tuple[str, ...] = ()) -> dict:
    """The versions of MQA_LOGITS_KERNELS that cannot run here, and why (see KernelTable.choose).
    `misaligned`: the names of the inputs (q, k, weights) whose data is not 16-byte aligned."""
    wgmma = wgmma_why_not(device)
    tma = wgmma
    if tma is None and misaligned:
        tma = f"reads q, k and weights through TMA tensor maps: 16-byte aligned, but {', '.join(misaligned)} is not"
    if tma is None and S_q * H >= 2**31:
        tma = f"addresses the S_q * H rows of q with int32 TMA coordinates: fewer than 2^31, got {S_q * H}"
    copied = [name for name in misaligned if name in ("q", "k")]
    pieces = f"reads q and k in pieces of 4 and 16 bytes: 16-byte aligned, but {', '.join(copied)} is not" if copied else None
    return {1: None if S_q <= 65535 else f"puts the queries on grid.y: at most 65535, got S_q = {S_q}",
            2: pieces, 3: pieces, 4: wgmma or pieces, 5: tma}


def mqa_logits_cuda(q, kv, weights, ks, ke, clean_logits: bool = True, *, kernel: int | None = None,
                    out: torch.Tensor | None = None, logits_dtype: torch.dtype = torch.float32):
    """`cuda/mqa_logits.cu`: kernel = a version of MQA_LOGITS_KERNELS (1 naive, 2 mma.sync e4m3,
    3 f16 mma.sync, 4 wgmma on compute capability 9.0, 5 kernel 4's MMA fed by TMA, warp-specialised and
    persistent, 9.0 with q, k and weights 16-byte aligned) or None, the best that runs here (5, 4, else 3;
    1 when q or k is not 16-byte aligned).

    q [S_q, H, D] e4m3, kv = (k [S_k, D] e4m3, k_scale [S_k] float32), weights [S_q, H] float32,
    ks, ke [S_q] int32 -> logits [S_q, S_k] logits_dtype; outside [ks_i, ke_i) -inf when clean_logits,
    else unspecified. logits_dtype: torch.float32, or torch.bfloat16 (the float32 logits rounded to
    nearest even as the kernel stores them, -inf kept: half the bytes written). `out` (optional,
    [S_q, S_k] of logits_dtype, contiguous) receives them.

    No host synchronisation: ks and ke are checked only with data checks on; with them off, an
    invalid range is clipped to [max(ks, 0), min(ke, S_k)) (empty when reversed), never read or
    written out of bounds, and its row holds the logits of that clipped range."""
    if kernel is not None:
        MQA_LOGITS_KERNELS[kernel]  # a version of the table, or a clear error naming them
    check_logits_dtype(logits_dtype)
    dims = check_mqa_logits_inputs(q, kv, weights, ks, ke, cuda=True)
    k, k_scale = _split_kv(kv)
    misaligned = tuple(name for name, x in (("q", q), ("k", k), ("weights", weights)) if x.data_ptr() % 16)
    chosen = MQA_LOGITS_KERNELS.choose(kernel, _mqa_logits_why_not(q.device, dims["S_q"], dims["H"], misaligned))
    shape = (dims["S_q"], dims["S_k"])
    if out is None:
        out = torch.empty(shape, dtype=logits_dtype, device=q.device)
    else:
        check_tensor(out, "out", shape=shape, dtype=logits_dtype, device=q.device, contiguous=True)
    _launch_mqa_logits(chosen.version, q, k, k_scale, weights, ks, ke, out, clean_logits)
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    """The number of SMs of `device`: kernel 5's persistent grid."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_mqa_logits(version: int, q, k, k_scale, weights, ks, ke, logits, clean_logits: bool) -> None:
    """Launch kernel `version` on checked inputs, geometry from the .cu's #defines; the entry that
    stores logits's dtype (float32 or bfloat16)."""
    S_q, H, _ = q.shape
    S_k = k.shape[0]
    if S_q == 0 or S_k == 0:
        return
    d = MQA_LOGITS_KERNELS.defines()
    args = (q, k, k_scale, weights, ks, ke, logits, S_q, S_k)
    out = LOGITS_OUT[logits.dtype]
    if version == 1:  # one thread per (query, key): keys on grid.x, queries on grid.y
        threads = d["NAIVE_THREADS"]
        MQA_LOGITS_KERNELS.launch(1, grid=(-(-S_k // threads), S_q), block=threads, args=(*args, H, bool(clean_logits)),
                                  out=out)
        return
    if version == 5:  # persistent: one block an SM, each walking blocks of 2 x 256 / H queries
        rows, D = d["K5_CONSUMER_ROWS"], d["HEAD_DIM"]  # a consumer's q rows: 256 / H queries
        queries = d["K5_CONSUMERS"] * rows // H
        maps = (kernels.tensor_map_2d(q.view(S_q * H, D), rows, D, swizzle=128),  # TMA boxes: a consumer's q,
                kernels.tensor_map_2d(k, d["BLOCK_KV"], D, swizzle=128),       # a key tile,
                kernels.tensor_map_2d(weights, queries, H))                    # the block's weights
        grid = min(-(-S_q // queries), _sm_count(q.device))
        MQA_LOGITS_KERNELS.launch(5, grid=grid, block=d["K5_THREADS"], shared_mem=d["K5_DYNAMIC_SMEM"],
                                  args=(*maps, k_scale, ks, ke, logits, S_q, S_k, bool(clean_logits)), H=H, out=out)
        return
    queries, threads, smem = {  # queries a block, threads a block, dynamic shared memory
        2: (d["QUERIES_PER_CTA"], d["THREADS"], 0),
        3: (d["K3_WARPS"] // (H // d["K3_HEADS_PER_WARP"]), d["K3_THREADS"], 0),
        4: (d["K4_N"] // H, d["K4_THREADS"], d["K4_DYNAMIC_SMEM"]),
    }[version]
    MQA_LOGITS_KERNELS.launch(version, grid=-(-S_q // queries), block=threads, shared_mem=smem,
                              args=(*args, bool(clean_logits)), H=H, out=out)
