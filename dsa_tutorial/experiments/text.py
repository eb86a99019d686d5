"""Real text: a byte-level language model on the Python standard library, dense against DSA
(`python -m dsa_tutorial.experiments text`).

Every other experiment of chapters 8 and 9 is the synthetic key-value task. This one trains the
book's DSA layer (`TinyLM` around MLA + the lightning indexer) on real text and asks what top-k
selection costs in validation loss, at k = 16 ... 256 of a 1024-byte context.

The corpus (`load_corpus`): the ``*.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), without site-packages and without any file below a folder
named ``test``, ``tests`` or ``idle_test``, each read as bytes, in the order of their relative
paths (POSIX form, sorted). The split is fixed by the path alone: a file goes to validation when
``int(sha256(relative path).hexdigest(), 16) % 10 == 0``, else to training, so the two sets are
disjoint whole files and the same on every machine for the same Python version (the standard
library differs across versions: the JSON records the version, the file and byte counts and the
sha256 of each stream). Each split is the concatenation of its files; tokens are bytes (a
vocabulary of 256), so the loss in bits per byte needs no tokenizer to compare.

The stages are the book's (`train.py`): dense pre-training (`pretrain_dense`), then the dense
warm-up of a fresh indexer with the KL loss to the main attention, everything else frozen
(`dense_warmup`), once with learned w^I and once with uniform w^I (`common.UniformWeights`) from
the same dense model, then a short sparse stage at k = index_topk (`sparse_training`). Each model
is evaluated on the same fixed validation windows: bits per byte with dense attention and at each
k, and the attention mass that the indexer's top-k recalls per layer (`train.topk_recall` on the
dense pass). Every comparison is paired: per seed, all arms share the dense model, the data and the
validation windows.

On a GPU the reference sparse attention's gather (k latents per query: B T k d_c values, and a
scatter-add of as many in the backward pass) dominates training at T = 1024; `MaskedDSAttention`
computes the same layer as dense attention with the scores set to -inf outside S_t (the identity
`sparse_attention` states; the tests check that it matches `DSAttention` to rounding).

Sizes (TEXT_CONFIG): 4 layers, d = 128, about 0.77 M parameters, windows of 1024 bytes, 16 a step;
1500 pre-training steps (24.6 M bytes: about 2.7 passes over the 9.1 MB training stream of Python 3.12's
library, 2.3 over 3.11's 10.8 MB), 300 warm-up steps per w^I, 300 sparse steps; 128 validation windows;
5 seeds (in parallel processes with `jobs`), float32 throughout. Made
for one GPU (``--device cuda``: minutes); on a 2-core CPU a pre-training step alone takes about 30 s.
`--smoke` (TEXT_SMOKE) runs the same code on 200 KB of each split with a 2-layer d = 32 model on
64-byte windows, in seconds on a CPU. Per seed s: the dense model is initialised and its batches
drawn with s, the indexers with 1000 + s and their warm-up batches with 100 + s (the same for both
w^I), the sparse stage's batches with 200 + s.
"""
from __future__ import annotations

import copy
import hashlib
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ..config import ModelArgs
from ..topk import select_topk
from ..train import TinyLM, dense_warmup, pretrain_dense, sparse_training, topk_recall
from .common import (MaskedDSAttention, Settings, UniformWeights, _cached, in_processes, mean_std, paired_difference,
                     save_result, training_device)

__all__ = ["EXCLUDED_DIRS", "TEXT_CONFIG", "TEXT_SMOKE", "stdlib_root", "is_validation", "corpus_paths",
           "ByteCorpus", "load_corpus", "ByteStream", "MaskedDSAttention", "make_text_model", "validation_windows",
           "evaluate_text", "text_lm", "summarize", "merge", "QUESTION", "run"]

VOCAB = 256  # bytes
EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages")
LN2 = math.log(2.0)


def _text_args(**overrides) -> dict:
    """ModelArgs of the text model: d = 128, 4 heads, latent d_c = 64, indexer 4 heads of d_I = 32,
    RoPE over 1024 positions without YaRN (max_seq_len = original_seq_len)."""
    args = ModelArgs.tiny(dim=128, n_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                          qk_rope_head_dim=16, v_head_dim=32, index_n_heads=4, index_head_dim=32, index_topk=64,
                          max_seq_len=1024, original_seq_len=1024)
    return asdict(replace(args, **overrides))


TEXT_CONFIG = Settings(
    args=_text_args(),
    n_layers=4,
    corpus=dict(max_bytes=None),  # whole splits
    pretrain=dict(steps=1500, length=1024, batch=16, lr=3e-3),
    warmup=dict(steps=300, length=1024, batch=16, lr=1e-3, topk=64),
    sparse=dict(steps=300, length=1024, batch=16, topk=64, lr_main=3e-4, lr_indexer=1e-3),
    eval=dict(length=1024, windows=128, batch=16),
    topks=[16, 32, 64, 128, 256],
    threads=1,
)
# the same code at a size of seconds on a CPU (tests, CI): a slice of each split, a 2-layer d = 32 model
TEXT_SMOKE = Settings({
    **TEXT_CONFIG,
    "args": _text_args(dim=32, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                       v_head_dim=8, index_n_heads=2, index_head_dim=16, index_topk=8, max_seq_len=64,
                       original_seq_len=64),
    "n_layers": 2,
    "corpus": dict(max_bytes=200_000),
    "pretrain": dict(steps=120, length=64, batch=8, lr=1e-2),
    "warmup": dict(steps=15, length=64, batch=8, lr=1e-3, topk=8),
    "sparse": dict(steps=10, length=64, batch=8, topk=8, lr_main=3e-4, lr_indexer=1e-3),
    "eval": dict(length=64, windows=32, batch=16),
    "topks": [4, 8, 16],
})


# ----------------------------------------------------------------------------- the corpus

def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative_path: str) -> bool:
    """The fixed split: validation when sha256 of the POSIX relative path, as an integer, is 0 mod 10."""
    return int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest(), 16) % 10 == 0


def corpus_paths(root: Path | None = None) -> list[str]:
    """The corpus files: POSIX paths relative to `root` (default the standard library) of every
    ``*.py`` file not below a folder named in EXCLUDED_DIRS, sorted."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no standard library folder at {root}")
    paths = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if path.is_file() and not set(relative.parts[:-1]) & set(EXCLUDED_DIRS):
            paths.append(relative.as_posix())
    return sorted(paths)


@dataclass
class ByteCorpus:
    """The two byte streams, uint8 on the CPU, and where each file lies in its stream.

    files[split] lists (relative path, start, end): stream[start:end] are the file's bytes."""

    train: torch.Tensor
    valid: torch.Tensor
    files: dict = field(default_factory=dict)
    description: dict = field(default_factory=dict)

    def stream(self, split: str) -> torch.Tensor:
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        return self.train if split == "train" else self.valid


def load_corpus(root: Path | None = None, max_bytes: int | None = None) -> ByteCorpus:
    """Read the corpus, split it by `is_validation`, and concatenate each split's files in path order.

    `max_bytes` keeps only the first max_bytes bytes of each stream (the smoke size); None keeps all.
    """
    root = stdlib_root() if root is None else Path(root)
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    chunks = {"train": [], "valid": []}
    files = {"train": [], "valid": []}
    offset = {"train": 0, "valid": 0}
    for relative in corpus_paths(root):
        split = "valid" if is_validation(relative) else "train"
        data = (root / relative).read_bytes()
        chunks[split].append(data)
        files[split].append((relative, offset[split], offset[split] + len(data)))
        offset[split] += len(data)
    streams = {}
    description = dict(
        source="Python standard library *.py files", stdlib=str(root), python=sys.version.split()[0],
        excluded_dirs=list(EXCLUDED_DIRS),
        split="validation iff int(sha256(relative POSIX path).hexdigest(), 16) % 10 == 0; files concatenated in "
              "sorted path order; tokens are bytes (vocabulary 256)",
        max_bytes=max_bytes)
    for split in ("train", "valid"):
        if not chunks[split]:
            raise ValueError(f"the corpus at {root} has no {split} files")
        raw = b"".join(chunks[split])
        description[f"{split}_files"] = len(files[split])
        description[f"{split}_bytes"] = len(raw)
        description[f"{split}_sha256"] = hashlib.sha256(raw).hexdigest()
        if max_bytes is not None:
            raw = raw[:max_bytes]
        description[f"{split}_bytes_used"] = len(raw)
        streams[split] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return ByteCorpus(streams["train"], streams["valid"], files, description)


@dataclass(frozen=True)
class ByteStream:
    """Random windows of one byte stream, in the form the stages of `train.py` read a task:
    ``batches(batch, length, seed)`` yields (tokens, targets, mask) int64 [B, T], int64 [B, T]
    (the next byte) and bool [B, T] (all True: every byte is scored), on `device`. The windows are
    drawn on the CPU with a seeded torch.Generator, so the data do not depend on the device."""

    data: torch.Tensor
    device: str = "cpu"

    @property
    def vocab_size(self) -> int:
        return VOCAB

    def sample(self, batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        if batch <= 0 or not 0 < length < self.data.numel() - 1:
            raise ValueError(f"need batch > 0 and 0 < length < {self.data.numel() - 1}, got {batch}, {length}")
        starts = torch.randint(self.data.numel() - length, (batch,), generator=generator)
        windows = self.data[starts[:, None] + torch.arange(length + 1)].long()  # [B, T + 1]
        tokens, targets = windows[:, :-1], windows[:, 1:]
        mask = torch.ones(batch, length, dtype=torch.bool)
        return tuple(x.to(self.device, non_blocking=True) for x in (tokens, targets, mask))

    def batches(self, batch: int, length: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch, length, generator)


def validation_windows(valid: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """`count` windows of length + 1 bytes at evenly spaced starts over the validation stream
    (fixed: every arm and seed is scored on the same bytes). int64 [count, length + 1] on the CPU."""
    if count <= 0 or valid.numel() < length + 1:
        raise ValueError(f"need count > 0 and a stream of at least {length + 1} bytes, got {count}, {valid.numel()}")
    starts = torch.linspace(0, valid.numel() - length - 1, count).round().long()
    return valid[starts[:, None] + torch.arange(length + 1)].long()


# ----------------------------------------------------------------------------- the layer and the model

def make_text_model(config: dict, seed: int, weights: str = "learned", device="cpu") -> TinyLM:
    """A freshly initialised byte-level TinyLM (seeded, built on the CPU, then moved to `device`);
    weights "uniform" replaces every indexer's weights_proj by `common.UniformWeights`."""
    if weights not in ("learned", "uniform"):
        raise ValueError(f"weights must be 'learned' or 'uniform', got {weights!r}")
    torch.manual_seed(seed)
    args = ModelArgs(**config["args"])
    model = TinyLM(args, VOCAB, config["n_layers"], MaskedDSAttention)
    if weights == "uniform":
        for layer in model.layers:
            layer.attn.indexer.weights_proj = UniformWeights(args.index_n_heads)
    return model.to(device)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_text(model: TinyLM, windows: torch.Tensor, topks, batch: int) -> dict:
    """Validation loss of `model` on `windows` [N, T + 1] (bytes), dense and at each k of `topks`.

    Returns {"bits_per_byte": {"dense" or "k": bits}, "bits_per_byte_second_half": {...} (only the
    targets at positions t >= T/2, where every query sees at least T/2 bytes), "recall": {"k": [per
    layer]}}: the mass of each layer's dense attention (summed over heads, `train.topk_recall`) that
    the indexer's top-k set holds, on the dense pass (1 means top-k attention reads all the layer
    attends to)."""
    model.eval()
    device = next(model.parameters()).device
    length = windows.shape[1] - 1
    arms = [None] + [k for k in topks]
    nats = {k: torch.zeros(length, device=device, dtype=torch.float64) for k in arms}  # summed over windows
    recall = {k: torch.zeros(len(model.layers), device=device, dtype=torch.float64) for k in topks}
    for first in range(0, windows.shape[0], batch):
        chunk = windows[first:first + batch].to(device)
        tokens, targets = chunk[:, :-1], chunk[:, 1:]
        for k in arms:
            logits, auxes = model(tokens, topk=k)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            nats[k] += loss.view(targets.shape).double().sum(0)
            if k is None:
                for j in topks:
                    per_layer = [topk_recall(a["attn_probs"], select_topk(a["index_scores"].float(), min(j, length)))
                                 for a in auxes]
                    recall[j] += torch.stack(per_layer).double() * chunk.shape[0]
    model.train()
    n = windows.shape[0]
    key = lambda k: "dense" if k is None else str(k)  # noqa: E731
    per_position = {k: (v / n / LN2).cpu() for k, v in nats.items()}  # bits at each position, mean over windows
    return dict(bits_per_byte={key(k): float(v.mean()) for k, v in per_position.items()},
                bits_per_byte_second_half={key(k): float(v[length // 2:].mean()) for k, v in per_position.items()},
                recall={str(k): (v / n).cpu().tolist() for k, v in recall.items()})


# ----------------------------------------------------------------------------- the experiment

QUESTION = ("Real text: what does top-k selection cost a byte-level model of Python source, at k = 16 ... 256 "
            "of 1024 bytes? Validation bits per byte dense against DSA, the attention mass the indexer recalls "
            "per layer, learned against uniform w^I, and a short sparse stage.")


def _base_model(config, corpus: ByteCorpus, seed: int, device, use_cache: bool, progress: bool):
    """Stage 0, dense pre-training on the training stream. -> (model, history)"""
    payload = dict(stage="text-pretrain", seed=seed, torch=torch.__version__, device=str(device),
                   corpus=corpus.description, **{key: config[key] for key in ("args", "n_layers", "pretrain")})

    def build(train: bool):
        model = make_text_model(config, seed, device=device)
        if not train:
            return model, None
        history = pretrain_dense(model, ByteStream(corpus.train, str(device)), seed=seed, progress=progress,
                                 log_every=max(1, config["pretrain"]["steps"] // 30), **config["pretrain"])
        return model, history.as_dict()

    return _cached(f"text-pretrain-seed{seed}", payload, build, use_cache)


def _warmed_model(config, corpus: ByteCorpus, base: TinyLM, seed: int, weights: str, device, use_cache: bool,
                  progress: bool):
    """Stage 1: the dense model with a fresh indexer (learned or uniform w^I), dense warm-up. -> (model, history)"""
    payload = dict(stage="text-warmup", seed=seed, weights=weights, torch=torch.__version__, device=str(device),
                   corpus=corpus.description,
                   **{key: config[key] for key in ("args", "n_layers", "pretrain", "warmup")})

    def build(train: bool):
        # the same indexer initialisation for both weights (uniform only drops weights_proj)
        model = make_text_model(config, 1000 + seed, weights, device=device)
        main = {name: p for name, p in base.state_dict().items() if ".indexer." not in name}
        missing, unexpected = model.load_state_dict(main, strict=False)
        assert not unexpected and all(".indexer." in name for name in missing), (missing, unexpected)
        if not train:
            return model, None
        history = dense_warmup(model, ByteStream(corpus.train, str(device)), seed=100 + seed, progress=progress,
                               log_every=max(1, config["warmup"]["steps"] // 20), **config["warmup"])
        return model, history.as_dict()

    return _cached(f"text-warmup-{weights}-seed{seed}", payload, build, use_cache)


def _seed_run(config, seed: int, device, use_cache: bool, progress: bool) -> dict:
    """Every stage and evaluation of one seed (see the module docstring). -> the seed's JSON-ready entry"""
    device = torch.device(device)
    corpus = load_corpus(max_bytes=config["corpus"]["max_bytes"])
    ev = config["eval"]
    windows = validation_windows(corpus.valid, ev["length"], ev["windows"])
    topks = [k for k in config["topks"] if k < ev["length"]]
    evaluate = lambda model: evaluate_text(model, windows, topks, ev["batch"])  # noqa: E731
    untrained = evaluate(make_text_model(config, seed, device=device))
    base, base_history = _base_model(config, corpus, seed, device, use_cache, progress)
    entry = dict(seed=seed, pretrain=base_history, untrained=untrained, warmup={}, eval={})
    warmed = {}
    for weights in ("learned", "uniform"):
        warmed[weights], entry["warmup"][weights] = _warmed_model(config, corpus, base, seed, weights, device,
                                                                  use_cache, progress)
        entry["eval"][weights] = evaluate(warmed[weights])
    if config["sparse"]["steps"] > 0:
        # stage 2 from the learned-w^I model (a copy: the warmed model stays as cached)
        sparse = copy.deepcopy(warmed["learned"])
        entry["sparse"] = sparse_training(
            sparse, ByteStream(corpus.train, str(device)), seed=200 + seed, progress=progress,
            log_every=max(1, config["sparse"]["steps"] // 20), **config["sparse"]).as_dict()
        entry["eval"]["sparse"] = evaluate(sparse)
    return entry


def _one_seed(job) -> dict:
    """One seed in a worker process: (config, seed, device, use_cache, threads)."""
    config, seed, device, use_cache, threads = job
    torch.set_num_threads(threads)
    return _seed_run(config, seed, device, use_cache, False)


def summarize(config, per_seed: list[dict]) -> dict:
    """Mean and std over the seeds, and the paired differences, from the per-seed entries."""
    topks = [k for k in config["topks"] if k < config["eval"]["length"]]
    arms = list(per_seed[0]["eval"])
    keys = ["dense"] + [str(k) for k in topks]
    n_layers = config["n_layers"]
    bits = lambda arm, key: [s["eval"][arm]["bits_per_byte"][key] for s in per_seed]  # noqa: E731
    return dict(
        untrained_bits_per_byte=mean_std([s["untrained"]["bits_per_byte"]["dense"] for s in per_seed]),
        bits_per_byte={arm: {key: mean_std([s["eval"][arm]["bits_per_byte"][key] for s in per_seed])
                             for key in keys} for arm in arms},
        bits_per_byte_second_half={arm: {key: mean_std([s["eval"][arm]["bits_per_byte_second_half"][key]
                                                        for s in per_seed]) for key in keys} for arm in arms},
        # paired per seed: DSA at k minus dense attention, same model and windows (t-interval over seeds)
        excess_bits_per_byte={arm: {str(k): paired_difference(bits(arm, str(k)), bits(arm, "dense")) for k in topks}
                              for arm in arms},
        # paired per seed: uniform w^I minus learned w^I at each k, same dense model, warm-up data and windows
        uniform_minus_learned={str(k): paired_difference(bits("uniform", str(k)), bits("learned", str(k)))
                               for k in topks},
        recall={arm: {str(k): [mean_std([s["eval"][arm]["recall"][str(k)][layer] for s in per_seed])
                               for layer in range(n_layers)] for k in topks} for arm in arms},
        final_warmup_kl={w: mean_std([s["warmup"][w]["metrics"]["kl"][-1] for s in per_seed])
                         for w in ("learned", "uniform")},
    )


def text_lm(config, seeds, progress: bool = True, use_cache: bool = True, device="cpu", jobs: int = 1) -> dict:
    """Dense against DSA on real text (see the module docstring). `config`: TEXT_CONFIG, TEXT_SMOKE
    or a variant of them; `device`: where the models train and run ("cpu", "cuda"); `jobs` > 1 runs
    the seeds in that many spawned processes. -> JSON-ready results."""
    if "corpus" not in config:
        raise ValueError("config must be a text configuration (TEXT_CONFIG, TEXT_SMOKE or a variant): "
                         "it has no 'corpus'")
    if jobs <= 1 or len(seeds) == 1:
        per_seed = [_seed_run(config, seed, device, use_cache, progress) for seed in seeds]
    else:
        per_seed = in_processes(_one_seed, [(dict(config), seed, str(device), use_cache, config["threads"])
                                            for seed in seeds], jobs)
    corpus = load_corpus(max_bytes=config["corpus"]["max_bytes"])
    return dict(corpus=corpus.description, precision="float32 throughout (no autocast)",
                topks=[k for k in config["topks"] if k < config["eval"]["length"]], arms=list(per_seed[0]["eval"]),
                per_seed=per_seed, summary=summarize(config, per_seed))


def merge(payloads: list[dict]) -> dict:
    """One payload from stored runs of disjoint seeds with the same configuration and corpus (seeds
    added to a stored run later): the per-seed entries in seed order, the summary recomputed, and
    where each seed came from (`merged_from`: the seeds, environment and wall time of each run)."""
    first = payloads[0]
    for other in payloads[1:]:
        for key in ("experiment", "question", "config"):
            if other[key] != first[key]:
                raise ValueError(f"runs to merge must have the same {key}")
        if other["results"]["corpus"] != first["results"]["corpus"]:
            raise ValueError("runs to merge must have read the same corpus (same Python standard library)")
    seeds = [seed for p in payloads for seed in p["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs to merge must have disjoint seeds, got {seeds}")
    per_seed = sorted((entry for p in payloads for entry in p["results"]["per_seed"]), key=lambda e: e["seed"])
    results = dict(first["results"], per_seed=per_seed, summary=summarize(first["config"], per_seed))
    return dict(first, seeds=sorted(seeds), seconds=round(sum(p["seconds"] for p in payloads), 1), results=results,
                merged_from=[dict(seeds=p["seeds"], environment=p["environment"], seconds=p["seconds"])
                             for p in payloads])


def run(name: str = "text", *, smoke: bool = False, out_dir=None, seeds=(0, 1, 2, 3, 4), progress: bool = True,
        use_cache: bool = True, device: str = "cpu", jobs: int = 1) -> dict:
    """The experiment at full size (TEXT_CONFIG) or smoke size (TEXT_SMOKE) on `device`; the JSON
    payload of `common.save_result` (written to out_dir/text.json unless out_dir is None)."""
    if name != "text":
        raise ValueError(f"this module runs the experiment 'text', got {name!r}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    device = training_device(device)
    config = TEXT_SMOKE if smoke else TEXT_CONFIG
    threads = torch.get_num_threads()
    torch.set_num_threads(config["threads"])
    try:
        started = time.perf_counter()
        results = text_lm(config, tuple(seeds), progress=progress, use_cache=use_cache and not smoke, device=device,
                          jobs=jobs)
        return save_result(name, QUESTION, dict(config, smoke=smoke), seeds, results, started, out_dir,
                           device=str(device))
    finally:
        torch.set_num_threads(threads)
