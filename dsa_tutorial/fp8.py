"""FP8 for the lightning indexer: block quantisation and the FP8 MQA logits (SPEC sections 3 and 6).

Block quantisation (step 5 of the indexer, one scale per `block_size` values along the last dim):

    amax_b = max(max_{i in b} |x_i|, 1e-4)
    s_b    = amax_b / 448                       (scale_fmt=None)
    s_b    = 2^ceil(log2(amax_b / 448))         (scale_fmt="ue8m0": a power of two, 8 exponent bits)
    x_q,i  = e4m3(clamp(x_i / s_b, -448, 448))  (round to nearest even; saturate at +-448)
    x_i   ~= x_q,i * s_b                        (act_dequant)

FP8 MQA logits (DeepGEMM's fp8_mqa_logits), for query i and key j in [ks_i, ke_i):

    logits[i, j] = sum_h w[i, h] * ReLU(q[i, h] . k[j] * k_scale[j])

and -inf outside [ks_i, ke_i) when clean_logits. One call serves a packed batch of ragged causal
prefills: sequence n occupies keys [start_n, end_n), and its query at position t has
ks = start_n, ke = start_n + t + 1.

Which function runs where:

* `act_quant`, `mqa_logits` dispatch: the CUDA kernel for CUDA inputs, the reference otherwise.
* `act_quant_reference`, `mqa_logits_reference` are the specification (pure torch, any device;
  the logits reference computes in float64 and also accepts unquantised float inputs).
* `act_quant_cuda`, `mqa_logits_cuda` always run `cuda/act_quant.cu` / `cuda/fp8_mqa_logits.cu`.

`mqa_logits_cuda` runs one of four kernels of `cuda/fp8_mqa_logits.cu` (`kernel=`): "naive"
(kernel 1, scalar), "tensor_core" (kernel 2, mma.sync e4m3, which sm_90 emulates with f16 mma and
per-call conversions), "tensor_core_f16" (kernel 3: e4m3 converted to f16 once, f16 mma.sync,
float32 accumulation; the same products) and "wgmma" (kernel 4: Hopper's warpgroup MMA on the e4m3
values in shared memory, one warpgroup a block whose 128 rows are 128 / H queries x H heads;
compiled for sm_90a, so it runs on compute capability 9.0 only, and is refused elsewhere).
kernel=None, the default, takes `default_mqa_kernel(device)`: "wgmma" where it runs, else
"tensor_core_f16".

`mqa_logits` with clean_logits=False: the CUDA kernels write every position of the key range that
their block of queries computes (-inf where the row's own mask says so) and leave the columns
outside that range as `torch.empty` gave them: unspecified. Only [ks_i, ke_i) is defined.
"""
from __future__ import annotations

import torch

from .checks import check_range, check_same_device, check_tensor
from .kernels import launch, require_wgmma, wgmma_available

__all__ = [
    "FP8_E4M3_MAX",
    "AMAX_FLOOR",
    "act_quant",
    "act_quant_reference",
    "act_quant_cuda",
    "act_dequant",
    "block_scales",
    "round_trip",
    "mqa_logits",
    "mqa_logits_reference",
    "mqa_logits_cuda",
    "check_mqa_logits_inputs",
    "causal_ks_ke",
    "MQA_SUPPORTED_HEADS",
    "MQA_SUPPORTED_HEAD_DIM",
    "MQA_KERNELS",
    "default_mqa_kernel",
]

FP8_E4M3_MAX = 448.0  # largest finite e4m3fn value: 1.75 * 2^8
AMAX_FLOOR = 1e-4  # an all-zero block still gets a positive scale
SCALE_FORMATS = ("ue8m0", None)
ACT_QUANT_WARPS = 8  # warps per block of cuda/act_quant.cu: one quantisation block per warp (kernel 1)
ACT_QUANT_B128_BLOCKS_PER_WARP = 4  # kernel 2 (block_size 128): 4 consecutive blocks per warp
MQA_SUPPORTED_HEADS = (32, 64)  # H the CUDA kernel is compiled for (V3.2 uses 64)
MQA_SUPPORTED_HEAD_DIM = 128  # D: one 128-value block scale per key, four k32 steps
MQA_QUERIES_PER_CTA = 12  # kernel 2, as #defined in cuda/fp8_mqa_logits.cu (one query per warp)
MQA_THREADS = 32 * MQA_QUERIES_PER_CTA
MQA_F16_WARPS = 8  # kernel 3 (K3_WARPS): 32 heads a warp, so H / 32 warps a query
# kernel 4, mirroring the #defines of cuda/fp8_mqa_logits.cu (K4_*): one warpgroup a block, whose 128 rows
# of q (the wgmma N) are 128 / H queries x H heads; K4_STAGES key tiles of 64 keys x 128 e4m3 bytes
MQA_WGMMA_THREADS = 128
MQA_WGMMA_ROWS = 128
MQA_WGMMA_STAGES = 4
# dynamic shared memory: 1024 bytes of alignment slack, then K4_SMEM_BYTES: the q tile (128 rows x 128
# bytes), the key tiles and their scales (64 float32 a tile), the weights (128 float32): 51712 bytes
MQA_WGMMA_SMEM = 1024 + MQA_WGMMA_ROWS * 128 + MQA_WGMMA_STAGES * 64 * (128 + 4) + MQA_WGMMA_ROWS * 4
MQA_KERNELS = ("naive", "tensor_core", "tensor_core_f16", "wgmma")
MQA_FALLBACK_KERNEL = "tensor_core_f16"  # the fastest kernel where there is no wgmma


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
    # s = max(amax, 1e-4) / 448, one IEEE float32 division (448 as a tensor: torch's CUDA path would
    # multiply by 1/448 for a Python scalar, which can differ in the last bit)
    s = torch.clamp(amax.float(), min=AMAX_FLOOR) / torch.tensor(FP8_E4M3_MAX, device=amax.device)
    if scale_fmt is None:
        return s
    # s = 2^ceil(log2 s): s = m 2^e with m in [0.5, 1), so ceil(log2 s) = e, or e - 1 when m = 0.5
    mantissa, exponent = torch.frexp(s)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.ldexp(torch.ones_like(s), exponent)


def act_quant_reference(x: torch.Tensor, block_size: int = 128, scale_fmt="ue8m0"):
    """Reference block quantisation: (x_fp8 e4m3 [..., N], scales float32 [..., N // block_size])."""
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


def act_quant_cuda(x: torch.Tensor, block_size: int = 128, scale_fmt="ue8m0", *, kernel: str | None = None):
    """`cuda/act_quant.cu`: x float32 or bfloat16 on the GPU, contiguous; block_size a multiple of 32.

    kernel: "blockwise" (kernel 1, any block_size), "b128" (kernel 2: block_size 128, x 16-byte
    aligned) or None (the default: "b128" where it applies, else "blockwise").
    Bit-identical to act_quant_reference for finite inputs."""
    if kernel not in (None, "blockwise", "b128"):
        raise ValueError(f"kernel must be None, 'blockwise' or 'b128', got {kernel!r}")
    _check_quant_args(x, block_size, scale_fmt)
    check_tensor(x, "x", dtype=(torch.float32, torch.bfloat16), cuda=True, contiguous=True)
    if block_size % 32:
        raise ValueError(f"the CUDA act_quant needs block_size a multiple of 32 (one warp a block), got {block_size}")
    x_fp8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32, device=x.device)
    n_blocks = scales.numel()
    if n_blocks == 0:
        return x_fp8, scales
    fits_b128 = block_size == 128 and x.data_ptr() % 16 == 0  # one 16- or 8-byte load a lane
    if kernel == "b128" and not fits_b128:
        raise ValueError("the b128 act_quant kernel needs block_size 128 and a 16-byte aligned x")
    dtype = "f32" if x.dtype == torch.float32 else "bf16"
    if kernel == "b128" or (kernel is None and fits_b128):
        n_warps = (n_blocks + ACT_QUANT_B128_BLOCKS_PER_WARP - 1) // ACT_QUANT_B128_BLOCKS_PER_WARP
        launch("act_quant", f"act_quant_b128_{dtype}", grid=(n_warps + ACT_QUANT_WARPS - 1) // ACT_QUANT_WARPS,
               block=32 * ACT_QUANT_WARPS, args=(x, x_fp8, scales, n_blocks, scale_fmt == "ue8m0"))
    else:
        grid = (n_blocks + ACT_QUANT_WARPS - 1) // ACT_QUANT_WARPS
        launch("act_quant", f"act_quant_{dtype}", grid=grid, block=32 * ACT_QUANT_WARPS,
               args=(x, x_fp8, scales, n_blocks, block_size, scale_fmt == "ue8m0"))
    return x_fp8, scales


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt="ue8m0"):
    """Block-quantise x to e4m3: the CUDA kernel for a CUDA tensor (float32/bf16, contiguous),
    the reference otherwise. Returns (x_fp8 [..., N] float8_e4m3fn, scales [..., N // block_size] float32)."""
    if isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in (torch.float32, torch.bfloat16) \
            and isinstance(block_size, int) and block_size > 0 and block_size % 32 == 0 and x.is_contiguous():
        return act_quant_cuda(x, block_size, scale_fmt)
    return act_quant_reference(x, block_size, scale_fmt)


def round_trip(x: torch.Tensor, fmt: str = "e4m3", block_size: int = 128) -> torch.Tensor:
    """x after a trip through `fmt` and back, in float32: "e4m3" (act_quant, ue8m0 scales),
    "e5m2" (the same block scales against its own maximum, 57344) or "bf16" (no scale)."""
    if fmt == "bf16":
        return x.bfloat16().float()
    if fmt == "e4m3":
        return act_dequant(*act_quant_reference(x, block_size), block_size)
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


def check_mqa_logits_inputs(q, kv, weights, ks, ke, *, cuda: bool) -> dict:
    """Every check of fp8_mqa_logits, before any launch; returns the named dims (S_q, H, D, S_k).

    The reference (cuda=False) also takes unquantised float q and k; the kernel needs e4m3,
    H in MQA_SUPPORTED_HEADS, D = 128 and contiguous CUDA tensors."""
    k, k_scale = _split_kv(kv)
    dims: dict[str, int] = {}
    fp8 = (torch.float8_e4m3fn,)
    float_types = fp8 + (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    check_tensor(q, "q", shape=("S_q", "H", "D"), dims=dims, dtype=fp8 if cuda else float_types)
    check_tensor(k, "k (kv[0])", shape=("S_k", "D"), dims=dims, dtype=fp8 if cuda else float_types)
    check_tensor(k_scale, "k_scale (kv[1])", shape=("S_k",), dims=dims, dtype=torch.float32)
    check_tensor(weights, "weights", shape=("S_q", "H"), dims=dims, dtype=torch.float32)
    check_tensor(ks, "ks", shape=("S_q",), dims=dims, dtype=torch.int32)
    check_tensor(ke, "ke", shape=("S_q",), dims=dims, dtype=torch.int32)
    check_same_device(q=q, k=k, k_scale=k_scale, weights=weights, ks=ks, ke=ke)
    if cuda and dims["H"] not in MQA_SUPPORTED_HEADS:
        raise ValueError(f"the CUDA fp8_mqa_logits supports H in {MQA_SUPPORTED_HEADS} heads, got H = {dims['H']}")
    if cuda and dims["D"] != MQA_SUPPORTED_HEAD_DIM:
        raise ValueError(f"the CUDA fp8_mqa_logits supports head_dim D = {MQA_SUPPORTED_HEAD_DIM}, got D = {dims['D']}")
    if ks.numel():
        check_range(ks, "ks", 0, None)
        check_range(ke, "ke", None, dims["S_k"])
        if bool((ks > ke).any()):
            first = int((ks > ke).nonzero()[0, 0])
            raise ValueError(f"ks must be <= ke, got ks[{first}] = {int(ks[first])} > ke[{first}] = {int(ke[first])}")
    if cuda:
        for name, x in (("q", q), ("k (kv[0])", k), ("k_scale (kv[1])", k_scale), ("weights", weights),
                        ("ks", ks), ("ke", ke)):
            check_tensor(x, name, cuda=True, contiguous=True)
    return dims


def mqa_logits_reference(q, kv, weights, ks, ke, clean_logits: bool = True, query_chunk: int = 256):
    """Reference FP8 MQA logits in float64: logits [S_q, S_k] float32 with -inf outside [ks_i, ke_i).

    q [S_q, H, D] and k [S_k, D] may be e4m3 (their exact values are used) or unquantised floats
    (with k_scale = 1): that is the higher-precision reference the kernels are judged against.
    The reference always writes -inf outside the ranges (clean_logits only matters to the kernels)."""
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
    return logits


def default_mqa_kernel(device=None) -> str:
    """The fastest kernel of `cuda/fp8_mqa_logits.cu` that runs on `device` (default: the current
    GPU): "wgmma" (kernel 4) on compute capability 9.0, else "tensor_core_f16" (kernel 3)."""
    return "wgmma" if wgmma_available(device) else MQA_FALLBACK_KERNEL


def mqa_logits_cuda(q, kv, weights, ks, ke, clean_logits: bool = True, *, kernel: str | None = None,
                    out: torch.Tensor | None = None):
    """`cuda/fp8_mqa_logits.cu`: kernel "wgmma" (kernel 4, warpgroup MMA on e4m3, compute capability
    9.0 only), "tensor_core_f16" (kernel 3, f16 mma.sync on the converted e4m3 values), "tensor_core"
    (kernel 2, mma.sync e4m3), "naive" (kernel 1, scalar) or None (the fastest here: default_mqa_kernel).

    Returns logits [S_q, S_k] float32; outside [ks_i, ke_i) -inf when clean_logits, else unspecified.
    `out` (optional, [S_q, S_k] float32 contiguous) receives them: tests pass a poisoned buffer."""
    if kernel is not None and kernel not in MQA_KERNELS:
        raise ValueError(f"kernel must be one of {MQA_KERNELS} or None, got {kernel!r}")
    dims = check_mqa_logits_inputs(q, kv, weights, ks, ke, cuda=True)
    shape = (dims["S_q"], dims["S_k"])
    if out is None:
        logits = torch.empty(shape, dtype=torch.float32, device=q.device)
    else:
        logits = check_tensor(out, "out", shape=shape, dtype=torch.float32, device=q.device, contiguous=True)
    _launch_mqa_logits(q, kv, weights, ks, ke, logits, clean_logits, kernel)
    return logits


def _launch_mqa_logits(q, kv, weights, ks, ke, logits, clean_logits: bool, kernel: str | None = None) -> None:
    """The launch alone, on inputs already checked (the benchmark times this)."""
    if kernel is None:
        kernel = default_mqa_kernel(q.device)
    elif kernel == "wgmma":
        require_wgmma(q.device, instead=MQA_FALLBACK_KERNEL)
    k, k_scale = _split_kv(kv)
    S_q, H, _ = q.shape
    S_k = k.shape[0]
    if S_q == 0 or S_k == 0:
        return
    args = (q, k, k_scale, weights, ks, ke, logits, S_q, S_k)
    if kernel == "naive":
        if S_q > 65535:
            raise ValueError(f"the naive kernel puts queries on grid.y (at most 65535), got S_q = {S_q}")
        launch("fp8_mqa_logits", "fp8_mqa_logits_naive", grid=((S_k + 127) // 128, S_q), block=128,
               args=(*args, H, bool(clean_logits)))
    elif kernel == "tensor_core":
        grid = (S_q + MQA_QUERIES_PER_CTA - 1) // MQA_QUERIES_PER_CTA
        launch("fp8_mqa_logits", f"fp8_mqa_logits_h{H}", grid=grid, block=MQA_THREADS,
               args=(*args, bool(clean_logits)))
    elif kernel == "tensor_core_f16":
        queries_per_cta = MQA_F16_WARPS // (H // 32)  # 4 for H = 64, 8 for H = 32
        grid = (S_q + queries_per_cta - 1) // queries_per_cta
        launch("fp8_mqa_logits", f"fp8_mqa_logits_f16_h{H}", grid=grid, block=32 * MQA_F16_WARPS,
               args=(*args, bool(clean_logits)))
    elif kernel == "wgmma":
        queries_per_cta = MQA_WGMMA_ROWS // H  # 2 for H = 64, 4 for H = 32
        grid = (S_q + queries_per_cta - 1) // queries_per_cta
        launch("fp8_mqa_logits", f"fp8_mqa_logits_wgmma_h{H}", grid=grid, block=MQA_WGMMA_THREADS,
               shared_mem=MQA_WGMMA_SMEM, args=(*args, bool(clean_logits)))
    else:
        raise ValueError(f"kernel must be one of {MQA_KERNELS}, got {kernel!r}")


def mqa_logits(q, kv, weights, ks, ke, clean_logits: bool = True):
    """fp8_mqa_logits (SPEC section 6): the fastest CUDA kernel that runs on the inputs' GPU
    (default_mqa_kernel) for CUDA inputs, else the reference.

    q [S_q, H, D] e4m3, kv = (k [S_k, D] e4m3, k_scale [S_k] float32), weights [S_q, H] float32,
    ks, ke [S_q] int32 -> logits [S_q, S_k] float32."""
    if isinstance(q, torch.Tensor) and q.is_cuda:
        return mqa_logits_cuda(q, kv, weights, ks, ke, clean_logits)
    return mqa_logits_reference(q, kv, weights, ks, ke, clean_logits)
