"""Rotary position embedding (RoPE) with DeepSeek's YaRN frequencies, in both pair layouts.

RoPE rotates each pair of coordinates of a vector by an angle proportional to the token's
position. For position m and pair i, with frequency theta_i:

    [y_a]   [cos(m theta_i)  -sin(m theta_i)] [x_a]
    [y_b] = [sin(m theta_i)   cos(m theta_i)] [x_b]

Two layouts decide which coordinates form pair i of a d_R-dim vector:

* ``"interleaved"``: (x[2i], x[2i+1]), what MLA uses for q^R and k^R (`rotate_interleaved`);
* ``"half"``: (x[i], x[i + d_R/2]), what the lightning indexer uses (`rotate_half`).

They are different functions: applying one where the other is expected scrambles the
frequencies (a bug seen in ports of the indexer). The frequencies are those of the official
DeepSeek-V3.2 ``precompute_freqs_cis``: theta_i = rope_theta^(-2i/d_R), blended towards
theta_i / rope_factor by YaRN when ``max_seq_len > original_seq_len``, computed here in float64.

Interface (used by `mla`, the indexer and the kernels):

    inv_freq(args)                     -> float64 [d_R/2], YaRN-corrected theta_i (cached per args)
    precompute_freqs_cis(args)         -> complex128 [max_seq_len, d_R/2], e^{i m theta_i}
    rope_angles(positions, args)       -> float64 [T, d_R/2], m theta_i
    apply_rope(x, positions, layout="interleaved", args=ModelArgs())
        x [T, d_R], [T, H, d_R] or [B, T, H, d_R]; positions int64 [T], 0 <= p < max_seq_len;
        returns x's shape and dtype (computed in float64).
    apply_rope_cuda(x, positions, layout, args)   cuda/apply_rope.cu: x [T, d_R] or [T, H, d_R],
                                       float32 / bfloat16, on the GPU; kernels in APPLY_ROPE_KERNELS
    cos_sin_table(args, device)        -> (cos, sin) float32 [max_seq_len, d_R/2], what kernels read
"""
from __future__ import annotations

import functools
import math

import torch

from .checks import FLOATS_BF16, check_range, check_same_device, check_tensor
from .config import ModelArgs, check_args
from .kernels import Kernel, KernelTable

__all__ = ["LAYOUTS", "inv_freq", "precompute_freqs_cis", "rope_angles", "rotate_interleaved", "rotate_half",
           "apply_rope", "cos_sin_table", "apply_rope_cuda", "APPLY_ROPE_KERNELS"]

LAYOUTS = ("interleaved", "half")

#: The kernels of cuda/apply_rope.cu; apply_rope_cuda(kernel=None) takes the highest that applies.
APPLY_ROPE_KERNELS = KernelTable("apply_rope", [
    Kernel(1, "apply_rope_{layout}_{dtype}", "pairs: one thread per pair, a grid-stride loop; any even d_R"),
    Kernel(2, "apply_rope_{layout}_vec_{dtype}", "vector: one thread per 16-byte chunk, ROPE_UNROLL chunks in flight",
           needs="d_R (interleaved) or d_R/2 (half) a multiple of 4 float32 / 8 bf16 values, 16-byte aligned x "
                 "and out, fewer than 2^31 chunks"),
], variants={"layout": LAYOUTS, "dtype": ("f32", "bf16")})


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    """The dimension index whose wavelength fits `num_rotations` times into `max_seq_len`."""
    return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


@functools.lru_cache(maxsize=None)
def _inv_freq(args: ModelArgs) -> torch.Tensor:
    d_rope, base = args.qk_rope_head_dim, args.rope_theta
    # theta_i = base^(-2i / d_R), i = 0 .. d_R/2 - 1: [d_R/2]
    theta = 1.0 / (base ** (torch.arange(0, d_rope, 2, dtype=torch.float64) / d_rope))
    if args.max_seq_len <= args.original_seq_len:
        return theta
    # YaRN: dims rotating more than beta_fast times over the original context keep theta_i,
    # dims rotating fewer than beta_slow times get theta_i / factor, a linear ramp in between.
    low = max(math.floor(_yarn_correction_dim(args.beta_fast, d_rope, base, args.original_seq_len)), 0)
    high = min(math.ceil(_yarn_correction_dim(args.beta_slow, d_rope, base, args.original_seq_len)), d_rope - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d_rope // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    # theta_i <- theta_i / factor * (1 - smooth_i) + theta_i * smooth_i
    return theta / args.rope_factor * (1 - smooth) + theta * smooth


def inv_freq(args: ModelArgs = ModelArgs()) -> torch.Tensor:
    """The rotation frequencies theta_i (YaRN-corrected), float64 [d_R/2], cached per args."""
    return _inv_freq(check_args(args)).clone()


@functools.lru_cache(maxsize=8)
def _inv_freq_on(args: ModelArgs, device: torch.device) -> torch.Tensor:
    """inv_freq on `device`, copied there once: a GPU caller then copies nothing from the host per call
    (which also lets a CUDA graph capture it). Shared: never modified."""
    return _inv_freq(args).to(device)


def precompute_freqs_cis(args: ModelArgs = ModelArgs()) -> torch.Tensor:
    """e^{i m theta_i} for every position m < max_seq_len: complex128 [max_seq_len, d_R/2].

    The official code's table (there in float32); pair i of position m is multiplied by entry [m, i].
    """
    theta = inv_freq(args)
    # m theta_i: [max_seq_len, d_R/2]
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64), theta)
    return torch.polar(torch.ones_like(angles), angles)


def rope_angles(positions: torch.Tensor, args: ModelArgs = ModelArgs()) -> torch.Tensor:
    """m theta_i for each position m: float64 [T, d_R/2], on the positions' device.

    0 <= m < max_seq_len is checked for CPU positions, and for GPU ones with data checks on."""
    check_tensor(positions, "positions", shape=("T",), dtype=torch.int64)
    check_range(positions, "positions", 0, args.max_seq_len - 1)  # device data: checks.data_checks_wanted
    theta = _inv_freq_on(args, positions.device)
    # m theta_i: [T, d_R/2]  (the same float64 product as precompute_freqs_cis's table entries)
    return positions.to(torch.float64)[:, None] * theta[None, :]


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by angle i: x [..., d_R], cos and sin broadcast to [..., d_R/2]."""
    x_a, x_b = x[..., 0::2], x[..., 1::2]  # [..., d_R/2] each
    # y_2i = x_2i cos - x_2i+1 sin,  y_2i+1 = x_2i sin + x_2i+1 cos
    y_a = x_a * cos - x_b * sin
    y_b = x_a * sin + x_b * cos
    return torch.stack([y_a, y_b], dim=-1).flatten(-2)  # [..., d_R], pairs interleaved again


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d_R/2]) by angle i: x [..., d_R], cos and sin broadcast to [..., d_R/2]."""
    x_a, x_b = x.chunk(2, dim=-1)  # [..., d_R/2] each
    # y_i = x_i cos - x_{i+d_R/2} sin,  y_{i+d_R/2} = x_i sin + x_{i+d_R/2} cos
    y_a = x_a * cos - x_b * sin
    y_b = x_a * sin + x_b * cos
    return torch.cat([y_a, y_b], dim=-1)  # [..., d_R], halves side by side again


def _check_rope_inputs(x, positions, layout, args) -> int:
    """Check the shapes, dtypes and devices of apply_rope's inputs (host metadata; the positions'
    range is rope_angles's); return the axis of x that holds the tokens."""
    check_args(args)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'interleaved' or 'half', got {layout!r}")
    check_tensor(x, "x", dtype=FLOATS_BF16)
    if x.dim() not in (2, 3, 4):
        raise ValueError(f"x must be [T, d_R], [T, H, d_R] or [B, T, H, d_R], got shape {list(x.shape)}")
    d_rope = x.shape[-1]
    if d_rope % 2:
        raise ValueError(f"the rotary dimension (last dim of x) must be even, got {d_rope}")
    if d_rope != args.qk_rope_head_dim:
        raise ValueError(f"the last dim of x must be qk_rope_head_dim = {args.qk_rope_head_dim}, got {d_rope}")
    token_axis = 1 if x.dim() == 4 else 0
    check_tensor(positions, "positions", shape=("T",), dims={"T": x.shape[token_axis]}, dtype=torch.int64)
    check_same_device(x=x, positions=positions)
    return token_axis


def apply_rope(x: torch.Tensor, positions: torch.Tensor, layout: str = "interleaved",
               args: ModelArgs = ModelArgs()) -> torch.Tensor:
    """RoPE on the whole last dim of x, token t rotated by positions[t].

    x [T, d_R], [T, H, d_R] or [B, T, H, d_R]; positions int64 [T] with 0 <= p < max_seq_len;
    layout "interleaved" (MLA) or "half" (the indexer). Computed in float64, returned in x's dtype.
    """
    token_axis = _check_rope_inputs(x, positions, layout, args)
    angles = rope_angles(positions, args)  # m theta_i: [T, d_R/2]
    # broadcast over heads: [T, 1, d_R/2] for [T, H, d_R] inputs, [T, 1, d_R/2] under a batch axis too
    angles = angles.view(angles.shape[0], *([1] * (x.dim() - token_axis - 2)), angles.shape[1])
    cos, sin = angles.cos(), angles.sin()
    rotate = rotate_interleaved if layout == "interleaved" else rotate_half
    return rotate(x.to(torch.float64), cos, sin).to(x.dtype)


@functools.lru_cache(maxsize=8)
def _cos_sin_table(args: ModelArgs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64), _inv_freq(args))
    return angles.cos().float().to(device), angles.sin().float().to(device)


def cos_sin_table(args: ModelArgs = ModelArgs(), device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos(m theta_i) and sin(m theta_i), computed in float64, stored float32 [max_seq_len, d_R/2].

    What the kernels read: an angle m theta_i can exceed 10^5 radians, far too large to form in
    float32 on the GPU (the product would be off by several 10^-3 rad), so the table is exact to
    float32 rounding instead. Cached per (args, device).
    """
    return _cos_sin_table(check_args(args), torch.device(device))


def apply_rope_cuda(x: torch.Tensor, positions: torch.Tensor, layout: str = "interleaved",
                    args: ModelArgs = ModelArgs(), out: torch.Tensor | None = None, *,
                    kernel: int | None = None) -> torch.Tensor:
    """`cuda/apply_rope.cu`: apply_rope on the GPU. x [T, d_R] or [T, H, d_R] float32 or bfloat16,
    contiguous (the reference also takes a batch axis and float64); positions int64 [T] on the same
    GPU. Returns `out` (a new tensor like x when None).

    `kernel`: a version of APPLY_ROPE_KERNELS (1 pairs, 2 vector); None takes the highest that
    applies. Positions outside [0, max_seq_len) are refused only with the package's data checks on
    (checks.set_data_checks, DSA_CHECK=1: reading them is a device sync); with them off the kernels
    write NaN for such a token and never read outside the table."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        raise ValueError(f"apply_rope_cuda takes x [T, d_R] or [T, H, d_R], got shape {list(x.shape)}")
    _check_rope_inputs(x, positions, layout, args)
    check_tensor(x, "x", dtype=(torch.float32, torch.bfloat16), cuda=True, contiguous=True)
    check_tensor(positions, "positions", contiguous=True)
    check_range(positions, "positions", 0, args.max_seq_len - 1)  # device data: only with data checks on
    out = torch.empty_like(x) if out is None else out
    check_tensor(out, "out", shape=tuple(x.shape), dtype=x.dtype, device=x.device, contiguous=True)
    n_tokens, n_heads, d_rope = x.shape[0], (x.shape[1] if x.dim() == 3 else 1), x.shape[-1]
    defines = APPLY_ROPE_KERNELS.defines()
    chunk = 16 // x.element_size()  # values per 16-byte chunk of kernel 2
    span = d_rope if layout == "interleaved" else d_rope // 2  # values a row of chunks must tile
    n_chunks = n_tokens * n_heads * (span // chunk)
    why_not = {2: (f"needs d_R{'/2' if layout == 'half' else ''} = {span} a multiple of {chunk} values (16 bytes)"
                   if span % chunk else
                   "needs 16-byte aligned x and out" if x.data_ptr() % 16 or out.data_ptr() % 16 else
                   f"counts chunks in 32 bits, got {n_chunks}" if n_chunks >= 2**31 else None)}
    chosen = APPLY_ROPE_KERNELS.choose(kernel, why_not)
    n_pairs = n_tokens * n_heads * (d_rope // 2)
    if n_pairs == 0:
        return out
    cos, sin = cos_sin_table(args, x.device)
    threads = defines["ROPE_THREADS"]
    if chosen.version == 2:
        blocks = math.ceil(n_chunks / (threads * defines["ROPE_UNROLL"]))
    else:  # a grid-stride loop: at most ROPE_PAIRS_MAX_BLOCKS blocks
        blocks = min(math.ceil(n_pairs / threads), defines["ROPE_PAIRS_MAX_BLOCKS"])
    APPLY_ROPE_KERNELS.launch(chosen.version, blocks, threads,
                              (x.detach(), positions, cos, sin, out, n_tokens, n_heads, d_rope, args.max_seq_len),
                              layout=layout, dtype="f32" if x.dtype == torch.float32 else "bf16")
    return out
