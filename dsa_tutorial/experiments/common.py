"""What every experiment shares: the configuration, the seeded models (cached), the result files.

One configuration (`CONFIG`) serves all experiments, so their numbers can be compared:

* the model: `TinyLM`, one DSA layer on `ModelArgs.tiny` dimensions (d = 64, 4 heads, latent
  d_c = 16, indexer H_I = 4 heads of d_I = 16), RoPE tables up to 1024 positions without YaRN;
* the task: `KeyValueRetrieval`, 8 records with 16 possible keys and 8 values, 4 queries at the end;
* dense pre-training: 300 steps of 16 sequences of 64 tokens (the stand-in for the report's dense
  checkpoint), then the dense warm-up of the indexer: 200 steps of 16 x 64 tokens, lr 1e-3 as in
  the report, everything else frozen.

Trained models are cached (``$DSA_TUTORIAL_CACHE``, default ``~/.cache/dsa_tutorial``) so that
experiments sharing a model train it once; training is seeded and single-threaded, hence
deterministic, and a cached model is bit for bit the one the experiment would train. Results go to
``book/data/NAME.json`` with the seeds, the configuration, the versions and the wall time.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from ..config import ModelArgs
from ..causal import last_visible
from ..mla import causal_mask
from ..sparse_attention import DSAttention
from ..topk import select_topk
from ..train import KeyValueRetrieval, TinyLM, dense_warmup, pretrain_dense
from .mha import MHADSAttention

__all__ = ["CONFIG", "SEEDS", "SMOKE", "DATA_DIR", "UniformWeights", "MaskedDSAttention", "make_model", "base_model", "warmed_model",
           "mean_std", "t_quantile", "paired_difference", "format_mean_std", "save_result", "environment",
           "training_device",
           "Settings"]

DATA_DIR = Path(__file__).resolve().parents[2] / "book" / "data"
SEEDS = (0, 1, 2)
ATTENTION = {"mla": DSAttention, "mha": MHADSAttention}


class Settings(dict):
    """A plain dict of the run's sizes with attribute access (stored as is in the JSON)."""

    __getattr__ = dict.__getitem__


CONFIG = Settings(
    args=dict(asdict(ModelArgs.tiny(max_seq_len=1024, original_seq_len=1024, index_topk=8))),
    task=dict(n_keys=16, n_values=8, n_fillers=16, n_records=8, n_queries=4),
    n_layers=1,
    pretrain=dict(steps=300, length=64, batch=16, lr=1e-2),
    warmup=dict(steps=200, length=64, batch=16, lr=1e-3),
    eval=dict(tokens=4096, batches=1, seed=12345),
    threads=1,
)
# the same code at smoke size: seconds, for the tests and the chapters (never written to book/data)
SMOKE = Settings({**CONFIG, "pretrain": dict(steps=40, length=32, batch=8, lr=1e-2),
                  "warmup": dict(steps=10, length=32, batch=8, lr=1e-3),
                  "eval": dict(tokens=256, batches=1, seed=12345),
                  "args": dict(CONFIG["args"], max_seq_len=256, original_seq_len=256)})


def model_args(config: dict, **overrides) -> ModelArgs:
    return replace(ModelArgs(**config["args"]), **overrides)


def task_of(config: dict) -> KeyValueRetrieval:
    return KeyValueRetrieval(**config["task"])


class UniformWeights(nn.Module):
    """Stands in for the indexer's weights_proj: the same weight for every head and token.

    The indexer then computes w^I_t,j = H_I^-0.5 d_I^-0.5 for all t, j: a plain average of the
    heads' ReLU(q . k) (research question 1, "is w^I needed?")."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.new_ones(*h.shape[:-1], self.n_heads)


# ----------------------------------------------------------------------------- the layer for long training runs

class MaskedDSAttention(DSAttention):
    """`DSAttention` computed on whole sequences as dense attention with -inf outside S_t.

    Same parameters, same index scores and top-k selection S_t, same aux (index_scores, indices,
    attn_probs); the output softmax_s over S_t of score_t,s,i times c^KV_s, which is
    `sparse_mla_attention` without gathering k latents per query ([B, T, n_h, S] scores instead of
    [B, T, k, d_c] gathered latents and their scatter-add in the backward pass). With k >= S every
    visible position is selected: S_t = {s <= t}, dense causal MLA. Prefill/training only (no cache).
    """

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None, cache=None, topk: int | None = None,
                return_aux: bool = False, detach_indexer_input: bool = False):
        if cache is not None:
            raise ValueError("MaskedDSAttention scores whole sequences (no cache); decode with DSAttention")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0):
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        args, mla = self.args, self.mla
        mla._check_h(h)
        n_queries = h.shape[1]
        if positions is None:
            positions = torch.arange(n_queries, device=h.device)
        c_q = mla.query_latent(h)  # [B, T, d_c']
        q_nope, q_rope = mla.queries(c_q, positions)  # [B, T, n_h, d_h], [B, T, n_h, d_R]
        c_kv, k_rope = mla.latents(h, positions)  # [B, S, d_c], [B, S, d_R]
        h_idx, c_q_idx = (h.detach(), c_q.detach()) if detach_indexer_input else (h, c_q)
        index_scores = self.indexer(h_idx, c_q_idx, positions, None)  # [B, T, S]
        n_keys = c_kv.shape[1]
        k = min(topk or args.index_topk, n_keys)
        q_abs = mla.absorb_query(q_nope)  # [B, T, n_h, d_c]
        scores = mla.latent_scores(q_abs, q_rope, c_kv, k_rope)  # [B, T, n_h, S]
        scores = scores + causal_mask(n_queries, n_keys, h.device, scores.dtype)[:, None, :]
        # the dense attention, per head, in float32 as DSAttention returns it (the warm-up's target)
        attn_probs = torch.softmax(scores.float(), dim=-1)  # [B, T, n_h, S]
        work = torch.float64 if scores.dtype == torch.float64 else torch.float32  # as sparse_mla_attention
        if k >= n_keys:
            # every visible position, ascending, -1 after t (what select_topk returns at k = S): [B, T, S]
            visible = torch.arange(n_keys, device=h.device)
            indices = torch.where(visible <= last_visible(n_queries, n_keys, h.device)[:, None], visible, -1)
            indices = indices.to(torch.int32).expand(h.shape[0], -1, -1)
            probs = attn_probs if work == torch.float32 else torch.softmax(scores, dim=-1)
        else:
            # S_t = Top-k(I_t,:) among s <= t: [B, T, k]
            indices = select_topk(index_scores.detach().float(), k)
            # True on S_t; unused slots (-1) write into an extra column S, dropped: [B, T, S]
            slots = torch.where(indices >= 0, indices, n_keys).long()
            keep = index_scores.new_zeros(*index_scores.shape[:-1], n_keys + 1, dtype=torch.bool)
            keep = keep.scatter_(-1, slots, True)[..., :n_keys]
            # softmax over S_t only: [B, T, n_h, S], 0 outside S_t
            probs = torch.softmax(scores.to(work).masked_fill(~keep[:, :, None, :], float("-inf")), dim=-1)
        # o^lat_t,i = sum_{s in S_t} p_t,s,i c^KV_s: [B, T, n_h, d_c]
        o_latent = torch.einsum("bths,bsc->bthc", probs, c_kv.to(work)).to(h.dtype)
        out = mla.latent_output(o_latent)  # [B, T, dim]
        if not return_aux:
            return out
        return out, {"index_scores": index_scores, "indices": indices, "attn_probs": attn_probs}


def make_model(kind: str, config: dict, seed: int, weights: str = "learned", **index_overrides) -> TinyLM:
    """A freshly initialised TinyLM (seeded): `kind` "mla" (the book's DSAttention) or "mha"."""
    if kind not in ATTENTION:
        raise ValueError(f"kind must be one of {sorted(ATTENTION)}, got {kind!r}")
    if weights not in ("learned", "uniform"):
        raise ValueError(f"weights must be 'learned' or 'uniform', got {weights!r}")
    torch.manual_seed(seed)
    args, task = model_args(config, **index_overrides), task_of(config)
    model = TinyLM(args, task.vocab_size, config["n_layers"], ATTENTION[kind], task.token_features())
    if weights == "uniform":
        for layer in model.layers:
            layer.attn.indexer.weights_proj = UniformWeights(args.index_n_heads)
    return model


def _cache_path(tag: str, payload: dict) -> Path:
    root = Path(os.environ.get("DSA_TUTORIAL_CACHE", Path.home() / ".cache" / "dsa_tutorial"))
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{tag}-{digest}.pt"


def _cached(tag: str, payload: dict, build, use_cache: bool):
    """(model, history) from the cache, or built by `build()` and cached."""
    path = _cache_path(tag, payload)
    if use_cache and path.exists():
        model, saved = build(train=False)
        stored = torch.load(path, weights_only=False)
        model.load_state_dict(stored["state"])
        return model, stored["history"]
    model, history = build(train=True)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "history": history}, path)
    return model, history


def base_model(kind: str, config: dict, seed: int, use_cache: bool = True, progress: bool = True):
    """Stage 0: the dense model, pre-trained on the task (its indexer untouched). -> (model, history)"""
    payload = dict(stage="pretrain", kind=kind, seed=seed, torch=torch.__version__,
                   **{key: config[key] for key in ("args", "task", "n_layers", "pretrain", "threads")})

    def build(train: bool):
        model = make_model(kind, config, seed)
        if not train:
            return model, None
        history = pretrain_dense(model, task_of(config), seed=seed, progress=progress, **config["pretrain"])
        return model, history.as_dict()

    return _cached(f"pretrain-{kind}-seed{seed}", payload, build, use_cache)


def warmed_model(kind: str, config: dict, seed: int, weights: str = "learned", use_cache: bool = True,
                 progress: bool = True, **index_overrides):
    """Stage 1: the base model with a fresh indexer (of the given size and weights), dense warm-up.
    -> (model, base history, warm-up history)"""
    base, base_history = base_model(kind, config, seed, use_cache, progress)
    payload = dict(stage="warmup", kind=kind, seed=seed, weights=weights, index=index_overrides,
                   torch=torch.__version__,
                   **{key: config[key] for key in ("args", "task", "n_layers", "pretrain", "warmup", "threads")})

    def build(train: bool):
        model = make_model(kind, config, 1000 + seed, weights, **index_overrides)
        main = {name: p for name, p in base.state_dict().items() if ".indexer." not in name}
        missing, unexpected = model.load_state_dict(main, strict=False)
        assert not unexpected and all(".indexer." in name for name in missing), (missing, unexpected)
        if not train:
            return model, None
        history = dense_warmup(model, task_of(config), seed=100 + seed, progress=progress, **config["warmup"])
        return model, history.as_dict()

    model, history = _cached(f"warmup-{kind}-{weights}-seed{seed}", payload, build, use_cache)
    return model, base_history, history


def eval_batch(config: dict, length: int) -> dict:
    """Evaluation sizes at one length: a fixed token budget, so long sequences get fewer of them."""
    batch = max(2, config["eval"]["tokens"] // length)
    return dict(length=length, batch=batch, n_batches=config["eval"]["batches"], seed=config["eval"]["seed"])


def mean_std(values) -> dict:
    """Mean and sample standard deviation (0 for a single value) of a list of numbers."""
    values = [float(v) for v in values]
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                n=len(values), values=values)


def t_quantile(probability: float, df: int) -> float:
    """The quantile of Student's t distribution with `df` degrees of freedom (0.5 < probability < 1).

    CDF(x) = 1/2 + integral_0^x f(u) du with f(u) = Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2))
    (1 + u^2/df)^(-(df+1)/2), integrated by Simpson's rule, inverted by bisection (error < 1e-9)."""
    if not 0.5 < probability < 1 or df < 1:
        raise ValueError(f"need 0.5 < probability < 1 and df >= 1, got {probability}, {df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, n: int = 4000) -> float:
        f = lambda u: math.exp(log_c - (df + 1) / 2 * math.log1p(u * u / df))  # noqa: E731
        h = x / n
        inner = sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
        return 0.5 + h / 3 * (f(0.0) + inner + f(x))

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        low, high = high, 2 * high
    while high - low > 1e-10 * max(1.0, high):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def paired_difference(arm, reference, confidence: float = 0.95) -> dict:
    """The paired difference arm - reference over matched runs (same seeds, same data): mean,
    sample std, and the t-interval mean +- t_{(1+confidence)/2, n-1} std / sqrt(n). arm and
    reference: equal-length lists of numbers, entry i of both from run i. With n = 1 the interval
    is undefined (None)."""
    arm, reference = [float(v) for v in arm], [float(v) for v in reference]
    if len(arm) != len(reference) or not arm:
        raise ValueError(f"need two non-empty lists of equal length (paired runs), got {len(arm)} and {len(reference)}")
    summary = mean_std([a - r for a, r in zip(arm, reference)])
    n = summary["n"]
    half = t_quantile((1 + confidence) / 2, n - 1) * summary["std"] / math.sqrt(n) if n > 1 else None
    return dict(summary, confidence=confidence,
                ci=None if half is None else [summary["mean"] - half, summary["mean"] + half])


def format_mean_std(mean: float, std: float) -> str:
    """"mean +- std" with no more digits than the std supports: the std rounded to its leading
    digit (two when that digit is 1, so 0.14 stays 0.14 rather than 0.1), the mean to the same
    decimal place. format_mean_std(0.8347, 0.0213) == "0.83 +- 0.02"; a zero std prints the mean
    to 3 significant digits."""
    if not (math.isfinite(mean) and math.isfinite(std)) or std < 0:
        raise ValueError(f"need a finite mean and a finite std >= 0, got {mean}, {std}")
    if std == 0:
        return f"{mean:.3g} +- 0"
    place = math.floor(math.log10(std))  # the decimal place of the leading digit
    if round(std / 10 ** place) == 1:
        place -= 1
    if round(std, -place) >= 10 ** (place + 1) and round(std / 10 ** (place + 1)) != 1:  # 0.096 -> 0.1
        place += 1
    decimals = max(0, -place)
    return f"{round(mean, -place):.{decimals}f} +- {round(std, -place):.{decimals}f}"


def training_device(device) -> torch.device:
    """The device an experiment trains on: "cpu" or "cuda" (a clear error for anything else, or for
    "cuda" where torch sees no GPU)."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda asked for, but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    return device


def in_processes(worker, jobs_list: list, processes: int) -> list:
    """[worker(job) for job in jobs_list], in that order, computed in `processes` spawned processes (a
    fresh interpreter each: no CUDA state is inherited; `worker` must be a module-level function)."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(min(processes, len(jobs_list)),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(worker, jobs_list))


def environment(device: str = "cpu") -> dict:
    """The machine, versions and device a result came from (the GPU's name when device is CUDA)."""
    env = dict(python=sys.version.split()[0], torch=torch.__version__, platform=platform.platform(),
               processor=platform.processor() or platform.machine(), torch_threads=torch.get_num_threads(),
               cpu_count=os.cpu_count(), device=str(device))
    if torch.device(device).type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(torch.device(device)), cuda=torch.version.cuda)
    return env


def save_result(name: str, question: str, config: dict, seeds, results: dict, started: float,
                out_dir: Path | None, device: str = "cpu") -> dict:
    """The JSON of one experiment (returned; also written to out_dir/NAME.json unless out_dir is None)."""
    payload = dict(experiment=name, question=question, command=f"python -m dsa_tutorial.experiments {name}",
                   seeds=list(seeds), config=config, environment=environment(device),
                   seconds=round(time.perf_counter() - started, 1), results=results)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    return payload
