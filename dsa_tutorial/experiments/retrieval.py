"""Research questions 1, 3 and 5 again, on a retrieval task that needs selection at length.

`KeyValueRetrieval` (chapters 8-9) stores 8 records at every length: longer sequences only add
filler, so at T = 1024 a budget of k = 8 can hold every record and the indexer nearly always
selects the one the answer needs; accuracy then measures the main model, not selection.
`LongRetrieval` changes four things:

* the records fill the context at a fixed density (one record per `density` tokens), so their
  number grows with T: 6 at T = 512, 10 at T = 768, 14 at T = 1024;
* keys have two parts, (prefix, suffix), and come in groups of `group` records that share a
  prefix: every asked key has `group` - 1 near misses (1 by default), records that match half
  of it;
* two query types, half of the queries each: "value of key" (a query naming (prefix, suffix),
  answered by that record's value) and "key of value" (a query naming a value, answered by the
  key of the record that holds it; values are distinct within a sequence);
* the models train at T = 1024 (after two curriculum phases on short, denser sequences) and
  every cell is scored on 1024 answers.

One token per record, one per query and one per answer, each carrying its parts as features of
`TinyLM`'s factored embedding (as `KeyValueRetrieval` does): the model is one layer, and one
attention layer reads each position on its own, so a key split over two tokens could not be
matched in one look-up. The two parts still make the look-up harder: a near miss scores half a
match, and the attention and the indexer must rank the exact record above it.

The experiments (`python -m dsa_tutorial.experiments retrieval_weights retrieval_topk_length
retrieval_indexer_size`): the stages of the book (dense pre-training, dense warm-up of the
indexer), 5 runs paired across arms (run r: the same initial main model, the same training
batches in the same order and the same evaluation sequences in every arm), and per cell the
mean, std and paired difference against the experiment's reference arm with its 95%
t-interval (`common.paired_difference`). Per cell: answer accuracy (both query types and each),
the hit rate (the share of answers whose selected set S_t holds the record the answer needs)
and the attention mass S_t recalls at the answers (`train.topk_recall`).

The model's layer is `common.MaskedDSAttention`: `DSAttention` computed as dense attention with -inf
outside S_t (dense calls: every visible position), instead of gathering k latents per query. The
result is the same (the tests compare the two), without the [B, T, k, d_c] tensor of gathered
latents, so that a training step at T = 1024 takes milliseconds on a GPU.

Runs take a device ("cpu" or "cuda") and may run in parallel processes (`jobs`, one run each).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from ..checks import check_tensor
from ..config import ModelArgs
from ..train import TinyLM, dense_warmup, pretrain_dense, progress_bar, topk_recall
from .common import (MaskedDSAttention, Settings, UniformWeights, _cached, in_processes, mean_std, model_args,
                     paired_difference)

__all__ = ["LongRetrieval", "needed_positions", "query_kinds", "make_model",
           "pretrained", "warmed", "evaluate", "RETRIEVAL", "RETRIEVAL_SMOKE", "EXPERIMENTS", "retrieval_weights",
           "retrieval_topk_length", "retrieval_indexer_size", "batch_digest"]

KINDS = ("value_of_key", "key_of_value")


# ----------------------------------------------------------------------------- the task

@dataclass(frozen=True)
class LongRetrieval:
    """Records (prefix, suffix, value) at a fixed density in filler noise, two query types at the end.

    A sequence of T tokens: a context of T - 2 n_queries tokens, random fillers with
    R = group floor(floor(context / density) / group) records at distinct random positions
    (R / group distinct prefixes, each shared by `group` records with distinct suffixes; distinct
    values); then n_queries pairs (query, answer) about distinct records, half "value of key"
    (query token Qv(prefix, suffix), answer token Av(value)) and half "key of value" (Qk(value),
    Ak(prefix, suffix)), in random order. The model is scored on the answer after each query.

    `device`: where `sample` and `batches` put their tensors (drawn on the CPU with a CPU generator,
    so a run's data is the same on every device).
    """

    n_prefixes: int = 8
    n_suffixes: int = 4
    n_values: int = 32
    n_fillers: int = 16
    density: int = 64
    group: int = 2
    n_queries: int = 4
    device: str = field(default="cpu", compare=False)

    def __post_init__(self) -> None:
        for name in ("n_prefixes", "n_suffixes", "n_values", "n_fillers", "density", "group", "n_queries"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LongRetrieval.{name} must be positive, got {getattr(self, name)}")
        if self.n_queries % 2 or self.group > self.n_suffixes:
            raise ValueError(f"need an even n_queries (half of each kind) and group <= n_suffixes, got "
                             f"{self.n_queries}, {self.group} > {self.n_suffixes}")

    def settings(self) -> dict:
        """The task's sizes (the JSON's record of it; the device is where, not what)."""
        return {key: value for key, value in asdict(self).items() if key != "device"}

    # token ids: fillers, records (p, s, v), Qv (p, s), Qk (v), Av (v), Ak (p, s)
    @property
    def n_keys(self) -> int:
        return self.n_prefixes * self.n_suffixes

    @property
    def first_record(self) -> int:
        return self.n_fillers

    @property
    def first_value_query(self) -> int:
        return self.first_record + self.n_keys * self.n_values

    @property
    def first_key_query(self) -> int:
        return self.first_value_query + self.n_keys

    @property
    def first_value_answer(self) -> int:
        return self.first_key_query + self.n_values

    @property
    def first_key_answer(self) -> int:
        return self.first_value_answer + self.n_values

    @property
    def vocab_size(self) -> int:
        return self.first_key_answer + self.n_keys

    def n_records(self, length: int) -> int:
        """R at length T: the context's floor(context / density), rounded down to whole groups."""
        return (length - 2 * self.n_queries) // self.density // self.group * self.group

    def min_length(self) -> int:
        """The shortest T with a record for every query."""
        return -(-self.n_queries // self.group) * self.group * self.density + 2 * self.n_queries

    def max_length(self) -> int:
        """The longest T whose records fit the key and value spaces (distinct keys and values)."""
        records = min(self.n_prefixes * self.group, self.n_values) // self.group * self.group
        return (records + 1) * self.density + 2 * self.n_queries - 1

    def sample(self, batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """tokens int64 [B, T], targets int64 [B, T] (the next token), answer_mask bool [B, T] (True
        at the query tokens, whose target is the answer), on self.device."""
        n_records = self.n_records(length)
        if batch <= 0 or n_records < self.n_queries or length > self.max_length():
            raise ValueError(f"need batch > 0 and {self.n_queries} <= records <= the key and value spaces: length "
                             f"in [{self.min_length()}, {self.max_length()}], got batch {batch}, length {length}")
        rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
        n_groups, context = n_records // self.group, length - 2 * self.n_queries
        tokens = torch.randint(self.n_fillers, (batch, length), generator=generator)
        # keys: n_groups distinct prefixes, `group` distinct suffixes under each: [B, R]
        prefixes = rand(batch, self.n_prefixes).argsort(-1)[:, :n_groups].repeat_interleave(self.group, dim=1)
        suffixes = rand(batch, n_groups, self.n_suffixes).argsort(-1)[..., : self.group].flatten(1)
        keys = prefixes * self.n_suffixes + suffixes  # [B, R]
        values = rand(batch, self.n_values).argsort(-1)[:, :n_records]  # distinct [B, R]
        slots = rand(batch, context).argsort(-1)[:, :n_records]  # record positions [B, R]
        tokens.scatter_(1, slots, self.first_record + keys * self.n_values + values)
        asked = rand(batch, n_records).argsort(-1)[:, : self.n_queries]  # distinct records asked [B, Q]
        by_key = rand(batch, self.n_queries).argsort(-1) < self.n_queries // 2  # half of each kind [B, Q]
        asked_keys, asked_values = keys.gather(1, asked), values.gather(1, asked)
        query_pos = context + 2 * torch.arange(self.n_queries)  # [Q]
        tokens[:, query_pos] = torch.where(by_key, self.first_value_query + asked_keys,
                                           self.first_key_query + asked_values)
        tokens[:, query_pos + 1] = torch.where(by_key, self.first_value_answer + asked_values,
                                               self.first_key_answer + asked_keys)
        targets = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
        answer_mask = torch.zeros(batch, length, dtype=torch.bool)
        answer_mask[:, query_pos] = True
        return tokens.to(self.device), targets.to(self.device), answer_mask.to(self.device)

    def batches(self, batch: int, length: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """An endless stream of `sample` batches, determined by `seed` alone."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch, length, generator)

    def token_features(self) -> torch.Tensor:
        """float [vocab, n_features], 0/1. Features: the kind (filler, record, Qv, Qk, Av, Ak), the
        prefix, the suffix, the value, the filler id. A record shares its prefix and suffix
        features with the query and answer naming its key, its value feature with those naming its
        value: what the look-up matches on, and what the answer reads from the record."""
        kinds, P, S, V = 6, self.n_prefixes, self.n_suffixes, self.n_values
        prefix_col, suffix_col, value_col, filler_col = kinds, kinds + P, kinds + P + S, kinds + P + S + V
        features = torch.zeros(self.vocab_size, filler_col + self.n_fillers)
        fillers = torch.arange(self.n_fillers)
        features[fillers, 0] = 1
        features[fillers, filler_col + fillers] = 1
        key = torch.arange(self.n_keys)
        prefix, suffix = key // S, key % S
        # records (p, s, v): token first_record + key V + v
        record = self.first_record + key[:, None] * V + torch.arange(V)  # [K, V]
        features[record, 1] = 1
        features[record, prefix_col + prefix[:, None]] = 1
        features[record, suffix_col + suffix[:, None]] = 1
        features[record, value_col + torch.arange(V)] = 1
        for kind, first in ((2, self.first_value_query), (5, self.first_key_answer)):  # name a key
            features[first + key, kind] = 1
            features[first + key, prefix_col + prefix] = 1
            features[first + key, suffix_col + suffix] = 1
        for kind, first in ((3, self.first_key_query), (4, self.first_value_answer)):  # name a value
            features[first + torch.arange(V), kind] = 1
            features[first + torch.arange(V), value_col + torch.arange(V)] = 1
        return features


def query_kinds(task: LongRetrieval, tokens: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """int64 [B, T]: 0 where the answer position asks "value of key", 1 "key of value", -1 elsewhere."""
    check_tensor(tokens, "tokens", shape=("B", "T"), dtype=torch.int64)
    check_tensor(answer_mask, "answer_mask", shape=tuple(tokens.shape), dtype=torch.bool, device=tokens.device)
    by_key = (tokens >= task.first_value_query) & (tokens < task.first_key_query)
    by_value = (tokens >= task.first_key_query) & (tokens < task.first_value_answer)
    if not bool((answer_mask == (by_key | by_value)).all()):
        raise ValueError("the answer positions must be exactly the query tokens")
    return torch.where(by_key, 0, torch.where(by_value, 1, -1))


def needed_positions(task: LongRetrieval, tokens: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """The record each answer must read, found from the tokens alone: at a query naming key kappa,
    the position of the record with key kappa; at a query naming value v, the record holding v;
    -1 elsewhere. Raises unless every query matches exactly one record before it. -> int64 [B, T]"""
    kinds = query_kinds(task, tokens, answer_mask)
    V = task.n_values
    is_record = (tokens >= task.first_record) & (tokens < task.first_value_query)
    record = tokens - task.first_record
    record_key, record_value = torch.where(is_record, record // V, -1), torch.where(is_record, record % V, -1)
    asked = torch.where(kinds == 0, tokens - task.first_value_query,
                        torch.where(kinds == 1, tokens - task.first_key_query, -2))  # [B, T]
    # match[b, t, s]: record s has what the query at t names: [B, T, S]
    match = torch.where((kinds == 0)[:, :, None], record_key[:, None, :] == asked[:, :, None],
                        record_value[:, None, :] == asked[:, :, None]) & answer_mask[:, :, None]
    if not bool((match.sum(-1) == answer_mask.long()).all()):
        raise ValueError("every query must name exactly one stored record")
    return torch.where(answer_mask, match.long().argmax(-1), -1)


def batch_digest(tokens: torch.Tensor) -> str:
    """A short hash of a batch of tokens (the results record the first batch of each stage, so that
    equal digests show that two arms saw the same data)."""
    return hashlib.sha256(tokens.detach().cpu().numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the model

# ----------------------------------------------------------------------------- configuration and models

def _args(max_seq_len: int) -> dict:
    """The tiny model's dimensions (ModelArgs.tiny), RoPE tables up to max_seq_len, k = 16 by default."""
    return asdict(ModelArgs.tiny(max_seq_len=max_seq_len, original_seq_len=max_seq_len, index_topk=16))


RETRIEVAL = Settings(
    args=_args(1024),
    task=LongRetrieval().settings(),
    n_layers=1,
    # dense pre-training in three phases, a curriculum: short dense sequences first (8 records in 48
    # tokens, then 14 in 128, 8 queries each: many answers per step), then the training length
    # T = 1024 (14 records); keys other than steps, length, batch and lr override the task's sizes
    pretrain=[dict(steps=8000, length=48, batch=16, lr=1e-2, density=4, n_queries=8),
              dict(steps=2000, length=128, batch=16, lr=3e-3, density=8, n_queries=8),
              dict(steps=1500, length=1024, batch=16, lr=1e-3)],
    warmup=dict(steps=400, length=1024, batch=16, lr=1e-3),
    eval=dict(sequences=256, batch=16, seed=12345),  # 256 sequences x 4 queries = 1024 answers a cell
    lengths=[512, 768, 1024],
    topks=[2, 4, 8, 16, 32, 64],
    threads=1,
)
RETRIEVAL_SMOKE = Settings({**RETRIEVAL,
                            "task": dict(RETRIEVAL["task"], n_prefixes=8, n_suffixes=2, n_values=16, density=8,
                                         group=2),
                            "pretrain": [dict(steps=8, length=40, batch=4, lr=1e-2, density=4, n_queries=6),
                                         dict(steps=8, length=96, batch=4, lr=3e-3)],
                            "warmup": dict(steps=6, length=96, batch=4, lr=1e-3),
                            "eval": dict(sequences=8, batch=4, seed=12345),
                            "lengths": [64, 96], "topks": [2, 8], "args": _args(128)})
STAGE_SIZES = ("steps", "length", "batch", "lr")


def _phase(config: dict, sizes: dict, device: str = "cpu") -> tuple[LongRetrieval, dict]:
    """(the task of one pre-training phase, its training sizes): keys of `sizes` other than STAGE_SIZES
    override the task's."""
    overrides = {key: value for key, value in sizes.items() if key not in STAGE_SIZES}
    task = LongRetrieval(**dict(config["task"], **overrides), device=str(device))
    return task, {key: value for key, value in sizes.items() if key in STAGE_SIZES}


def task_of(config: dict, device: str = "cpu") -> LongRetrieval:
    return LongRetrieval(**config["task"], device=str(device))


def make_model(config: dict, init: int, weights: str = "learned", device: str = "cpu", **index_overrides) -> TinyLM:
    """A freshly initialised one-layer TinyLM around `common.MaskedDSAttention`, initialised on the CPU
    from `init` (the same numbers on every device), then moved to `device`."""
    if weights not in ("learned", "uniform"):
        raise ValueError(f"weights must be 'learned' or 'uniform', got {weights!r}")
    task = task_of(config)
    args = model_args(config, **index_overrides)
    torch.manual_seed(init)
    model = TinyLM(args, task.vocab_size, config["n_layers"], MaskedDSAttention, task.token_features())
    if weights == "uniform":
        for layer in model.layers:
            layer.attn.indexer.weights_proj = UniformWeights(args.index_n_heads)
    return model.to(device)


def _stage_payload(config: dict, device: str, **extra) -> dict:
    return dict(torch=torch.__version__, device=torch.device(device).type,
                **{key: config[key] for key in ("args", "task", "n_layers", "pretrain", "threads")}, **extra)


def pretrained(config: dict, run: int, device: str = "cpu", use_cache: bool = True, progress: bool = True):
    """Stage 0 of run `run`: the dense model pre-trained on the task (phases of config["pretrain"]),
    its indexer untouched. Cached like `common.base_model`. -> (model, [history per phase])"""

    def build(train: bool):
        model = make_model(config, run, device=device)
        if not train:
            return model, None
        histories = []
        for phase, sizes in enumerate(config["pretrain"]):
            task, sizes = _phase(config, sizes, device)
            histories.append(pretrain_dense(model, task, seed=10 * run + phase, progress=progress, **sizes).as_dict())
        return model, histories

    payload = _stage_payload(config, device, stage="retrieval-pretrain", run=run)
    return _cached(f"retrieval-pretrain-{run}", payload, build, use_cache)


def warmed(config: dict, run: int, weights: str = "learned", device: str = "cpu", use_cache: bool = True,
           progress: bool = True, **index_overrides):
    """Stage 1 of run `run`: the pre-trained model with a fresh indexer (of the given size and
    weights), dense warm-up. Every arm of run r starts from the same main model and trains on the
    same batch stream (seed 100 + r). -> (model, pre-training histories, warm-up history)"""
    base, base_history = pretrained(config, run, device, use_cache, progress)
    payload = _stage_payload(config, device, stage="retrieval-warmup", run=run, weights=weights, index=index_overrides,
                             warmup=config["warmup"])

    def build(train: bool):
        model = make_model(config, 1000 + run, weights, device, **index_overrides)
        main = {name: p for name, p in base.state_dict().items() if ".indexer." not in name}
        missing, unexpected = model.load_state_dict(main, strict=False)
        assert not unexpected and all(".indexer." in name for name in missing), (missing, unexpected)
        if not train:
            return model, None
        history = dense_warmup(model, task_of(config, device), seed=100 + run, progress=progress,
                               **config["warmup"]).as_dict()
        return model, history

    size = "-".join(f"{key}{value}" for key, value in sorted(index_overrides.items())) or "default"
    model, history = _cached(f"retrieval-warmup-{weights}-{size}-{run}", payload, build, use_cache)
    return model, base_history, history


def data_digests(config: dict, run: int) -> dict:
    """The digest of the first batch each training stage of run `run` reads (the same in every arm)."""
    def first(sizes, seed):
        task, sizes = _phase(config, sizes)
        return batch_digest(next(task.batches(sizes["batch"], sizes["length"], seed))[0])

    return dict(pretrain=[first(sizes, 10 * run + phase) for phase, sizes in enumerate(config["pretrain"])],
                warmup=first(config["warmup"], 100 + run))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: TinyLM, task: LongRetrieval, *, length: int, topks: tuple, sequences: int, batch: int,
             seed: int) -> dict:
    """{"dense" or k: {accuracy, accuracy_value_of_key, accuracy_key_of_value, hit_rate, recall_answer,
    answers}} over `sequences` sequences of `length` tokens drawn from `seed` (the same for every model
    and k). hit_rate: share of the answers whose selected set S_t holds the record the answer needs
    (1 for dense); recall_answer: the attention mass S_t recalls at the answers (`topk_recall`)."""
    model.eval()
    budgets = (None,) + tuple(k for k in topks if k < length)
    names = ("correct", "correct_value_of_key", "correct_key_of_value", "hits", "recall")
    sums = {k: {name: torch.zeros((), dtype=torch.float64, device=task.device) for name in names} for k in budgets}
    counts = torch.zeros(3, dtype=torch.float64, device=task.device)  # answers: all, value of key, key of value
    data = task.batches(batch, length, seed)
    for _ in range(math.ceil(sequences / batch)):
        tokens, targets, mask = next(data)
        kinds = query_kinds(task, tokens, mask)[mask]  # [N]
        needed = needed_positions(task, tokens, mask)  # [B, T]
        counts += torch.stack([(kinds >= 0).sum(), (kinds == 0).sum(), (kinds == 1).sum()]).double()
        for k in budgets:
            logits, auxes = model(tokens, topk=k, score_mask=mask)
            right = (logits.argmax(-1) == targets[mask]).double()  # [N]
            entry = sums[k]
            entry["correct"] += right.sum()
            entry["correct_value_of_key"] += right[kinds == 0].sum()
            entry["correct_key_of_value"] += right[kinds == 1].sum()
            for aux in auxes:
                hit = (aux["indices"].long() == needed[..., None]).any(-1)[mask]  # [N]
                entry["hits"] += hit.double().sum() / len(auxes)
                entry["recall"] += topk_recall(aux["attn_probs"], aux["indices"], mask).double() * mask.sum() / len(
                    auxes)
    model.train()
    total, by_key, by_value = counts.tolist()
    out = {}
    for k, entry in sums.items():
        entry = {name: value.item() for name, value in entry.items()}
        out["dense" if k is None else str(k)] = dict(
            accuracy=entry["correct"] / total, accuracy_value_of_key=entry["correct_value_of_key"] / by_key,
            accuracy_key_of_value=entry["correct_key_of_value"] / by_value, hit_rate=entry["hits"] / total,
            recall_answer=entry["recall"] / total, answers=int(total))
    return out


def _grid(model, config, device, lengths, topks) -> dict:
    """{length: evaluate(...)} on the configuration's evaluation sequences."""
    sizes = config["eval"]
    return {str(L): evaluate(model, task_of(config, device), length=L, topks=tuple(topks), **sizes) for L in lengths}


# ----------------------------------------------------------------------------- the three experiments (one run each)

SIZES = [dict(index_n_heads=h, index_head_dim=16) for h in (1, 2, 4, 8)] + \
        [dict(index_n_heads=4, index_head_dim=d) for d in (8, 32)]
DEFAULT_SIZE = dict(index_n_heads=4, index_head_dim=16)


def _size_name(size: dict) -> str:
    return f"H{size['index_n_heads']}_d{size['index_head_dim']}"


def _weights_run(config, run, device, use_cache, progress) -> dict:
    lengths, topks = (config["lengths"][-1],), (4, 8, 16)
    entry = dict(run=run, data=data_digests(config, run))
    for weights in ("learned", "uniform"):
        model, _, hist = warmed(config, run, weights, device, use_cache, progress)
        entry[weights] = dict(kl=hist["metrics"]["kl"], recall=hist["metrics"]["recall_answer"], steps=hist["steps"],
                              eval=_grid(model, config, device, lengths, topks))
    return entry


def _topk_run(config, run, device, use_cache, progress) -> dict:
    model, pre, hist = warmed(config, run, "learned", device, use_cache, progress)
    return dict(run=run, data=data_digests(config, run), pretrain_accuracy=[h["metrics"]["accuracy"][-1] for h in pre],
                warmup_kl=hist["metrics"]["kl"][-1],
                eval=_grid(model, config, device, config["lengths"], config["topks"]))


def _size_run(config, run, device, use_cache, progress) -> dict:
    lengths, topks = (config["lengths"][-1],), (4, 16)
    entry = dict(run=run, data=data_digests(config, run))
    for size in SIZES:
        overrides = {} if size == DEFAULT_SIZE else size  # the default shares the warmed model of Q1 and Q3
        model, _, hist = warmed(config, run, "learned", device, use_cache, progress, **overrides)
        entry[_size_name(size)] = dict(final_kl=hist["metrics"]["kl"][-1], kl=hist["metrics"]["kl"],
                                       eval=_grid(model, config, device, lengths, topks))
    return entry


RUNS = {"retrieval_weights": _weights_run, "retrieval_topk_length": _topk_run, "retrieval_indexer_size": _size_run}


def _one(job) -> dict:
    """One run in a worker process: (experiment, config, run, device, use_cache, threads)."""
    name, config, run, device, use_cache, threads = job
    torch.set_num_threads(threads)
    return RUNS[name](config, run, device, use_cache, False)


def _per_run(name, config, runs, device, jobs, use_cache, progress) -> list[dict]:
    """RUNS[name] for every run, in order; with jobs > 1 in that many spawned processes."""
    if jobs <= 1 or len(runs) == 1:
        return [RUNS[name](config, r, device, use_cache, progress)
                for r in progress_bar(runs, len(runs), name, progress)]
    return in_processes(_one, [(name, dict(config), r, device, use_cache, config["threads"]) for r in runs], jobs)


def _cell(per_run, arm, reference=None) -> dict:
    """mean_std of the arm's values over the runs, and its paired difference against the reference's."""
    out = mean_std(arm(entry) for entry in per_run)
    if reference is not None:
        out["minus_reference"] = paired_difference([arm(e) for e in per_run], [reference(e) for e in per_run])
    return out


# a run whose dense model reaches this accuracy at the training length solved the task (reported, not
# used to leave runs out: the arms of a run share its main model, so paired differences stay valid)
SOLVED = 0.9
METRICS = ("accuracy", "accuracy_value_of_key", "accuracy_key_of_value", "hit_rate", "recall_answer")


def retrieval_weights(config, runs, device="cpu", jobs=1, progress=True, use_cache=True) -> dict:
    """Research question 1 on LongRetrieval: learned w^I against uniform (the reference arm)."""
    per_run = _per_run("retrieval_weights", config, runs, device, jobs, use_cache, progress)
    cells = per_run[0]["learned"]["eval"]
    summary = {}
    for weights in ("learned", "uniform"):
        summary[weights] = dict(final_kl=_cell(per_run, lambda e: e[weights]["kl"][-1],
                                               lambda e: e["uniform"]["kl"][-1]))
        for L, by_k in cells.items():
            for k in by_k:
                if k == "dense":
                    continue
                for m in METRICS:
                    summary[weights][f"{m}_L{L}_k{k}"] = _cell(
                        per_run, lambda e: e[weights]["eval"][L][k][m], lambda e: e["uniform"]["eval"][L][k][m])
    return dict(reference="uniform", metrics=list(METRICS), per_run=per_run, summary=summary,
                answers_per_cell={L: by_k["dense"]["answers"] for L, by_k in cells.items()})


def retrieval_topk_length(config, runs, device="cpu", jobs=1, progress=True, use_cache=True) -> dict:
    """Research question 3 on LongRetrieval: accuracy, hit rate and recall for every k at every
    length, against dense attention on the same model and sequences (the reference arm)."""
    per_run = _per_run("retrieval_topk_length", config, runs, device, jobs, use_cache, progress)
    summary = {L: {k: {m: _cell(per_run, lambda e: e["eval"][L][k][m], lambda e: e["eval"][L]["dense"][m])
                       for m in METRICS} for k in by_k}
               for L, by_k in per_run[0]["eval"].items()}
    task = task_of(config)
    train_length = str(config["warmup"]["length"])
    solved = [e["run"] for e in per_run if e["eval"][train_length]["dense"]["accuracy"] >= SOLVED]
    return dict(reference="dense", metrics=list(METRICS), lengths=config["lengths"], topks=config["topks"],
                records={str(L): task.n_records(L) for L in config["lengths"]}, per_run=per_run, summary=summary,
                solved_threshold=SOLVED, solved_runs=solved,
                pretrain_accuracy=[mean_std(e["pretrain_accuracy"][i] for e in per_run)
                                   for i in range(len(config["pretrain"]))],
                answers_per_cell={L: by_k["dense"]["answers"] for L, by_k in per_run[0]["eval"].items()})


def retrieval_indexer_size(config, runs, device="cpu", jobs=1, progress=True, use_cache=True) -> dict:
    """Research question 5 on LongRetrieval: indexers of H_I heads of d_I dims, against the default
    H_I = 4, d_I = 16 (the reference arm)."""
    per_run = _per_run("retrieval_indexer_size", config, runs, device, jobs, use_cache, progress)
    reference = _size_name(DEFAULT_SIZE)
    sizes = []
    for size in SIZES:
        name = _size_name(size)
        cells = per_run[0][name]["eval"]
        indexer = make_model(config, 0, **size).layers[0].attn.indexer
        entry = dict(**size, name=name, flops_per_pair=2 * size["index_n_heads"] * size["index_head_dim"],
                     parameters=sum(p.numel() for p in indexer.parameters()),
                     final_kl=_cell(per_run, lambda e: e[name]["final_kl"], lambda e: e[reference]["final_kl"]))
        for L, by_k in cells.items():
            for k in by_k:
                if k != "dense":
                    for m in METRICS:
                        entry[f"{m}_L{L}_k{k}"] = _cell(per_run, lambda e: e[name]["eval"][L][k][m],
                                                        lambda e: e[reference]["eval"][L][k][m])
        sizes.append(entry)
    return dict(reference=reference, metrics=list(METRICS), per_run=per_run, sizes=sizes)


EXPERIMENTS = {
    "retrieval_weights": (retrieval_weights, "Research question 1 on a task that needs selection at length "
                                             "(LongRetrieval): learned w^I against uniform weights."),
    "retrieval_topk_length": (retrieval_topk_length, "Research question 3 on LongRetrieval: which k for which "
                                                     "length, with the hit rate of the needed record."),
    "retrieval_indexer_size": (retrieval_indexer_size, "Research question 5 on LongRetrieval: the indexer's heads "
                                                       "H_I and head dim d_I."),
}


def run(name: str, *, smoke: bool = False, out_dir=None, runs=(0, 1, 2, 3, 4), progress: bool = True,
        use_cache: bool = True, device: str = "cpu", jobs: int = 1) -> dict:
    """One experiment of EXPERIMENTS at full size (RETRIEVAL) or smoke size (RETRIEVAL_SMOKE); the
    JSON payload of `common.save_result` (written to out_dir/NAME.json unless out_dir is None)."""
    from .common import save_result, training_device

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown retrieval experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    device = training_device(device)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    config = RETRIEVAL_SMOKE if smoke else RETRIEVAL
    function, question = EXPERIMENTS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(config["threads"])
    try:
        started = time.perf_counter()
        results = function(config, tuple(runs), device=str(device), jobs=jobs, progress=progress,
                           use_cache=use_cache and not smoke)
        return save_result(name, question, dict(config, smoke=smoke, jobs=jobs), runs, results, started, out_dir,
                           device=str(device))
    finally:
        torch.set_num_threads(threads)
