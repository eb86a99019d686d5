"""Training the lightning indexer (section 2.1 of the report), on a tiny decoder language model.

The report trains the indexer in two stages, starting from a dense model:

* dense warm-up: attention stays dense, every parameter but the indexer's is frozen, and the
  indexer learns to imitate the main attention with

      L^I = sum_t KL(p_t,: || Softmax(I_t,:));

* sparse training: each query attends only to its top-k set S_t; the indexer learns from

      L^I = sum_t KL(p_t,S_t || Softmax(I_t,S_t)),

  with its input detached, so the indexer learns only from L^I and the rest of the model only
  from the language-model loss.

The target p (left open by the report; the choice of Megatron-LM): per head the causal softmax
of the main attention, summed over the n_h heads, L1-normalised over s (`attention_target`). In
the sparse stage the per-head softmax runs over S_t only, i.e. the sparse attention's own
distribution (`selected_attention`). The loss is the mean over tokens (every token weighs the
same; the report's sum over t differs by the constant factor B T); over layers it is summed.

The model: `TinyLM` (embedding, `n_layers` x [RMSNorm, attention, RMSNorm, SwiGLU MLP], RMSNorm,
output head) around any attention module with the interface of
`sparse_attention.DSAttention`: ``forward(h, positions, topk=..., return_aux=True,
detach_indexer_input=...) -> (out, aux)`` with aux ``index_scores`` [B, T, S] (causal, -inf after
t), ``indices`` [B, T, k] (-1 unused) and ``attn_probs`` [B, T, n_h, S] (per-head probabilities of
the main attention), and a submodule named ``indexer``.

The task: `KeyValueRetrieval`, a key-value store read back at the end of a long sequence of noise,
so that one position out of up to thousands holds the answer: selection is the whole task.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .checks import FLOATS, check_range, check_tensor, data_checks_wanted
from .config import ModelArgs
from .topk import select_topk

__all__ = [
    "attention_target", "selected_attention", "indexer_kl_loss", "topk_recall", "KeyValueRetrieval", "TinyLM",
    "lm_loss", "answer_accuracy", "indexer_parameters", "main_parameters", "freeze_all_but_indexer",
    "pretrain_dense", "dense_warmup", "sparse_training", "evaluate", "progress_bar", "future_influence",
]



# ----------------------------------------------------------------------------- the target p and the loss

def attention_target(attn_probs: torch.Tensor) -> torch.Tensor:
    """p_t,s = sum_i P_t,i,s / sum_s' sum_i P_t,i,s': the heads' attention summed, L1-normalised.

    attn_probs [B, T, n_h, S] (each head's row a probability distribution over s). Returns p [B, T, S].
    """
    check_tensor(attn_probs, "attn_probs", shape=("B", "T", "n_h", "S"), dtype=FLOATS)
    # sum_i P_t,i,s: [B, T, S]
    summed = attn_probs.sum(dim=2)
    # L1 normalisation over s: [B, T, S]
    return summed / summed.sum(dim=-1, keepdim=True)


def selected_attention(attn_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Each head's softmax restricted to S_t: P_t,i,s / sum_{s' in S_t} P_t,i,s' for s in S_t.

    Equal to the softmax of the scores over S_t, the distribution sparse attention computes.
    attn_probs [B, T, n_h, S]; indices int [B, T, k], -1 = unused slot. Returns [B, T, n_h, k], 0 on unused slots.
    """
    dims: dict[str, int] = {}
    check_tensor(attn_probs, "attn_probs", shape=("B", "T", "n_h", "S"), dims=dims, dtype=FLOATS)
    check_tensor(indices, "indices", shape=("B", "T", "k"), dims=dims, dtype=(torch.int32, torch.int64),
                 device=attn_probs.device)
    check_range(indices, "indices", -1, dims["S"] - 1)
    valid = (indices >= 0).unsqueeze(2)  # [B, T, 1, k]
    index = indices.clamp(min=0).long().unsqueeze(2).expand(-1, -1, dims["n_h"], -1)  # [B, T, n_h, k]
    # P_t,i,s for s in S_t: [B, T, n_h, k]
    chosen = attn_probs.gather(-1, index) * valid
    # renormalise each head over S_t: [B, T, n_h, k]
    return chosen / chosen.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(chosen.dtype).tiny)


def _kl_from_logits(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p || Softmax(logits)) per row, over the last dim; entries with p = 0 contribute 0."""
    log_q = F.log_softmax(logits, dim=-1)
    support = p > 0
    # device data: read back only where checks are wanted (always on the CPU; on a GPU with data checks on)
    if data_checks_wanted(log_q) and bool(torch.isneginf(log_q)[support].any()):
        raise ValueError("the target p puts mass where the index scores are -inf: the two masks disagree")
    # sum_s p_s log p_s - sum_s p_s log q_s (0 log 0 = 0)
    return torch.xlogy(p, p).sum(-1) - (p * torch.where(support, log_q, torch.zeros_like(log_q))).sum(-1)


def indexer_kl_loss(index_scores: torch.Tensor, attn_probs: torch.Tensor,
                    indices: torch.Tensor | None = None) -> torch.Tensor:
    """L^I = mean_t KL(p_t,: || Softmax(I_t,:)) (dense), or mean_t KL(p_t,S_t || Softmax(I_t,S_t)) (sparse).

    index_scores [B, T, S], -inf where s is invisible to t; attn_probs [B, T, n_h, S], the main
    attention's per-head probabilities (the target; no gradient flows into it); indices [B, T, k]
    (-1 = unused) selects the sparse stage. Returns a scalar, the mean over the B T tokens.
    """
    dims: dict[str, int] = {}
    check_tensor(index_scores, "index_scores", shape=("B", "T", "S"), dims=dims, dtype=FLOATS)
    check_tensor(attn_probs, "attn_probs", shape=("B", "T", None, "S"), dims=dims, dtype=FLOATS,
                 device=index_scores.device)
    attn_probs = attn_probs.detach().to(index_scores.dtype)
    if indices is None:
        # p_t,: from the dense per-head softmax: [B, T, S]
        p = attention_target(attn_probs)
        logits = index_scores
    else:
        check_tensor(indices, "indices", shape=("B", "T", "k"), dims=dims)
        # p_t,S_t from each head's softmax over S_t: [B, T, k]
        p = attention_target(selected_attention(attn_probs, indices))
        # I_t,S_t, -inf on unused slots: [B, T, k]
        logits = index_scores.gather(-1, indices.clamp(min=0).long()).masked_fill(indices < 0, float("-inf"))
    # mean over tokens of KL(p_t || Softmax(I_t)): scalar
    return _kl_from_logits(p, logits).mean()


def topk_recall(attn_probs: torch.Tensor, indices: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention mass recalled by the selected set: mean_t sum_{s in S_t} p_t,s (1 = nothing lost).

    attn_probs [B, T, n_h, S] (dense); indices [B, T, k] (-1 unused); token_mask bool [B, T] picks
    the queries to average over (all when None). Returns a scalar.
    """
    dims: dict[str, int] = {}
    check_tensor(attn_probs, "attn_probs", shape=("B", "T", "n_h", "S"), dims=dims, dtype=FLOATS)
    check_tensor(indices, "indices", shape=("B", "T", "k"), dims=dims, dtype=(torch.int32, torch.int64))
    p = attention_target(attn_probs.detach())  # [B, T, S]
    # sum_{s in S_t} p_t,s: [B, T]
    recalled = (p.gather(-1, indices.clamp(min=0).long()) * (indices >= 0)).sum(-1)
    if token_mask is None:
        return recalled.mean()
    check_tensor(token_mask, "token_mask", shape=("B", "T"), dims=dims, dtype=torch.bool)
    return recalled[token_mask].mean()


# ----------------------------------------------------------------------------- the task

@dataclass(frozen=True)
class KeyValueRetrieval:
    """A key-value store hidden in noise, read back at the end.

    A sequence of `length` tokens: first a context of random filler tokens in which `n_records`
    record tokens sit at random positions, each record one token holding a (key, value) pair
    (distinct keys); then `n_queries` pairs (query token naming a stored key, the token of its
    value). The model is scored on predicting the value after each query token: it must find
    the one record with that key among all earlier positions.
    """

    n_keys: int = 16
    n_values: int = 16
    n_fillers: int = 32
    n_records: int = 8
    n_queries: int = 4

    def __post_init__(self) -> None:
        for name in ("n_keys", "n_values", "n_fillers", "n_records", "n_queries"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KeyValueRetrieval.{name} must be positive, got {getattr(self, name)}")
        if not self.n_queries <= self.n_records <= self.n_keys:
            raise ValueError(f"need n_queries <= n_records <= n_keys (distinct keys, distinct queries), got "
                             f"{self.n_queries}, {self.n_records}, {self.n_keys}")

    @property
    def first_record(self) -> int:
        return self.n_fillers

    @property
    def first_query(self) -> int:
        return self.n_fillers + self.n_keys * self.n_values

    @property
    def first_value(self) -> int:
        return self.first_query + self.n_keys

    @property
    def vocab_size(self) -> int:
        return self.first_value + self.n_values


    def sample(self, batch: int, length: int, generator: torch.Generator,
               n_records: int | None = None) -> tuple[torch.Tensor, ...]:
        """tokens int64 [B, T], targets int64 [B, T] (the next token) and answer_mask bool [B, T]
        (True at the query positions, where the target is the value to retrieve). `n_records`
        (default self.n_records) records are stored; the queries name distinct ones (an earlier
        answer never gives a later one away)."""
        n_records = self.n_records if n_records is None else n_records
        if batch <= 0 or not self.n_queries <= n_records <= self.n_records or length < n_records + 2 * self.n_queries:
            raise ValueError(f"need batch > 0, {self.n_queries} <= n_records <= {self.n_records} and length >= "
                             f"n_records + 2 n_queries, got {batch}, {n_records}, {length}")
        context = length - 2 * self.n_queries
        rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
        tokens = torch.randint(self.n_fillers, (batch, length), generator=generator)
        keys = rand(batch, self.n_keys).argsort(-1)[:, :n_records]  # distinct keys [B, R]
        values = torch.randint(self.n_values, (batch, n_records), generator=generator)  # [B, R]
        slots = rand(batch, context).argsort(-1)[:, :n_records]  # record positions [B, R]
        tokens.scatter_(1, slots, self.first_record + keys * self.n_values + values)
        asked = rand(batch, n_records).argsort(-1)[:, : self.n_queries]  # distinct records asked [B, Q]
        query_pos = context + 2 * torch.arange(self.n_queries)  # [Q]
        tokens[:, query_pos] = self.first_query + keys.gather(1, asked)
        tokens[:, query_pos + 1] = self.first_value + values.gather(1, asked)
        targets = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
        answer_mask = torch.zeros(batch, length, dtype=torch.bool)
        answer_mask[:, query_pos] = True
        return tokens, targets, answer_mask

    def token_features(self) -> torch.Tensor:
        """float [vocab, n_features], 0/1: which features each token has, for `TinyLM`'s factored
        embedding. Features: kind (filler, record, query, value), key id, value id, filler id. A
        record (key, value) shares its key feature with the query for that key and its value
        feature with the answer token: the model need not learn, from scarce examples, that 64
        record tokens name 8 keys, and pre-training stays short. The selection problem is unchanged."""
        kinds, keys, values = 4, self.n_keys, self.n_values
        features = torch.zeros(self.vocab_size, kinds + keys + values + self.n_fillers)
        key_col, value_col, filler_col = kinds, kinds + keys, kinds + keys + values
        for f in range(self.n_fillers):
            features[f, [0, filler_col + f]] = 1
        for key in range(keys):
            for value in range(values):
                features[self.first_record + key * values + value, [1, key_col + key, value_col + value]] = 1
            features[self.first_query + key, [2, key_col + key]] = 1
        for value in range(values):
            features[self.first_value + value, [3, value_col + value]] = 1
        return features

    def batches(self, batch: int, length: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """An endless, seeded stream of `sample` batches."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch, length, generator)


# ----------------------------------------------------------------------------- the model

class SwiGLU(nn.Module):
    """The feed-forward block: W_2 (SiLU(W_1 x) * W_3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """h <- h + Attn(RMSNorm(h)); h <- h + MLP(RMSNorm(h))."""

    def __init__(self, args: ModelArgs, attention: nn.Module):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attn = attention
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn = SwiGLU(args.dim, 2 * args.dim)

    def forward(self, h, positions, topk, detach_indexer_input):
        out, aux = self.attn(self.attn_norm(h), positions, topk=topk, return_aux=True,
                             detach_indexer_input=detach_indexer_input)
        h = h + out
        return h + self.ffn(self.ffn_norm(h)), aux


class TinyLM(nn.Module):
    """A decoder language model around any DSA-style attention (see the module docstring).

    `make_attention(args)` builds one layer's attention; `topk=None` in `forward` means dense
    attention, passed to the layer as k = T (every visible token selected; the indexer still
    scores, for the warm-up loss).
    """

    def __init__(self, args: ModelArgs, vocab_size: int, n_layers: int,
                 make_attention: Callable[[ModelArgs], nn.Module], token_features: torch.Tensor | None = None):
        super().__init__()
        if vocab_size <= 0 or n_layers <= 0:
            raise ValueError(f"need vocab_size > 0 and n_layers > 0, got {vocab_size}, {n_layers}")
        self.args = args
        # token_features [vocab, n_features]: embedding(x) = sum of the learned vectors of x's features
        if token_features is None:
            token_features = torch.eye(vocab_size)
        check_tensor(token_features, "token_features", shape=(vocab_size, None), dtype=torch.float32)
        self.register_buffer("token_features", token_features, persistent=False)
        self.embed = nn.Embedding(token_features.shape[1], args.dim)
        self.layers = nn.ModuleList(Block(args, make_attention(args)) for _ in range(n_layers))
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.head = nn.Linear(args.dim, vocab_size, bias=False)
        with torch.no_grad():
            self.embed.weight.normal_(0.0, 1.0)
            self.head.weight.normal_(0.0, args.dim ** -0.5)

    def forward(self, tokens: torch.Tensor, topk: int | None = None, detach_indexer_input: bool = False,
                score_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
        """tokens int64 [B, T] -> logits [B, T, vocab] (or [N, vocab] at the N positions where
        score_mask [B, T] is True: the output head is the costliest matmul), and each layer's aux dict."""
        check_tensor(tokens, "tokens", shape=("B", "T"), dtype=torch.int64)
        check_range(tokens, "tokens", 0, self.token_features.shape[0] - 1)
        if topk is not None:
            check_range(topk, "topk", 1)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        topk = tokens.shape[1] if topk is None else topk  # k >= S: every visible token, dense
        # sum of the token's feature embeddings: [B, T, dim]
        h = F.embedding(tokens, self.token_features) @ self.embed.weight
        auxes = []
        for layer in self.layers:
            h, aux = layer(h, positions, topk, detach_indexer_input)
            auxes.append(aux)
        if score_mask is not None:
            check_tensor(score_mask, "score_mask", shape=tuple(tokens.shape), dtype=torch.bool)
            h = h[score_mask]  # [N, dim]
        return self.head(self.norm(h)), auxes


# ----------------------------------------------------------------------------- losses and parameter groups

def _scored(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor):
    """The logits [N, V] and targets [N] at the masked positions (logits given for all [B, T, V] or for those N)."""
    check_tensor(targets, "targets", shape=("B", "T"), dtype=torch.int64)
    check_tensor(loss_mask, "loss_mask", shape=tuple(targets.shape), dtype=torch.bool)
    check_tensor(logits, "logits", dtype=FLOATS)
    if logits.dim() == 3:
        check_tensor(logits, "logits", shape=tuple(targets.shape) + (None,))
        logits = logits[loss_mask]
    if data_checks_wanted(loss_mask):  # the count of masked positions is device data
        check_tensor(logits, "logits", shape=(int(loss_mask.sum()), None))
    return logits, targets[loss_mask]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next token, averaged over the positions where loss_mask [B, T] is True.

    logits [B, T, V], or [N, V] already restricted to those N positions; targets int64 [B, T]."""
    logits, targets = _scored(logits, targets, loss_mask)
    return F.cross_entropy(logits, targets)


def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the masked positions whose argmax is the target (logits as for `lm_loss`)."""
    logits, targets = _scored(logits, targets, loss_mask)
    return (logits.argmax(-1) == targets).double().mean()


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every submodule named `indexer` (the lightning indexers)."""
    return [p for name, p in model.named_parameters() if ".indexer." in f".{name}"]


def main_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every other parameter: what the language-model loss trains."""
    ids = {id(p) for p in indexer_parameters(model)}
    return [p for p in model.parameters() if id(p) not in ids]


def freeze_all_but_indexer(model: nn.Module) -> None:
    """The dense warm-up's setting: requires_grad only on the indexer's parameters."""
    for p in main_parameters(model):
        p.requires_grad_(False)
    for p in indexer_parameters(model):
        p.requires_grad_(True)


def _summed_kl(auxes: list[dict], sparse: bool) -> torch.Tensor:
    """L^I summed over layers."""
    return sum(indexer_kl_loss(aux["index_scores"], aux["attn_probs"], aux["indices"] if sparse else None)
               for aux in auxes)


def _dense_indices(index_scores: torch.Tensor, k: int) -> torch.Tensor:
    """What the indexer would select at budget k, for recall: top-k of the causal scores, -1 where invisible."""
    return select_topk(index_scores.detach().float(), min(k, index_scores.shape[-1]))


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (off in notebooks and tests, whose stored outputs must not change)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=1.0)


# ----------------------------------------------------------------------------- the three stages

@dataclass
class History:
    """What a training run logged, with its settings and wall time (seconds)."""

    stage: str
    settings: dict
    steps: list
    metrics: dict
    seconds: float = 0.0

    def log(self, step: int, **values: float) -> None:
        self.steps.append(step)
        for key, value in values.items():
            self.metrics.setdefault(key, []).append(float(value))

    def as_dict(self) -> dict:
        return asdict(self)


def pretrain_dense(model: TinyLM, task: KeyValueRetrieval, *, steps: int, length: int, batch: int = 16,
                   lr: float = 3e-3, seed: int = 0, log_every: int = 25, progress: bool = True) -> History:
    """Stage 0 (stands in for the dense checkpoint the report starts from): dense attention, the
    language-model loss on every parameter but the indexer's. AdamW, cosine decay to 0."""
    params = main_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    history = History("pretrain_dense", dict(steps=steps, length=length, batch=batch, lr=lr, seed=seed), [], {})
    data = task.batches(batch, length, seed)
    start = time.perf_counter()
    model.train()
    for step in progress_bar(range(1, steps + 1), steps, "dense pre-training", progress):
        tokens, targets, mask = next(data)
        logits, _ = model(tokens, score_mask=mask)
        loss = lm_loss(logits, targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            history.log(step, lm_loss=loss.item(), accuracy=answer_accuracy(logits, targets, mask).item())
    history.seconds = time.perf_counter() - start
    return history


def dense_warmup(model: TinyLM, task: KeyValueRetrieval, *, steps: int, length: int, batch: int = 16,
                 lr: float = 1e-3, topk: int | None = None, seed: int = 1, log_every: int = 10,
                 progress: bool = True) -> History:
    """Stage 1: dense attention, everything frozen but the indexer, loss sum over layers of the dense L^I.

    Logs the loss and, at budget `topk` (default args.index_topk), the attention mass the top-k set
    recalls, over all tokens and over the answer positions. Adam at lr (the report: 1e-3).
    """
    topk = model.args.index_topk if topk is None else topk
    freeze_all_but_indexer(model)
    params = indexer_parameters(model)
    if not params:
        raise ValueError("the model has no parameters under a submodule named 'indexer'")
    optimizer = torch.optim.Adam(params, lr=lr)
    history = History("dense_warmup", dict(steps=steps, length=length, batch=batch, lr=lr, topk=topk, seed=seed),
                      [], {})
    data = task.batches(batch, length, seed)
    start = time.perf_counter()
    for step in progress_bar(range(1, steps + 1), steps, "dense warm-up", progress):
        tokens, targets, mask = next(data)
        _, auxes = model(tokens, score_mask=mask)
        loss = _summed_kl(auxes, sparse=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps or step == 1:
            with torch.no_grad():
                recall = [topk_recall(a["attn_probs"], _dense_indices(a["index_scores"], topk)) for a in auxes]
                recall_answer = [topk_recall(a["attn_probs"], _dense_indices(a["index_scores"], topk), mask)
                                 for a in auxes]
            history.log(step, kl=loss.item() / len(auxes), recall=sum(recall).item() / len(auxes),
                        recall_answer=sum(recall_answer).item() / len(auxes))
    history.seconds = time.perf_counter() - start
    for p in model.parameters():
        p.requires_grad_(True)
    return history


def sparse_training(model: TinyLM, task: KeyValueRetrieval, *, steps: int, length: int, topk: int | None = None,
                    batch: int = 16, lr_main: float = 3e-4, lr_indexer: float = 1e-3, seed: int = 2,
                    log_every: int = 10, progress: bool = True) -> History:
    """Stage 2: top-k sparse attention; the language-model loss trains the main model, the sparse
    L^I (on S_t) trains the indexer, whose input is detached: the two losses reach disjoint
    parameters, so one backward of their sum gives each its own gradient."""
    topk = model.args.index_topk if topk is None else topk
    main, indexer = main_parameters(model), indexer_parameters(model)
    optimizer = torch.optim.AdamW([dict(params=main, lr=lr_main), dict(params=indexer, lr=lr_indexer)],
                                  weight_decay=0.0)
    history = History("sparse_training", dict(steps=steps, length=length, batch=batch, topk=topk, lr_main=lr_main,
                                              lr_indexer=lr_indexer, seed=seed), [], {})
    data = task.batches(batch, length, seed)
    start = time.perf_counter()
    model.train()
    for step in progress_bar(range(1, steps + 1), steps, f"sparse training (k={topk})", progress):
        tokens, targets, mask = next(data)
        logits, auxes = model(tokens, topk=topk, detach_indexer_input=True, score_mask=mask)
        language = lm_loss(logits, targets, mask)
        kl = _summed_kl(auxes, sparse=True)
        optimizer.zero_grad(set_to_none=True)
        (language + kl).backward()
        torch.nn.utils.clip_grad_norm_(main, 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps or step == 1:
            history.log(step, lm_loss=language.item(), kl=kl.item() / len(auxes),
                        accuracy=answer_accuracy(logits, targets, mask).item())
    history.seconds = time.perf_counter() - start
    return history


@torch.no_grad()
def evaluate(model: TinyLM, task: KeyValueRetrieval, *, length: int, topks: tuple[int | None, ...] = (None,),
             batch: int = 16, n_batches: int = 1, seed: int = 12345) -> dict:
    """Answer accuracy for each budget k (None = dense) on fresh seeded batches, and the attention
    mass the selected set S_t recalls at the answer positions (`topk_recall` of the layer's own
    dense probabilities, averaged over layers; 1 for dense). -> {k or "dense": {accuracy, recall_answer}}"""
    model.eval()
    results = {("dense" if k is None else k): dict(accuracy=0.0, recall_answer=0.0) for k in topks}
    data = task.batches(batch, length, seed)
    for _ in range(n_batches):
        tokens, targets, mask = next(data)
        for k in topks:
            logits, auxes = model(tokens, topk=k, score_mask=mask)
            recall = sum(topk_recall(a["attn_probs"], a["indices"], mask) for a in auxes) / len(auxes)
            entry = results["dense" if k is None else k]
            entry["accuracy"] += answer_accuracy(logits, targets, mask).item() / n_batches
            entry["recall_answer"] += recall.item() / n_batches
    model.train()
    return results


# ----------------------------------------------------------------------------- the causality guard

@torch.no_grad()
def future_influence(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cut: int,
                     x_future: torch.Tensor) -> float:
    """max |forward(x)[:, :cut] - forward(x')[:, :cut]| with x' = x up to `cut` and x_future after.

    Causality means the outputs before `cut` cannot depend on inputs from `cut` on: the result
    must be 0 (up to rounding). x [B, T, ...] (tokens or hidden states); x_future like x[:, cut:].
    """
    check_tensor(x, "x")
    if not 0 < cut < x.shape[1]:
        raise ValueError(f"cut must be inside the sequence (0 < cut < {x.shape[1]}), got {cut}")
    check_tensor(x_future, "x_future", shape=(x.shape[0], x.shape[1] - cut) + tuple(x.shape[2:]), dtype=x.dtype)
    changed = torch.cat([x[:, :cut], x_future], dim=1)
    return (forward(x)[:, :cut] - forward(changed)[:, :cut]).abs().max().item()
