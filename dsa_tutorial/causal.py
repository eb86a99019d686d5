"""Causality, the one rule MLA, the indexer and top-k share.

The T new tokens are the last T of S cached tokens: query t sits at cache slot S - T + t and sees
the slots s <= S - T + t (itself included). A prefill without a cache has T = S (query t sees
s <= t); a decode step has T = 1 (the new token sees everything).

    last_visible(T, S)   = [S - T, ..., S - 1]          [T]
    visible(T, S)[t, s]  = s <= last_visible(T, S)[t]   [T, S]
"""
from __future__ import annotations

import torch

__all__ = ["last_visible", "visible"]


def last_visible(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """The last slot each of the T = n_queries new tokens may see: arange(S - T, S), int64 [T]."""
    if not 0 <= n_queries <= n_keys:
        raise ValueError(f"need 0 <= n_queries <= n_keys (the queries are the last tokens of the keys), "
                         f"got {n_queries} queries over {n_keys} keys")
    return torch.arange(n_keys - n_queries, n_keys, device=device)


def visible(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """True where query t may see key s (s <= S - T + t): bool [T, S]."""
    return torch.arange(n_keys, device=device)[None, :] <= last_visible(n_queries, n_keys, device)[:, None]
