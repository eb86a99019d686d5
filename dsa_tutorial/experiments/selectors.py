"""The indexer against simple selection rules at equal k (`python -m dsa_tutorial.experiments selectors`).

The warmed models of the other experiments (`common.warmed_model`, cached) are evaluated with the
k slots of every query filled by one rule of `dsa_tutorial.selectors` at a time: the lightning
indexer, the oracle (top-k of the dense attention), a sliding window, attention sinks plus a
window, k random positions, and whole blocks ranked by a pooled key. Everything else is the DSA
layer's own path: `SelectorAttention` computes exactly what `DSAttention.forward` computes, with
the selector's indices in place of the indexer's (with the indexer as selector the two agree bit
for bit; the tests check it).

Per (rule, k, length), on the same models and sequences for every rule: answer accuracy, the hit
rate (the share of answer positions whose selected set holds the record the answer must read:
`needed_positions`) and the attention mass recalled at the answer positions (`train.topk_recall`);
and, paired per seed (same model, same sequences), the accuracy of the oracle minus the indexer's
and of dense attention minus the oracle's.

Block sizes: the tiny configuration runs sequences of 64 to 1024 tokens, so the blocks are b = 4
and b = 16 positions (production systems use 16 to 64 on sequences a hundred times longer).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ..checks import check_tensor
from ..mla import causal_mask
from ..selectors import SelectionInputs, Selector, selector
from ..sparse_attention import DSAttention, sparse_mla_attention
from ..train import KeyValueRetrieval, TinyLM, answer_accuracy, topk_recall
from .common import eval_batch, mean_std, task_of, warmed_model

__all__ = ["SelectorAttention", "selecting", "needed_positions", "evaluate_selectors", "RULES", "selector_comparison"]

LENGTHS = (64, 128, 256, 512, 1024)
TOPKS = (2, 4, 8, 16)


def _sinks(k: int) -> int:
    """Attention sinks at budget k: StreamingLLM's 4, at most half the budget."""
    return min(4, k // 2)


# name -> (label, options of `selector` at budget k)
RULES: dict[str, tuple[str, Callable[[int], dict]]] = {
    "indexer": ("lightning indexer", lambda k: dict(name="indexer")),
    "oracle": ("oracle (top-k of dense attention)", lambda k: dict(name="oracle")),
    "window": ("sliding window", lambda k: dict(name="window")),
    "sinks": ("sinks + window", lambda k: dict(name="sinks", n_sink=_sinks(k))),
    "random": ("random", lambda k: dict(name="random")),
    "block4_mean": ("blocks of 4, mean key", lambda k: dict(name="block", block_size=4, pool="mean")),
    "block16_mean": ("blocks of 16, mean key", lambda k: dict(name="block", block_size=16, pool="mean")),
    "block4_max": ("blocks of 4, max/min key", lambda k: dict(name="block", block_size=4, pool="max")),
    "block16_max": ("blocks of 16, max/min key", lambda k: dict(name="block", block_size=16, pool="max")),
}


class SelectorAttention(nn.Module):
    """A `DSAttention` whose k slots are filled by `select(inputs, k)` instead of its indexer.

    The same computation as `DSAttention.forward` (prefill, no cache): MLA's queries and latents,
    the indexer's scores, then sparse attention over the selected latents; the selector sees the
    index scores, the dense per-head attention, and the MQA queries [q^abs | q^R] and keys
    [c^KV | k^R]. Returns (out, aux) like DSAttention with return_aux=True.
    """

    def __init__(self, layer: DSAttention, select: Selector):
        super().__init__()
        if not isinstance(layer, DSAttention):
            raise TypeError(f"layer must be a DSAttention, got {type(layer).__name__}")
        self.layer, self.select = layer, select

    def forward(self, h, positions=None, topk=None, return_aux=False, detach_indexer_input=False):
        layer = self.layer
        args, mla = layer.args, layer.mla
        mla._check_h(h)
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        c_q = mla.query_latent(h)  # [B, T, d_c']
        q_nope, q_rope = mla.queries(c_q, positions)  # [B, T, n_h, d_h], [B, T, n_h, d_R]
        c_kv, k_rope = mla.latents(h, positions)  # [B, S, d_c], [B, S, d_R]
        index_scores = layer.indexer(h, c_q, positions, None)  # [B, T, S]
        n_keys = c_kv.shape[1]
        k = min(topk or args.index_topk, n_keys)
        q_abs = mla.absorb_query(q_nope)  # [B, T, n_h, d_c]
        # the dense attention, per head: [B, T, n_h, S]
        scores = mla.latent_scores(q_abs, q_rope, c_kv, k_rope)
        mask = causal_mask(h.shape[1], n_keys, h.device, scores.dtype)  # [T, S]
        attn_probs = torch.softmax((scores + mask[:, None, :]).float(), dim=-1)
        inputs = SelectionInputs((h.shape[0], h.shape[1], n_keys), index_scores=index_scores.detach(),
                                 attn_probs=attn_probs, queries=torch.cat([q_abs, q_rope], -1).detach(),
                                 keys=torch.cat([c_kv, k_rope], -1).detach())
        indices = self.select(inputs, k)  # [B, T, k]
        o_latent = sparse_mla_attention(q_abs, q_rope, c_kv, k_rope, indices, args.softmax_scale).to(h.dtype)
        out = mla.latent_output(o_latent)  # [B, T, dim]
        aux = {"index_scores": index_scores, "indices": indices, "attn_probs": attn_probs}
        return (out, aux) if return_aux else out


@contextlib.contextmanager
def selecting(model: TinyLM, select: Selector) -> Iterator[TinyLM]:
    """``with selecting(model, select):`` every layer's attention selects with `select`, then is restored."""
    originals = [block.attn for block in model.layers]
    try:
        for block in model.layers:
            block.attn = SelectorAttention(block.attn, select)
        yield model
    finally:
        for block, attn in zip(model.layers, originals):
            block.attn = attn


def needed_positions(task: KeyValueRetrieval, tokens: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """The record each answer must read: at an answer position t (a query token naming key kappa),
    the position of the record token holding kappa; -1 elsewhere. tokens int64 [B, T], answer_mask
    bool [B, T] (from `KeyValueRetrieval.sample`) -> int64 [B, T]."""
    check_tensor(tokens, "tokens", shape=("B", "T"), dtype=torch.int64)
    check_tensor(answer_mask, "answer_mask", shape=tuple(tokens.shape), dtype=torch.bool)
    is_record = (tokens >= task.first_record) & (tokens < task.first_query)
    record_key = torch.where(is_record, (tokens - task.first_record) // task.n_values, -1)  # [B, T]
    query_key = torch.where(answer_mask, tokens - task.first_query, -2)  # [B, T]
    # match[b, t, s]: s is the record of the key asked at t: [B, T, S]
    match = (record_key[:, None, :] == query_key[:, :, None]) & answer_mask[:, :, None]
    if not bool((match.sum(-1) == answer_mask.long()).all()):
        raise ValueError("every answer position must name exactly one stored record")
    return torch.where(answer_mask, match.long().argmax(-1), -1)


def _hit_rate(indices: torch.Tensor, needed: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Share of the answer positions whose selected set holds the needed record."""
    hit = (indices.long() == needed[..., None]).any(-1)  # [B, T]
    return hit[answer_mask].double().mean()


@torch.no_grad()
def evaluate_selectors(model: TinyLM, task: KeyValueRetrieval, rules: dict, *, length: int, topks: tuple,
                       batch: int, n_batches: int = 1, seed: int = 12345, random_seed: int = 0) -> dict:
    """{"dense": {accuracy}, rule: {k: {accuracy, hit_rate, recall_answer}}} on the batches `evaluate` uses.

    rules: name -> (label, options(k)) as RULES. The random rule draws from a generator seeded with
    (random_seed, length, k), so a run is reproducible and every k gets its own draw."""
    model.eval()
    out = {"dense": dict(accuracy=0.0)}
    out.update({name: {str(k): dict(accuracy=0.0, hit_rate=0.0, recall_answer=0.0) for k in topks} for name in rules})
    data = task.batches(batch, length, seed)
    for _ in range(n_batches):
        tokens, targets, mask = next(data)
        needed = needed_positions(task, tokens, mask)
        logits, _ = model(tokens, score_mask=mask)
        out["dense"]["accuracy"] += answer_accuracy(logits, targets, mask).item() / n_batches
        for name, (_, options) in rules.items():
            for k in topks:
                generator = torch.Generator().manual_seed(1_000_003 * random_seed + 1009 * length + k)
                with selecting(model, selector(**options(k), generator=generator)):
                    logits, auxes = model(tokens, topk=k, score_mask=mask)
                entry = out[name][str(k)]
                entry["accuracy"] += answer_accuracy(logits, targets, mask).item() / n_batches
                entry["hit_rate"] += sum(_hit_rate(a["indices"], needed, mask) for a in auxes).item() / (
                    len(auxes) * n_batches)
                entry["recall_answer"] += sum(topk_recall(a["attn_probs"], a["indices"], mask)
                                              for a in auxes).item() / (len(auxes) * n_batches)
    model.train()
    return out


def selector_comparison(config, seeds, progress=True, use_cache=True, lengths=LENGTHS, topks=TOPKS) -> dict:
    """Every rule of RULES at every k of `topks` (k < T) and length, on the warmed models of `seeds`."""
    lengths = tuple(L for L in lengths if L <= config["args"]["max_seq_len"])
    per_seed = []
    for seed in seeds:
        model, _, _ = warmed_model("mla", config, seed, use_cache=use_cache, progress=progress)
        grid = {}
        for length in lengths:
            ks = tuple(k for k in topks if k < length)
            sizes = eval_batch(config, length)
            grid[str(length)] = evaluate_selectors(model, task_of(config), RULES, length=length, topks=ks,
                                                   batch=sizes["batch"], n_batches=sizes["n_batches"],
                                                   seed=sizes["seed"], random_seed=seed)
        per_seed.append(dict(seed=seed, eval=grid))

    def summary(*path):
        values = []
        for entry in per_seed:
            node = entry["eval"]
            for key in path:
                node = node[key]
            values.append(node)
        return mean_std(values)

    def paired(L, minuend, subtrahend, k):
        """Per-seed accuracy differences on the same model and sequences."""
        def accuracy(entry, name):
            return entry[name]["accuracy"] if name == "dense" else entry[name][k]["accuracy"]

        return mean_std([accuracy(s["eval"][L], minuend) - accuracy(s["eval"][L], subtrahend) for s in per_seed])

    metrics = ("accuracy", "hit_rate", "recall_answer")
    summaries = {str(L): dict(dense=dict(accuracy=summary(str(L), "dense", "accuracy")),
                              **{name: {str(k): {m: summary(str(L), name, str(k), m) for m in metrics}
                                        for k in topks if k < L} for name in RULES},
                              paired=dict(oracle_minus_indexer={str(k): paired(str(L), "oracle", "indexer", str(k))
                                                                for k in topks if k < L},
                                          dense_minus_oracle={str(k): paired(str(L), "dense", "oracle", str(k))
                                                              for k in topks if k < L}))
                 for L in lengths}
    return dict(lengths=list(lengths), topks=list(topks), config_topk=config["args"]["index_topk"],
                rules={name: label for name, (label, _) in RULES.items()},
                sinks={str(k): _sinks(k) for k in topks}, metrics=list(metrics), per_seed=per_seed,
                summary=summaries, eval_sizes={str(L): eval_batch(config, L) for L in lengths})
