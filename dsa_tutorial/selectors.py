"""Selectors: which k keys each query attends to, by the indexer and by simpler rules.

DSA's lightning indexer is one way to fill the k slots of S_t. The rules here fill the same slots
from other information, so that they can be compared at equal k (chapter 9):

    indexer      S_t = Top-k_s I_t,s                        the lightning indexer's scores (eq. 2)
    oracle       S_t = Top-k_s p_t,s                        p = the dense attention summed over heads
                                                            and L1-normalised (the warm-up target)
    window       S_t = Top-k_s s                            the k most recent positions
    sinks        S_t = {0, ..., n_sink - 1} + window        the first n_sink positions, then the
                                                            k - n_sink most recent (StreamingLLM)
    random       S_t = Top-k_s u_t,s, u ~ U(0, 1)           k positions uniformly among the visible
    block        S_t = the blocks j of b positions with     whole blocks, ranked by the query against
                       the largest sum_i q_t,i . kbar_j     the block's pooled key (NSA, Quest)

Every rule is written as a score per (query, key) and handed to `topk.select_topk`, so each obeys
exactly its rules: query t (at slot S - T + t) selects only positions s <= S - T + t, the output is
int32 [B, T, k] in increasing order, and -1 fills the slots of a row with fewer than k visible
positions. Ties go to the lower position, which is what makes window, sinks and block exact.

The oracle reads the dense attention, which a sparse model never computes: it is the best any
selector of k tokens by attention mass can do, and separates "k is too small" from "the indexer
picks badly".

`selector(name, **options)` wraps each as one interface, ``select(inputs, k) -> indices``, over
a `SelectionInputs` (what one attention layer offers a selector). Pure torch, float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .checks import FLOATS, check_shapes, check_tensor
from .topk import select_topk
from .train import attention_target

__all__ = ["indexer_topk", "oracle_topk", "window_topk", "sinks_window_topk", "random_topk", "block_scores",
           "block_topk", "SelectionInputs", "selector", "SELECTORS", "POOLS"]

#: The rules `selector` knows.
SELECTORS = ("indexer", "oracle", "window", "sinks", "random", "block")
#: How `block_topk` pools a block's keys.
POOLS = ("mean", "max")
# positions are held as float32 scores: exact below 2^24, and the sinks use scores up to 2 S
_MAX_KEYS = 2 ** 23


def _check_sizes(batch: int, n_queries: int, n_keys: int, k: int) -> None:
    for name, value in (("batch", batch), ("n_queries", n_queries), ("n_keys", n_keys), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if n_queries > n_keys:
        raise ValueError(f"more queries ({n_queries}) than keys ({n_keys}): the queries are the last keys")
    if n_keys > _MAX_KEYS:
        raise ValueError(f"at most {_MAX_KEYS} keys (positions are ranked as float32), got {n_keys}")
    if k > n_keys:
        raise ValueError(f"k = {k} is larger than the sequence (S = {n_keys} keys)")


def _positions(batch: int, n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """s as a float32 score for every (b, t, s): [B, T, S]."""
    return torch.arange(n_keys, dtype=torch.float32, device=device).expand(batch, n_queries, n_keys)


# ----------------------------------------------------------------------------- the two that read scores

def indexer_topk(index_scores: torch.Tensor, k: int) -> torch.Tensor:
    """S_t = Top-k_s I_t,s: what DSA selects. index_scores float [B, T, S] -> int32 [B, T, k]."""
    check_tensor(index_scores, "index_scores", shape=("B", "T", "S"), dtype=FLOATS)
    return select_topk(index_scores.detach().float(), k)


def oracle_topk(attn_probs: torch.Tensor, k: int) -> torch.Tensor:
    """S_t = Top-k_s p_t,s with p_t,s = sum_i P_t,i,s / sum_s' sum_i P_t,i,s' (`train.attention_target`):
    the k positions holding the most dense attention mass. attn_probs float [B, T, n_h, S], each
    head's dense causal softmax -> int32 [B, T, k]."""
    check_tensor(attn_probs, "attn_probs", shape=("B", "T", "n_h", "S"), dtype=FLOATS)
    # p_t,s: [B, T, S]
    p = attention_target(attn_probs.detach())
    return select_topk(p.float(), k)


# ----------------------------------------------------------------------------- rules that read nothing

def window_topk(batch: int, n_queries: int, n_keys: int, k: int, device=None) -> torch.Tensor:
    """S_t = Top-k_s s: the k most recent visible positions, the query's own included. -> int32 [B, T, k]"""
    _check_sizes(batch, n_queries, n_keys, k)
    return select_topk(_positions(batch, n_queries, n_keys, device), k)


def sinks_window_topk(batch: int, n_queries: int, n_keys: int, k: int, n_sink: int = 4,
                      device=None) -> torch.Tensor:
    """The first n_sink positions (attention sinks), then the k - n_sink most recent. -> int32 [B, T, k]

    Scores: 2 S - s for the sinks s < n_sink (above every position, earliest first), s for the rest;
    so with k <= n_sink the row holds the first k positions, and a query that sees fewer than k
    positions gets all of them.
    """
    _check_sizes(batch, n_queries, n_keys, k)
    if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
        raise ValueError(f"n_sink must be an int >= 0, got {n_sink!r}")
    s = _positions(batch, n_queries, n_keys, device)  # [B, T, S]
    scores = torch.where(s < n_sink, 2 * n_keys - s, s)
    return select_topk(scores, k)


def random_topk(batch: int, n_queries: int, n_keys: int, k: int, generator: torch.Generator,
                device=None) -> torch.Tensor:
    """S_t = Top-k_s u_t,s with u_t,s ~ U(0, 1) drawn from `generator`: a uniformly random set of k
    visible positions (all of them when fewer are visible). -> int32 [B, T, k]"""
    _check_sizes(batch, n_queries, n_keys, k)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    u = torch.rand(batch, n_queries, n_keys, generator=generator, device=device)  # generator on that device
    return select_topk(u, k)


# ----------------------------------------------------------------------------- whole blocks

def _prefix_pools(keys: torch.Tensor, block_size: int, pool: str) -> list[torch.Tensor]:
    """For each position s, its block's keys from the block's start up to s, pooled: a list of
    [B, S, D] tensors (mean: [mean]; max: [elementwise max, elementwise min])."""
    n_batch, n_keys, dim = keys.shape
    n_blocks = math.ceil(n_keys / block_size)
    padded = torch.nn.functional.pad(keys, (0, 0, 0, n_blocks * block_size - n_keys))
    blocks = padded.view(n_batch, n_blocks, block_size, dim)  # [B, n_blocks, b, D]
    if pool == "mean":
        counts = torch.arange(1, block_size + 1, dtype=keys.dtype, device=keys.device)[:, None]  # [b, 1]
        pooled = [blocks.cumsum(dim=2) / counts]
    else:
        pooled = [blocks.cummax(dim=2).values, blocks.cummin(dim=2).values]
    return [x.reshape(n_batch, n_blocks * block_size, dim)[:, :n_keys] for x in pooled]


def _query_against(queries: torch.Tensor, pooled: list[torch.Tensor], pool: str, own: bool = False) -> torch.Tensor:
    """sum_i q_t,i . kbar for pooled keys kbar: queries [B, T, n_h, D]; pooled [B, N, D], one score per
    (t, n) -> [B, T, N], or with `own` pooled [B, T, D], one per query -> [B, T].

    mean: sum_i q_t,i . mean(k). max (Quest's bound on q . k over the block): sum_i sum_d
    max(q_d max_d, q_d min_d) = sum_i (ReLU(q_t,i) . max + min(q_t,i, 0) . min)."""
    equation = "bthd,btd->bt" if own else "bthd,bnd->btn"
    if pool == "mean":
        return torch.einsum(equation, queries, pooled[0])
    high, low = pooled
    return torch.einsum(equation, queries.clamp(min=0), high) + torch.einsum(equation, queries.clamp(max=0), low)


def block_scores(queries: torch.Tensor, keys: torch.Tensor, block_size: int, pool: str = "mean") -> torch.Tensor:
    """The score of block j for query t, sum_i q_t,i . kbar_j, given to each position s of the block.

    queries float [B, T, n_h, D] (each head's query); keys float [B, S, D] (one key per position, shared
    by the heads, as in MLA's MQA mode); blocks [j b, (j + 1) b). kbar_j pools the block's keys
    (`pool` "mean": their mean, NSA's compressed key without its learned MLP; "max": Quest's
    elementwise max and min, scored as the bound above). Causal: query t pools only the visible
    part of its own block, s <= S - T + t, so no score reads a future key. Returns float32 [B, T, S];
    positions after the query get the score of their block, which `select_topk` never selects.
    """
    dims = check_shapes("queries[B, T, n_h, D] keys[B, S, D]", queries, keys, dtype=FLOATS, same_dtype=True)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    n_queries, n_keys = dims["T"], dims["S"]
    if n_queries > n_keys:
        raise ValueError(f"more queries ({n_queries}) than keys ({n_keys}): the queries are the last keys")
    queries, keys = queries.float(), keys.float()
    pooled = _prefix_pools(keys, block_size, pool)  # [B, S, D] each: pooled up to s within its block
    device = keys.device
    block_ends = torch.arange(block_size - 1, n_keys + block_size - 1, block_size, device=device).clamp(max=n_keys - 1)
    # whole blocks, every key of the block pooled: [B, T, n_blocks]
    scores = _query_against(queries, [x[:, block_ends] for x in pooled], pool)
    # the query's own block, pooled up to the query's slot: [B, T]
    slot = torch.arange(n_keys - n_queries, n_keys, device=device)  # [T]
    own = _query_against(queries, [x[:, slot] for x in pooled], pool, own=True)
    scores[:, torch.arange(n_queries, device=device), slot // block_size] = own
    # each position takes its block's score: [B, T, S]
    return scores[:, :, torch.arange(n_keys, device=keys.device) // block_size]


def block_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, block_size: int, pool: str = "mean") -> torch.Tensor:
    """Whole blocks in order of `block_scores`, until k positions are selected. -> int32 [B, T, k]

    That is the top ceil(k / b) blocks, the last one cut to its first positions when b does not
    divide k; when the query's own block is among them, it offers only its visible positions and
    the slots left go to the next block in the ranking. Every position of a block shares its score,
    and ties go to the lower position, so the selection is whole blocks, one cut at most.
    """
    return select_topk(block_scores(queries, keys, block_size, pool), k)


# ----------------------------------------------------------------------------- one interface

@dataclass(frozen=True)
class SelectionInputs:
    """What one attention layer offers a selector (any field may be None if no selector reads it).

    index_scores [B, T, S] (the indexer's I_t,s); attn_probs [B, T, n_h, S] (the dense per-head
    softmax); queries [B, T, n_h, D] and keys [B, S, D] (the attention's, for block scores: in
    MLA's MQA mode [q^abs_t,i | q^R_t,i] and [c^KV_s | k^R_s]); shape (B, T, S).
    """

    shape: tuple[int, int, int]
    index_scores: torch.Tensor | None = None
    attn_probs: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        present = [x for x in (self.index_scores, self.attn_probs, self.queries, self.keys) if x is not None]
        return present[0].device if present else torch.device("cpu")

    def need(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this selector reads {name}, which the SelectionInputs do not hold")
        return value


Selector = Callable[[SelectionInputs, int], torch.Tensor]


def selector(name: str, *, n_sink: int = 4, block_size: int = 16, pool: str = "mean",
             generator: torch.Generator | None = None) -> Selector:
    """The rule `name` (one of SELECTORS) as ``select(inputs: SelectionInputs, k) -> int32 [B, T, k]``.

    Options: n_sink (sinks), block_size and pool (block), generator (random; a fresh one seeded with
    0 when None, drawn from at every call)."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; choose from {', '.join(SELECTORS)}")
    if name == "indexer":
        return lambda x, k: indexer_topk(x.need("index_scores"), k)
    if name == "oracle":
        return lambda x, k: oracle_topk(x.need("attn_probs"), k)
    if name == "window":
        return lambda x, k: window_topk(*x.shape, k, device=x.device)
    if name == "sinks":
        return lambda x, k: sinks_window_topk(*x.shape, k, n_sink, device=x.device)
    if name == "random":
        generator = torch.Generator().manual_seed(0) if generator is None else generator
        return lambda x, k: random_topk(*x.shape, k, generator, device=x.device)
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    return lambda x, k: block_topk(x.need("queries"), x.need("keys"), k, block_size, pool)
