"""Top-k selection (equation 2 of the report): the k keys each query will attend to.

    S_t = Top-k(I_t,:)   over the positions s that query t may see (s <= its position)

The rules, the same in the reference (`select_topk`) and the kernel (`select_topk_cuda`):

* candidates: the visible positions (s <= query_positions[t]) whose score is not NaN. A NaN score is
  treated like a masked position: never selected (a NaN cannot be ranked, and attending to a token
  because its score is undefined would be worse than leaving the slot empty). -inf is an ordinary,
  lowest score: a visible -inf position is still a candidate.
* order: by value, largest first; +0.0 and -0.0 are the same value; among equal values the LOWER
  position wins. This makes the selected set unique, which torch.topk does not promise under ties.
* output: int32 [..., T, k], the selected positions in INCREASING order, then -1 in the slots left
  over when a row has fewer than k candidates (t < k - 1 in a causal prefill). The causal mask
  therefore holds after selection: no index is ever beyond its query's position.

The kernel ranks values through `order_key`, a map of float32 to uint32 that preserves order, the
way a radix select needs it; the reference uses the same map so the two agree bit for bit.

`topk_without_causal_mask` reproduces the leak of a mask built from top-k alone: torch.topk
on the masked scores, keeping whatever it returns, future positions included.

CUDA: `select_topk_cuda` launches one of the kernels of cuda/select_topk.cu (SELECT_TOPK_KERNELS:
kernel 1 reads the row four times, kernel 2 twice, kernels 3 and 4 once: kernel 3 into shared
memory, for rows that fit there, kernel 4 after a sample of it), one block per row.
"""
from __future__ import annotations

import numpy as np
import torch

from . import causal
from .checks import check_range, check_tensor
from .kernels import Kernel, KernelTable

__all__ = ["order_key", "visible_positions", "select_topk", "topk_without_causal_mask", "select_topk_cuda",
           "SELECT_TOPK_KERNELS", "select_topk_why_not", "select_topk_default", "shared_bytes", "list_capacity"]


def order_key(scores: torch.Tensor) -> torch.Tensor:
    """uint32 key (held in int64) with key(a) < key(b) exactly when a < b, for float32 scores.

    Non-negative floats: set the sign bit (they rank above every negative); negative floats: flip
    all bits (a larger magnitude becomes a smaller key). -0.0 is first made +0.0. NaN gets key 0,
    below every float (-inf has key 0x007FFFFF), so a NaN is never a candidate.
    """
    check_tensor(scores, "scores", dtype=torch.float32)
    # -0.0 + 0.0 = +0.0 in IEEE arithmetic; every other value is unchanged
    bits = (scores + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # the uint32 bit pattern
    negative = bits >= 0x80000000
    # key = ~bits for negatives, bits | 0x80000000 for the rest
    key = torch.where(negative, 0xFFFFFFFF - bits, bits | 0x80000000)
    return key.masked_fill(torch.isnan(scores), 0)


def visible_positions(n_queries: int, n_keys: int, query_positions: torch.Tensor | None = None,
                      device=None) -> torch.Tensor:
    """The last visible position of each query: query_positions, or by default the causal
    alignment to the end of the keys, arange(S - T, S) (query t is the token at slot S - T + t). [T]"""
    if query_positions is None:
        if n_queries > n_keys:
            raise ValueError(f"more queries ({n_queries}) than keys ({n_keys}): pass query_positions")
        return causal.last_visible(n_queries, n_keys, device)
    check_tensor(query_positions, "query_positions", shape=(n_queries,), dtype=(torch.int32, torch.int64))
    if query_positions.device != torch.device(device if device is not None else query_positions.device):
        raise ValueError(f"query_positions must be on {device}, got {query_positions.device}")
    check_range(query_positions, "query_positions", 0, n_keys - 1)
    return query_positions.long()


def _check_k(k, n_keys: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if k > n_keys:
        raise ValueError(f"k = {k} is larger than the sequence (S = {n_keys} keys)")


def _check_scores(scores, k, max_dims: int | None = None, **kwargs) -> tuple[int, int]:
    """scores float32 [..., T, S] (at most `max_dims` dims), k in [1, S]: returns (T, S)."""
    check_tensor(scores, "scores", dtype=torch.float32, **kwargs)
    if not 2 <= scores.dim() <= (max_dims or scores.dim()):
        form = "[T, S] or [B, T, S]" if max_dims == 3 else "[..., T, S]"
        raise ValueError(f"scores must be {form}, got shape {list(scores.shape)}")
    _check_k(k, scores.shape[-1])
    return scores.shape[-2], scores.shape[-1]


def select_topk(scores: torch.Tensor, k: int, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k of each row among the visible, non-NaN positions; int32 [..., T, k], ascending, -1 padded.

    scores float32 [..., T, S] (rows of index scores); k in [1, S]; query_positions int [T] (the last
    position each query sees, default arange(S - T, S)). See the module docstring for the rules.
    """
    n_queries, n_keys = _check_scores(scores, k)
    last = visible_positions(n_queries, n_keys, query_positions, scores.device)  # [T]
    # candidate: s <= position of t, and the score is a number: [..., T, S]
    candidate = (torch.arange(n_keys, device=scores.device) <= last[:, None]) & ~torch.isnan(scores)
    # rank key: order_key for candidates, -1 (below everything) for the rest: [..., T, S]
    key = torch.where(candidate, order_key(scores), torch.full_like(scores, -1, dtype=torch.int64))
    # largest key first; a stable sort keeps the lower position first among equal keys
    ranked = torch.sort(key, dim=-1, descending=True, stable=True)
    chosen = ranked.indices[..., :k]  # [..., T, k]
    chosen = torch.where(ranked.values[..., :k] >= 0, chosen, torch.full_like(chosen, n_keys))
    # ascending positions, non-candidates (set to S) last, then S -> -1
    chosen = chosen.sort(dim=-1).values
    return torch.where(chosen < n_keys, chosen, torch.full_like(chosen, -1)).to(torch.int32)


def topk_without_causal_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The leak: torch.topk of the scores, every returned index kept.

    When a row has fewer than k visible positions, torch.topk fills the rest with masked (-inf)
    positions, i.e. future tokens; attending to them leaks the answer. int64 [..., T, k].
    """
    _check_scores(scores, k)
    return scores.topk(k, dim=-1).indices


# ----------------------------------------------------------------------------- CUDA

#: The kernels of cuda/select_topk.cu, "kernel N" as its header and chapter 5 number them.
SELECT_TOPK_KERNELS = KernelTable("select_topk", [
    Kernel(1, "select_topk_four_passes", "radix select, four reads of the row"),
    Kernel(2, "select_topk_compact", "radix select, two reads of the row and a short list in shared memory"),
    Kernel(3, "select_topk_shared", "radix select, one read of the row into shared memory, passes 1-4 there",
           "rows of at most TOPK_SMEM_MAX_S scores"),
    Kernel(4, "select_topk_sampled", "radix select, a sample to guess a bucket, one read of the row into a "
           "short list in shared memory"),
])


def select_topk_why_not(n_keys: int, limits: dict[str, int] | None = None) -> dict[int, str | None]:
    """Why each version of SELECT_TOPK_KERNELS cannot run rows of `n_keys` scores (None: it can).
    Host-only: kernel 3 holds the whole row in shared memory, so it takes rows of at most
    TOPK_SMEM_MAX_S scores; the others take any row the call admits."""
    limits = limits or SELECT_TOPK_KERNELS.defines()
    most = limits["TOPK_SMEM_MAX_S"]
    fits = n_keys <= most
    return {1: None, 2: None, 3: None if fits else f"rows of at most {most} scores (one block's shared memory), "
                                                   f"got S = {n_keys}", 4: None}


def select_topk_default(n_keys: int, limits: dict[str, int] | None = None) -> int:
    """The version `select_topk_cuda` runs by default on rows of `n_keys` scores (host-only):
    kernel 3 up to TOPK_ONE_BLOCK_S scores (a row in one block's shared memory, several blocks an
    SM), kernel 4 for longer rows (one read into a short list)."""
    limits = limits or SELECT_TOPK_KERNELS.defines()
    return 3 if n_keys <= limits["TOPK_ONE_BLOCK_S"] and select_topk_why_not(n_keys, limits)[3] is None else 4


def shared_bytes(version: int, n_keys: int, limits: dict[str, int] | None = None) -> int:
    """The dynamic shared memory kernel `version` needs for rows of `n_keys` scores (host-only):
    kernels 2 and 4 a list (a key and a position an entry; never more entries than the row has
    scores), kernel 3 its histogram and the row's keys, with 4 slots of alignment."""
    limits = limits or SELECT_TOPK_KERNELS.defines()
    if version == 3:
        return 4 * (limits["RADIX_BINS"] + (n_keys + 3) // 4 * 4 + 4)
    return limits["TOPK_LIST_ENTRY_BYTES"] * list_capacity(version, n_keys, limits)


def list_capacity(version: int, n_keys: int, limits: dict[str, int] | None = None) -> int:
    """Kernels 2 and 4: the list entries shared memory holds for rows of `n_keys` scores (host-only)."""
    limits = limits or SELECT_TOPK_KERNELS.defines()
    return min(n_keys, limits["TOPK_LIST_MAX"] if version == 2 else limits["TOPK_SAMPLED_LIST"])


def select_topk_cuda(scores: torch.Tensor, k: int, query_positions: torch.Tensor | None = None, *,
                     kernel: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`cuda/select_topk.cu`: the radix select, one block per row; the same result as `select_topk`,
    bit for bit. int32 [..., T, k].

    scores float32 [T, S] or [B, T, S], contiguous on the GPU, S <= TOPK_MAX_S (2^20); k in
    [1, min(S, TOPK_MAX_K)] (2048); query_positions int32 or int64 [T] on the same GPU, as for
    `select_topk` (None: the causal default S - T + t, computed on the device). `kernel`: a version
    of SELECT_TOPK_KERNELS (1 four passes, 2 compact, 3 shared, 4 sampled); None takes
    select_topk_default(S): kernel 3 for rows up to TOPK_ONE_BLOCK_S scores, kernel 4 for longer
    ones (a choice on the host, from S alone). `out`: a preallocated
    int32 [..., T, k] to write into. One kernel launch, no host synchronisation (int32 positions
    add a cast to int64).

    The range of query_positions is device data: checked only when checks.data_checks_wanted
    (the test suite and the chapters switch the checks on). Unchecked, a position outside [0, S)
    is clamped by the kernel to the row (it never reads outside its row): the result is defined,
    just not meaningful.
    """
    n_queries, n_keys = _check_scores(scores, k, max_dims=3, cuda=True, contiguous=True)
    limits = SELECT_TOPK_KERNELS.defines()
    if k > limits["TOPK_MAX_K"]:
        raise ValueError(f"the kernel keeps at most k = {limits['TOPK_MAX_K']}, got {k}")
    if n_keys > limits["TOPK_MAX_S"]:
        raise ValueError(f"the kernel takes rows of at most {limits['TOPK_MAX_S']} scores, got S = {n_keys}")
    chosen = SELECT_TOPK_KERNELS.choose(select_topk_default(n_keys, limits) if kernel is None else kernel,
                                        select_topk_why_not(n_keys, limits))
    if query_positions is None:
        if n_queries > n_keys:
            raise ValueError(f"more queries ({n_queries}) than keys ({n_keys}): pass query_positions")
        positions_arg = np.uint64(0)  # a null pointer: the kernel uses the causal default S - T + t
    else:
        # int64 [T] on the device of the scores; its range is checked only with data checks on
        positions_arg = visible_positions(n_queries, n_keys, query_positions, scores.device).contiguous()
    rows = scores.numel() // max(n_keys, 1)
    if out is None:
        out = torch.empty(*scores.shape[:-1], k, dtype=torch.int32, device=scores.device)
    else:
        check_tensor(out, "out", shape=(*scores.shape[:-1], k), dtype=torch.int32, device=scores.device,
                     contiguous=True)
    if rows == 0:
        return out
    if rows > 2**31 - 1:
        raise ValueError(f"too many rows: {rows}")
    args = (scores, positions_arg, n_queries, out, n_keys, k)
    if chosen.version == 1:
        SELECT_TOPK_KERNELS.launch(1, rows, limits["TOPK_THREADS"], args)
    elif chosen.version in (2, 4):
        # a list in shared memory (kernel 2: longer lists fall back to kernel 1's passes; kernel 4:
        # to kernel 2's answer); beside it the static 8 KiB histogram
        capacity = list_capacity(chosen.version, n_keys, limits)
        dynamic = shared_bytes(chosen.version, n_keys, limits)
        SELECT_TOPK_KERNELS.launch(chosen.version, rows, limits["TOPK_THREADS"], args + (capacity,),
                                   shared_mem=dynamic)
    elif chosen.version == 3:
        # the row's keys and the histogram in dynamic shared memory, sized by the row
        dynamic = shared_bytes(3, n_keys, limits)
        SELECT_TOPK_KERNELS.launch(3, rows, limits["TOPK_SMEM_THREADS"], args, shared_mem=dynamic)
    else:  # a version added to the table needs its own launch here
        raise NotImplementedError(f"select_topk_cuda has no launch for kernel {chosen.version}")
    return out
