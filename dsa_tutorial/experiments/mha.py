"""DSA on classic multi-head attention (research question 2): the same indexer and top-k, no latent.

Every head has its own key and value, projected from h (no compression), with the same decoupled
RoPE layout as MLA's MHA mode, q_t,i = [q^C_t,i ; q^R_t,i] and k_s,i = [k^C_s,i ; k^R_s,i], except
that k^R is per head here (classic RoPE), where MLA shares one k^R across heads. The attention's
queries are read from h directly (W^Q h_t): the attention itself is classic MHA.

The indexer reads a query latent, as MLA's does: c^Q_t = RMSNorm(W^DQ h_t) with d_c' = q_lora_rank
(32 in `ModelArgs.tiny`, as MLA's), and q^I_t,j = W^IUQ_j c^Q_t as in `indexer.Indexer`. In MLA,
W^DQ belongs to the main attention (its queries are read from c^Q) and the language-model loss
trains it; here nothing in the attention reads c^Q, so W^DQ and the norm are the indexer's own
parameters (`QueryLatentIndexer`, under the submodule `indexer`): L^I trains them with the rest of
the indexer, and `detach_indexer_input` cuts them off from h like the rest of it.

The cache therefore holds n_h (d_h + d_R + d_v) values per token instead of MLA's d_c + d_R, and
in sparse mode each selected token costs n_h separate key and value reads instead of one latent.

`causal_after_topk=False` reproduces chapter 5's leak: the
attention mask is built from the torch.topk indices alone, without re-applying the causal mask,
so rows with fewer than k visible tokens attend to future ones.

The interface is that of `sparse_attention.DSAttention`:
``forward(h, positions=None, cache=None, topk=None, return_aux=False, detach_indexer_input=False)``,
k = min(topk or args.index_topk, S), so k >= S is dense attention; aux = index_scores [B, T, S],
indices [B, T, k], attn_probs [B, T, n_h, S] (the dense causal per-head probabilities).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..causal import visible
from ..checks import check_range, check_tensor
from ..config import ModelArgs
from ..indexer import Indexer, IndexerCache
from ..mla import RMSNorm, query_latent
from ..rope import apply_rope
from ..topk import select_topk, topk_without_causal_mask

__all__ = ["MHACache", "MHADSAttention", "QueryLatentIndexer", "selection_mask"]


class MHACache:
    """Per-head keys [B, S, n_h, d_h + d_R] and values [B, S, n_h, d_v], plus the indexer keys."""

    def __init__(self, args: ModelArgs, batch_size: int, dtype: torch.dtype = torch.float32, device="cpu"):
        self.k = torch.empty(batch_size, 0, args.n_heads, args.qk_head_dim, dtype=dtype, device=device)
        self.v = torch.empty(batch_size, 0, args.n_heads, args.v_head_dim, dtype=dtype, device=device)
        self.indexer = IndexerCache(args, batch_size, dtype, device)
        self.max_seq_len = args.max_seq_len

    def __len__(self) -> int:
        return self.k.shape[1]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if len(self) + k.shape[1] > self.max_seq_len:
            raise ValueError(f"the cache would hold {len(self) + k.shape[1]} tokens, more than max_seq_len")
        self.k = torch.cat([self.k, k], dim=1)
        self.v = torch.cat([self.v, v], dim=1)


def selection_mask(indices: torch.Tensor, n_keys: int) -> torch.Tensor:
    """True at the selected positions of each row: indices [B, T, k] (-1 unused) -> bool [B, T, S]."""
    check_tensor(indices, "indices", shape=("B", "T", "k"), dtype=(torch.int32, torch.int64))
    check_range(indices, "indices", -1, n_keys - 1)
    mask = torch.zeros(*indices.shape[:2], n_keys + 1, dtype=torch.bool, device=indices.device)
    # unused slots (-1) scatter into the extra column S, dropped below
    mask.scatter_(-1, torch.where(indices < 0, n_keys, indices).long(), True)
    return mask[..., :n_keys]


class QueryLatentIndexer(Indexer):
    """The lightning indexer with its own query latent: c^Q_t = RMSNorm(W^DQ h_t), then `Indexer`.

    wq_a: [d_c', dim] (W^DQ, d_c' = q_lora_rank), q_norm: RMSNorm(d_c'), initialised as MLA's;
    the rest as `indexer.Indexer`, whose query projection wq_b reads c^Q. forward(h, positions,
    cache) -> index scores [B, T, S], as `Indexer.forward(h, c_q, positions, cache)`.
    """

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)  # W^DQ
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        with torch.no_grad():
            self.wq_a.weight.normal_(0.0, args.dim ** -0.5)

    def query_latent(self, h: torch.Tensor) -> torch.Tensor:
        """c^Q_t = RMSNorm(W^DQ h_t): [B, T, d_c']."""
        return query_latent(h, self.wq_a.weight, self.q_norm.weight, self.args)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: IndexerCache | None = None) -> torch.Tensor:
        return super().forward(h, self.query_latent(h), positions, cache)


class MHADSAttention(nn.Module):
    """Multi-head attention with a lightning indexer and top-k selection (see the module docstring)."""

    def __init__(self, args: ModelArgs, causal_after_topk: bool = True):
        super().__init__()
        self.args, self.causal_after_topk = args, causal_after_topk
        n_h = args.n_heads
        self.wq = nn.Linear(args.dim, n_h * args.qk_head_dim, bias=False)
        self.wk = nn.Linear(args.dim, n_h * args.qk_head_dim, bias=False)
        self.wv = nn.Linear(args.dim, n_h * args.v_head_dim, bias=False)
        self.wo = nn.Linear(n_h * args.v_head_dim, args.dim, bias=False)
        self.indexer = QueryLatentIndexer(args)
        with torch.no_grad():
            for layer in (self.wq, self.wk, self.wv, self.wo):
                layer.weight.normal_(0.0, layer.in_features ** -0.5)

    def _project(self, linear: nn.Linear, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[x^C_t,i ; RoPE(x^R_t,i)] per head: [B, T, n_h, d_h + d_R] (queries and keys alike)."""
        x = linear(h).unflatten(-1, (self.args.n_heads, self.args.qk_head_dim))
        x_nope, x_pe = x.split([self.args.qk_nope_head_dim, self.args.qk_rope_head_dim], dim=-1)
        return torch.cat([x_nope, apply_rope(x_pe, positions, "interleaved", self.args)], dim=-1)

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None, cache: MHACache | None = None,
                topk: int | None = None, return_aux: bool = False, detach_indexer_input: bool = False):
        args = self.args
        check_tensor(h, "h", shape=("B", "T", args.dim), dtype=self.wq.weight.dtype, device=self.wq.weight.device)
        n_past = 0 if cache is None else len(cache)
        if positions is None:
            positions = torch.arange(n_past, n_past + h.shape[1], device=h.device)
        q = self._project(self.wq, h, positions)  # [B, T, n_h, d_h + d_R]
        k = self._project(self.wk, h, positions)  # [B, T, n_h, d_h + d_R]
        v = self.wv(h).unflatten(-1, (args.n_heads, args.v_head_dim))  # [B, T, n_h, d_v]
        if cache is not None:
            cache.append(k, v)
            k, v = cache.k, cache.v  # [B, S, n_h, .]
        # the indexer reads h and its own query latent c^Q(h); detached, its loss cannot reach the model
        h_idx = h.detach() if detach_indexer_input else h
        index_scores = self.indexer(h_idx, positions, None if cache is None else cache.indexer)  # [B, T, S]
        n_keys = k.shape[1]
        # causal visibility: query t is slot S - T + t: [T, S]
        causal = visible(h.shape[1], n_keys, h.device)
        # q_t,i . k_s,i * softmax_scale: [B, n_h, T, S]
        scores = torch.einsum("bthd,bshd->bhts", q, k) * args.softmax_scale
        dense_probs = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # [B, n_h, T, S]
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0):
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        k_sel = min(topk or args.index_topk, n_keys)
        if self.causal_after_topk:
            # S_t = Top-k(I_t,:) among s <= t: [B, T, k], -1 where fewer than k are visible
            indices = select_topk(index_scores.detach(), k_sel)
            allowed = selection_mask(indices, n_keys) & causal  # and the causal mask again, as the official code
        else:
            # torch.topk keeps masked (future) positions when fewer than k are visible: [B, T, k]
            indices = topk_without_causal_mask(index_scores.detach(), k_sel)
            allowed = selection_mask(indices, n_keys)  # THE LEAK: no causal mask after selection
        # softmax over the selected positions only: [B, n_h, T, S]
        probs = F.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        # o_t,i = sum_s P_t,i,s v_s,i, then W^O: [B, T, dim]
        out = self.wo(torch.einsum("bhts,bshv->bthv", probs, v).flatten(2))
        if not return_aux:
            return out
        return out, dict(index_scores=index_scores, indices=indices, attn_probs=dense_probs.transpose(1, 2))

