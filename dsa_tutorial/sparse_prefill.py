"""Sparse MLA attention for prefill: every token of a prompt attends to its own top-k latents.

This is what FlashMLA's sparse prefill kernel (`flash_mla_sparse_fwd`) computes, and it is chapter 6's
sparse attention (`sparse_attention.sparse_mla_attention`) for one sequence: T query tokens, one
latent cache of S tokens (the prompt's own), and per token t a selection S_t of k positions in it
(the indexer's top-k, causality already in it: token t only lists positions it may see). For head i:

    score_t,i,j = softmax_scale * q_t,i . kv_s          s = indices[t, 0, j] in S_t, all 576 values
    out_t,i     = sum_j exp(score_t,i,j - lse_t,i) kv_s[:d_v]                        [d_v = 512]
    max_logits_t,i = max_j score_t,i,j
    lse_t,i        = ln sum_j exp(score_t,i,j)            (natural log)

FlashMLA's layout: q [T, h, 576] (per head the absorbed query q^abs, 512 values, then its rotary part
q^R, 64), kv [S, 1, 576] (per token c^KV, 512 values, then k^R, 64: one head of keys, MQA), indices
[T, 1, k] int32; out [T, h, 512], max_logits and lse [T, h] float32. The two statistics are what a
caller needs to merge this result with attention over other keys (log-sum-exp merging), and what a
backward pass needs.

Conventions, as FlashMLA's kernel returns them (its code and its test reference, version of
2026-01-16; its README's formula, and its first release, still work in base 2):

* max_logits and lse are in natural units: softmax_scale * q . kv, and the natural log of the sum;
* a row whose selection holds no valid index gets out = 0, max_logits = -inf, lse = +inf (so that
  exp(-lse) = 0 gives it no weight when partial results are merged);
* an index that is -1, or not in [0, S), is an unused slot (FlashMLA: "-1 or any number >= s_kv").
  Here indices are device data: with data checks wanted (always on the CPU) they must be in
  [-1, S) and distinct within a row; unchecked (GPU, the default), anything outside [0, S) counts
  as unused, in the reference and in the kernels alike.

h must be 64 or 128 (FlashMLA's sparse prefill serves these: a GPU block takes 64 heads of a token;
pad the heads otherwise), q and kv 576 wide; k is any size up to MAX_TOPK (not a multiple of
anything).

Which function runs where:

* `sparse_mla_prefill` is the specification: pure torch, any device, float32 (float64 for float64
  inputs). Returns (out, max_logits, lse) in that dtype.
* `sparse_mla_prefill_cuda` runs `cuda/sparse_mla_prefill.cu`: bf16 in, out bf16 (rounded once, at
  the end), max_logits and lse float32. SPARSE_MLA_PREFILL_KERNELS lists its kernels: 1, tensor cores
  with mma.sync; 2, Hopper's wgmma (compute capability 9.0 only; the default there, kernel 1
  elsewhere). One kernel launch, no host synchronisation, CUDA-graph capturable.
"""
from __future__ import annotations

import torch

from .checks import FLOATS_BF16, check_shapes, check_tensor
from .fp8 import wgmma_why_not
from .kernels import Kernel, KernelTable
from .sparse_attention import _check_indices, _check_scale, gather_latents, sparse_mla_attention

__all__ = ["D_QK", "D_V", "HEADS", "MAX_TOPK", "sparse_mla_prefill", "sparse_mla_prefill_cuda",
           "SPARSE_MLA_PREFILL_KERNELS"]

D_QK = 576  # one latent [c^KV | k^R], the width q . kv runs over
D_V = 512  # FlashMLA's d_v: the c^KV part of each latent is the value
HEADS = (64, 128)  # the head counts FlashMLA's sparse prefill (and the kernels here) serve
MAX_TOPK = 1 << 30  # the kernels count slots in int32 (tile * 64 + row); far above any real top-k


def _check_prefill_inputs(q, kv, indices, softmax_scale, *, dtype=FLOATS_BF16) -> dict[str, int]:
    """Host checks of sparse_mla_prefill's inputs (always): shapes, dtypes, one device, h, k, the
    scale. Returns the dims T, h, S, k. The index values are checked separately (_check_indices)."""
    dims = check_shapes("q[T, h, d_qk] kv[S, 1, d_qk]", q, kv, dims={"d_qk": D_QK}, dtype=dtype, same_dtype=True)
    check_shapes("indices[T, 1, k]", indices, dims=dims, dtype=torch.int32, device=q.device)
    if dims["h"] not in HEADS:
        raise ValueError(f"h (query heads) must be 64 or 128, as FlashMLA's sparse prefill serves; pad the heads "
                         f"to one of them, got h = {dims['h']}")
    if dims["k"] > MAX_TOPK:
        raise ValueError(f"k (the selection size) must be at most {MAX_TOPK}, got k = {dims['k']}")
    _check_scale(softmax_scale)
    return dims


def sparse_mla_prefill(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, softmax_scale: float,
                       d_v: int = D_V) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [T, h, d_v], max_logits [T, h], lse [T, h]) of sparse MLA prefill (module docstring).

    q [T, h, 576] and kv [S, 1, 576] in one float dtype (bfloat16, float32 or float64), indices int32
    [T, 1, k]: distinct positions in [0, S) per row, -1 for unused slots. d_v: how many leading values
    of each latent are its value (FlashMLA's 512). Computed in float32 (float64 for float64 inputs).
    A row with nothing selected: out 0, max_logits -inf, lse +inf.
    """
    dims = _check_prefill_inputs(q, kv, indices, softmax_scale)
    if isinstance(d_v, bool) or not isinstance(d_v, int) or not 0 < d_v <= D_QK:
        raise ValueError(f"d_v must be an int in [1, {D_QK}], got {d_v!r}")
    _check_indices(indices, dims["S"])  # range and repeats: only when data checks are wanted
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    T, h, S, k = dims["T"], dims["h"], dims["S"], dims["k"]
    if S == 0 or k == 0:  # nothing can be selected: the empty sums
        return (torch.zeros(T, h, d_v, dtype=dtype, device=q.device),
                torch.full((T, h), float("-inf"), dtype=dtype, device=q.device),
                torch.full((T, h), float("inf"), dtype=dtype, device=q.device))
    q, kv = q.to(dtype), kv[:, 0].to(dtype)  # [T, h, 576], [S, 576]
    selected = indices[:, 0]  # [T, k]
    # unchecked indices: anything outside [0, S) is an unused slot, written -1 as chapter 6 writes it
    selected = torch.where((selected >= 0) & (selected < S), selected, -1)
    # out: chapter 6's sparse attention for ONE sequence (B = 1), each latent split at d_v into "c^KV"
    # (the value) and the rest; the scores run over both parts, i.e. over all 576 values
    out = sparse_mla_attention(q[None, ..., :d_v], q[None, ..., d_v:], kv[None, :, :d_v], kv[None, :, d_v:],
                               selected[None], softmax_scale)[0]  # [T, h, d_v]
    # the two statistics FlashMLA also returns need the scores themselves:
    # score_t,i,j = softmax_scale * q_t,i . kv_s_j, -inf for unused slots: [T, h, k]
    kv_selected = gather_latents(kv[None], selected[None])[0]  # [T, k, 576]
    scores = torch.einsum("thd,tjd->thj", q, kv_selected) * softmax_scale
    scores = scores.masked_fill((selected < 0)[:, None, :], float("-inf"))
    max_logits = scores.amax(dim=-1)  # -inf where nothing is selected
    lse = torch.logsumexp(scores, dim=-1)  # ln sum_j exp(score_j); -inf where nothing is selected ...
    return out, max_logits, lse.masked_fill(torch.isneginf(lse), float("inf"))  # ... +inf, FlashMLA's value


# ----------------------------------------------------------------------------- CUDA

#: The kernels of cuda/sparse_mla_prefill.cu, "kernel N" as its header numbers them. kernel=None takes
#: kernel 2 (wgmma) where it runs (compute capability 9.0), else kernel 1.
SPARSE_MLA_PREFILL_KERNELS = KernelTable("sparse_mla_prefill", [
    Kernel(1, "sparse_mla_prefill_mma", "tensor cores (mma.sync bf16), 64 heads of one token a block, the "
           "selected latents gathered into shared memory 64 at a time (cp.async, two stages)",
           needs="16-byte aligned q and kv; 225 KiB of shared memory a block"),
    Kernel(2, "sparse_mla_prefill_wgmma", "Hopper's warpgroup MMA (wgmma bf16, both operands in shared "
           "memory), two warpgroups: 32 keys each for Q K^T, 256 output values each for P V",
           needs="compute capability 9.0 (sm_90a); 16-byte aligned q and kv; 226 KiB of shared memory a block"),
], best_first=(2, 1))


def _smem_limit(device) -> int:
    """The dynamic shared memory a block may opt into on `device` (227 KiB on an H100 or H200)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _why_not(q, kv) -> dict[int, str | None]:
    """For SPARSE_MLA_PREFILL_KERNELS.choose: why each version cannot run these inputs (None: it can)."""
    d = SPARSE_MLA_PREFILL_KERNELS.defines()
    misaligned = [name for name, x in (("q", q), ("kv", kv)) if x.data_ptr() % 16]
    if misaligned:
        reason = f"{' and '.join(misaligned)} must start on a 16-byte boundary (cp.async rows); pass .clone()"
        return {1: reason, 2: reason}
    limit = _smem_limit(q.device)
    why = {version: f"needs {smem} bytes of shared memory a block, this GPU allows {limit}" if limit < smem else None
           for version, smem in ((1, d["MMA_SMEM_BYTES"]), (2, d["WGMMA_DYNAMIC_SMEM"]))}
    why[2] = wgmma_why_not(q.device) or why[2]  # sm_90a first: the reason that matters most
    return why


def _launch(version: int, q, kv, indices, softmax_scale: float, out, max_logits, lse) -> None:
    """One launch of kernel `version`: T * h / 64 blocks on grid.x (one a token and 64 heads)."""
    d = SPARSE_MLA_PREFILL_KERNELS.defines()
    n_tokens, n_heads = q.shape[0], q.shape[1]
    threads, smem = ((d["MMA_THREADS"], d["MMA_SMEM_BYTES"]) if version == 1 else
                     (d["WGMMA_THREADS"], d["WGMMA_DYNAMIC_SMEM"]))
    SPARSE_MLA_PREFILL_KERNELS.launch(version, n_tokens * (n_heads // d["PREFILL_HEADS"]), threads,
                                      (q, kv, indices, out, max_logits, lse, kv.shape[0], n_heads, indices.shape[-1],
                                       float(softmax_scale)), shared_mem=smem)


def _outputs(T: int, h: int, device, out, max_logits, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out bf16 [T, h, 512], max_logits and lse float32 [T, h], contiguous: checked when given, else new."""
    if out is None:
        out = torch.empty(T, h, D_V, dtype=torch.bfloat16, device=device)
    check_tensor(out, "out", shape=(T, h, D_V), dtype=torch.bfloat16, device=device, contiguous=True)
    results = [out]
    for name, given in (("max_logits", max_logits), ("lse", lse)):
        if given is None:
            given = torch.empty(T, h, dtype=torch.float32, device=device)
        results.append(check_tensor(given, name, shape=(T, h), dtype=torch.float32, device=device,
                                    contiguous=True))
    return tuple(results)


def sparse_mla_prefill_cuda(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, softmax_scale: float, *,
                            kernel: int | None = None, out: torch.Tensor | None = None,
                            max_logits: torch.Tensor | None = None,
                            lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cuda/sparse_mla_prefill.cu`: sparse MLA prefill (module docstring) on the GPU.

    q [T, h, 576] and kv [S, 1, 576] bfloat16, indices int32 [T, 1, k]; all contiguous on one GPU,
    q and kv 16-byte aligned, h in {64, 128}. Returns (out bfloat16 [T, h, 512], max_logits float32
    [T, h], lse float32 [T, h]), written into `out`, `max_logits`, `lse` when given (contiguous, of
    those shapes and dtypes). `kernel`: a version of SPARSE_MLA_PREFILL_KERNELS (1 mma.sync, 2 wgmma
    on compute capability 9.0) or None, kernel 1. One launch (none when T, k or S is 0), no host
    synchronisation.

    The index values are device data: checked (range, repeats) only when checks.data_checks_wanted.
    Unchecked, the kernels never read outside kv: an index outside [0, S) is an unused slot (-1).
    """
    if kernel is not None:
        SPARSE_MLA_PREFILL_KERNELS[kernel]  # a version of the table, or a clear error naming them
    dims = _check_prefill_inputs(q, kv, indices, softmax_scale, dtype=torch.bfloat16)
    for name, x in (("q", q), ("kv", kv), ("indices", indices)):
        check_tensor(x, name, cuda=True, contiguous=True)
    T, h, S, k = dims["T"], dims["h"], dims["S"], dims["k"]
    if T * (h // SPARSE_MLA_PREFILL_KERNELS.defines()["PREFILL_HEADS"]) > 2**31 - 1:
        raise ValueError(f"T * h / 64 (one block per token and 64 heads) must be below 2^31, got T = {T}, h = {h}")
    chosen = SPARSE_MLA_PREFILL_KERNELS.choose(kernel, _why_not(q, kv))
    _check_indices(indices, S)  # only with data checks on
    out, max_logits, lse = _outputs(T, h, q.device, out, max_logits, lse)
    if T == 0:
        return out, max_logits, lse
    if k == 0 or S == 0:  # nothing can be selected: the empty rows
        out.zero_()
        max_logits.fill_(float("-inf"))
        lse.fill_(float("inf"))
        return out, max_logits, lse
    _launch(chosen.version, q, kv, indices, softmax_scale, out, max_logits, lse)
    return out, max_logits, lse
