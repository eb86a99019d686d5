"""The experiments of chapters 8 and 9, one function each: run(config, seeds, progress, use_cache) -> results.

Each returns a JSON-ready dict; `dsa_tutorial.experiments.run(name)` adds the seeds, the
configuration, the versions and the wall time and writes book/data/NAME.json.
"""
from __future__ import annotations

import copy
import time

import torch

from .. import cost
from ..config import ModelArgs
from ..indexer import index_scores
from ..mla import causal_mask
from ..sparse_attention import sparse_mla_attention
from ..topk import select_topk
from ..train import TinyLM, evaluate, pretrain_dense, progress_bar, sparse_training
from .common import eval_batch, make_model, mean_std, model_args, task_of, warmed_model
from .leak import RepeatedSequence, half_accuracies
from .mha import MHADSAttention
from .selectors import selector_comparison  # the selectors experiment, in its own file

__all__ = ["warmup", "weights", "mha_vs_mla", "topk_length", "indexer_cost", "indexer_size", "leak",
           "selector_comparison"]


def _key(k) -> str:
    """The JSON key of a budget: "dense" for None, else the number."""
    return "dense" if k is None else str(k)


def _summary(per_seed: list[dict], path: tuple) -> dict:
    """mean_std of per_seed[i][path[0]][path[1]]... over the seeds."""
    values = []
    for entry in per_seed:
        for key in path:
            entry = entry[key]
        values.append(entry)
    return mean_std(values)


def _lengths(config, lengths) -> tuple:
    """The lengths the configuration's RoPE tables cover (all of them at full size)."""
    return tuple(L for L in lengths if L <= config["args"]["max_seq_len"])


def _evaluate_grid(model, config, lengths, topks) -> dict:
    """{length: {k or 'dense': {accuracy, recall_answer}}} with k capped below the length."""
    out = {}
    for length in lengths:
        ks = tuple(k for k in topks if k is None or k < length)
        out[str(length)] = {str(k): v for k, v in evaluate(model, task_of(config), topks=ks,
                                                            **eval_batch(config, length)).items()}
    return out


# ----------------------------------------------------------------------------- (a) the two stages

def warmup(config, seeds, progress=True, use_cache=True) -> dict:
    """Dense warm-up (KL and recall against steps), then a short sparse stage (k = index_topk)."""
    topk = config["args"]["index_topk"]
    per_seed = []
    for seed in seeds:
        model, base_hist, warm_hist = warmed_model("mla", config, seed, use_cache=use_cache, progress=progress)
        before = _evaluate_grid(model, config, (64, 256), (None, topk))
        sparse_model = copy.deepcopy(model)
        sparse_hist = sparse_training(sparse_model, task_of(config), steps=config["warmup"]["steps"] // 2,
                                      length=config["warmup"]["length"], batch=config["warmup"]["batch"], topk=topk,
                                      seed=200 + seed, progress=progress, log_every=5).as_dict()
        after = _evaluate_grid(sparse_model, config, (64, 256), (None, topk))
        per_seed.append(dict(seed=seed, pretrain=base_hist, warmup=warm_hist, sparse=sparse_hist,
                             eval_after_warmup=before, eval_after_sparse=after))
    summary = dict(
        final_kl=mean_std([s["warmup"]["metrics"]["kl"][-1] for s in per_seed]),
        first_kl=mean_std([s["warmup"]["metrics"]["kl"][0] for s in per_seed]),
        final_recall_answer=mean_std([s["warmup"]["metrics"]["recall_answer"][-1] for s in per_seed]),
        first_recall_answer=mean_std([s["warmup"]["metrics"]["recall_answer"][0] for s in per_seed]),
        final_recall=mean_std([s["warmup"]["metrics"]["recall"][-1] for s in per_seed]),
        pretrain_accuracy_64=_summary(per_seed, ("eval_after_warmup", "64", "dense", "accuracy")),
        sparse_accuracy_after_warmup={L: _summary(per_seed, ("eval_after_warmup", L, str(topk), "accuracy"))
                                      for L in ("64", "256")},
        sparse_accuracy_after_sparse_stage={L: _summary(per_seed, ("eval_after_sparse", L, str(topk), "accuracy"))
                                            for L in ("64", "256")},
        dense_accuracy_256=_summary(per_seed, ("eval_after_warmup", "256", "dense", "accuracy")),
    )
    return dict(topk=topk, per_seed=per_seed, summary=summary)


# ----------------------------------------------------------------------------- (b) is w^I needed?

def weights(config, seeds, progress=True, use_cache=True) -> dict:
    """Learned w^I_t,j (weights_proj) against uniform weights, same warm-up."""
    lengths, topks = _lengths(config, (64, 256)), (2, 8)
    per_seed = []
    for seed in seeds:
        entry = dict(seed=seed)
        for weights_kind in ("learned", "uniform"):
            model, _, hist = warmed_model("mla", config, seed, weights_kind, use_cache=use_cache, progress=progress)
            entry[weights_kind] = dict(kl=hist["metrics"]["kl"], recall_answer=hist["metrics"]["recall_answer"],
                                       steps=hist["steps"], eval=_evaluate_grid(model, config, lengths, topks))
        per_seed.append(entry)
    summary = {}
    for weights_kind in ("learned", "uniform"):
        summary[weights_kind] = dict(
            final_kl=mean_std([s[weights_kind]["kl"][-1] for s in per_seed]),
            **{f"accuracy_L{L}_k{k}": _summary(per_seed, (weights_kind, "eval", str(L), str(k), "accuracy"))
               for L in lengths for k in topks},
            **{f"recall_L{L}_k{k}": _summary(per_seed, (weights_kind, "eval", str(L), str(k), "recall_answer"))
               for L in lengths for k in topks})
    return dict(lengths=list(lengths), topks=list(topks), per_seed=per_seed, summary=summary)


# ----------------------------------------------------------------------------- (c) DSA on MHA

def _cache_values_per_token(args: ModelArgs, kind: str) -> int:
    """Values cached per token and layer: the attention's keys and values plus the indexer key."""
    attention = args.latent_dim if kind == "mla" else args.n_heads * (args.qk_head_dim + args.v_head_dim)
    return attention + args.index_head_dim


SOLVED = 0.9  # a base model counts when its dense accuracy at the training length reaches this


def mha_vs_mla(config, seeds, progress=True, use_cache=True) -> dict:
    """The same indexer, warm-up and top-k on MLA (the book's DSAttention) and on classic MHA.

    Comparing DSA against its dense parent needs a parent that solved the task: a seed whose dense
    model reaches less than SOLVED accuracy at the training length is reported but left out of the
    summary (the rule is applied to both kinds alike; default seeds 0-3 leave at least 3)."""
    lengths, topks = _lengths(config, (64, 256, 1024)), (None, 2, 8, 32)
    train_length = str(config["pretrain"]["length"])
    per_seed = []
    for seed in seeds:
        entry = dict(seed=seed)
        for kind in ("mla", "mha"):
            model, base_hist, hist = warmed_model(kind, config, seed, use_cache=use_cache, progress=progress)
            grid = _evaluate_grid(model, config, sorted(set(lengths) | {int(train_length)}), topks)
            entry[kind] = dict(pretrain_seconds=base_hist["seconds"], warmup_seconds=hist["seconds"],
                               final_kl=hist["metrics"]["kl"][-1], eval=grid,
                               solved=grid[train_length]["dense"]["accuracy"] >= SOLVED)
        per_seed.append(entry)
    args = model_args(config)
    models = {kind: make_model(kind, config, 0) for kind in ("mla", "mha")}
    structure = {kind: dict(parameters=sum(p.numel() for p in m.parameters()),
                            cache_values_per_token_tiny=_cache_values_per_token(args, kind),
                            cache_values_per_token_v32=_cache_values_per_token(ModelArgs(), kind))
                 for kind, m in models.items()}
    summary, counted = {}, {}
    for kind in ("mla", "mha"):
        solved = [s for s in per_seed if s[kind]["solved"]]
        counted[kind] = [s["seed"] for s in solved]
        if not solved:  # possible at smoke size: nothing to summarise
            summary[kind] = None
            continue
        summary[kind] = {f"accuracy_L{L}_k{_key(k)}": _summary(solved, (kind, "eval", str(L), _key(k), "accuracy"))
                         for L in lengths for k in topks if k is None or k < L}
        summary[kind]["final_kl"] = mean_std([s[kind]["final_kl"] for s in solved])
        summary[kind].update({f"recall_L{L}_k{k}": _summary(solved, (kind, "eval", str(L), str(k), "recall_answer"))
                              for L in lengths for k in topks if k is not None and k < L})
    return dict(lengths=list(lengths), topks=[_key(k) for k in topks], structure=structure, solved_threshold=SOLVED,
                summarised_seeds=counted, per_seed=per_seed, summary=summary)


# ----------------------------------------------------------------------------- (d) k against length

def topk_length(config, seeds, progress=True, use_cache=True) -> dict:
    """Task accuracy and recalled attention mass for each budget k at each length (dense warm-up only)."""
    lengths, topks = _lengths(config, (64, 128, 256, 512, 1024)), (None, 2, 4, 8, 16, 32, 64)
    per_seed = []
    for seed in seeds:
        model, _, _ = warmed_model("mla", config, seed, use_cache=use_cache, progress=progress)
        per_seed.append(dict(seed=seed, eval=_evaluate_grid(model, config, lengths, topks)))
    summary = {str(L): {_key(k): dict(accuracy=_summary(per_seed, ("eval", str(L), _key(k), "accuracy")),
                                       recall_answer=_summary(per_seed, ("eval", str(L), _key(k), "recall_answer")))
                        for k in topks if k is None or k < L} for L in lengths}
    return dict(lengths=list(lengths), topks=[_key(k) for k in topks], per_seed=per_seed, summary=summary,
                eval_sizes={str(L): eval_batch(config, L) for L in lengths})


# ----------------------------------------------------------------------------- (e) indexer cost

COST_ARGS = dict(n_heads=8, kv_lora_rank=64, qk_rope_head_dim=16, index_n_heads=4, index_head_dim=32)


def _median_seconds(fn, repeats: int) -> list[float]:
    fn()  # warm-up call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def indexer_cost(config, seeds, progress=True, use_cache=True) -> dict:
    """FLOPs of the indexer and of MLA (V3.2 dimensions, from `cost`), and CPU seconds of the
    float32 references at a small configuration. Timings depend on the machine."""
    v32 = ModelArgs()
    flops = []
    for length in (4096, 8192, 16384, 32768, 65536, 131072):
        flops.append(dict(length=length, indexer=cost.indexer_flops(v32, length),
                          mla_dense=cost.mla_attention_flops(v32, length),
                          mla_sparse=cost.mla_attention_flops(v32, length, v32.index_topk)))
    small = ModelArgs.tiny(**COST_ARGS, max_seq_len=4096, original_seq_len=4096, index_topk=64)
    timings = []
    lengths = (256, 512, 1024, 2048) if config["args"]["max_seq_len"] >= 1024 else (128, 256)
    for length in progress_bar(lengths, len(lengths), "timing", progress):
        gen = torch.Generator().manual_seed(length)
        rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
        q_idx, w, k_idx = rand(length, small.index_n_heads, small.index_head_dim), rand(length, small.index_n_heads), \
            rand(length, small.index_head_dim)
        q_abs, q_rope = rand(1, length, small.n_heads, small.kv_lora_rank), rand(1, length, small.n_heads,
                                                                                small.qk_rope_head_dim)
        c_kv, k_rope = rand(1, length, small.kv_lora_rank), rand(1, length, small.qk_rope_head_dim)
        logits = index_scores(q_idx, w, k_idx)
        indices = select_topk(logits + causal_mask(length, length), small.index_topk)[None]

        def dense_attention():
            scores = torch.einsum("bthc,bsc->bths", q_abs, c_kv) + torch.einsum("bthr,bsr->bths", q_rope, k_rope)
            p = torch.softmax(scores * small.softmax_scale + causal_mask(length, length)[:, None, :], dim=-1)
            return torch.einsum("bths,bsc->bthc", p, c_kv)

        repeats = len(seeds)
        timings.append(dict(
            length=length,
            index_scores=_median_seconds(lambda: index_scores(q_idx, w, k_idx), repeats),
            select_topk=_median_seconds(lambda: select_topk(logits, small.index_topk), repeats),
            dense_mla=_median_seconds(dense_attention, repeats),
            sparse_mla=_median_seconds(lambda: sparse_mla_attention(q_abs, q_rope, c_kv, k_rope, indices,
                                                                    small.softmax_scale), repeats),
            flops_index_scores=2 * small.index_n_heads * small.index_head_dim * length * length,
            flops_dense_mla=2 * small.n_heads * (small.latent_dim + small.kv_lora_rank) * length * length,
        ))
    return dict(v32_flops=flops, small_args=COST_ARGS | dict(index_topk=64), timings=timings,
                timing_note="float32 references on CPU, batch 1, every (t, s) pair scored (no causal skipping); "
                            "machine-dependent", repeats=len(seeds))


# ----------------------------------------------------------------------------- (f) indexer size

SIZES = [dict(index_n_heads=h, index_head_dim=16) for h in (1, 2, 4, 8)] + \
        [dict(index_n_heads=4, index_head_dim=d) for d in (8, 32)]


def indexer_size(config, seeds, progress=True, use_cache=True) -> dict:
    """Warm-up KL, recall and sparse accuracy for indexers of H_I heads of d_I dims."""
    topk = config["args"]["index_topk"]
    lengths = _lengths(config, (64, 256))
    results = []
    for size in SIZES:
        overrides = {} if size == dict(index_n_heads=4, index_head_dim=16) else size  # the default: shared cache
        per_seed = []
        for seed in seeds:
            model, _, hist = warmed_model("mla", config, seed, use_cache=use_cache, progress=progress, **overrides)
            per_seed.append(dict(seed=seed, final_kl=hist["metrics"]["kl"][-1], kl=hist["metrics"]["kl"],
                                 eval=_evaluate_grid(model, config, lengths, (2, topk))))
        results.append(dict(
            **size, flops_per_pair=2 * size["index_n_heads"] * size["index_head_dim"],
            parameters=sum(p.numel() for p in model.layers[0].attn.indexer.parameters()), per_seed=per_seed,
            final_kl=mean_std([s["final_kl"] for s in per_seed]),
            **{f"accuracy_L{L}_k{k}": _summary(per_seed, ("eval", str(L), str(k), "accuracy"))
               for L in lengths for k in (2, topk)},
            **{f"recall_L{L}_k{k}": _summary(per_seed, ("eval", str(L), str(k), "recall_answer"))
               for L in lengths for k in (2, topk)}))
    return dict(topk=topk, lengths=list(lengths), sizes=results)


# ----------------------------------------------------------------------------- the leak

LEAK = dict(vocab=16, length=64, topk=32, steps=200, batch=16, lr=1e-2)


def leak(config, seeds, progress=True, use_cache=True, sizes: dict | None = None) -> dict:
    """Dense, DSA and DSA without re-masking, trained on `RepeatedSequence`; next-token accuracy per half."""
    sizes = dict(LEAK, **(sizes or {}))
    task = RepeatedSequence(sizes["vocab"])
    args = ModelArgs.tiny(max_seq_len=sizes["length"], original_seq_len=sizes["length"], index_topk=sizes["topk"])
    per_seed = []
    for seed in seeds:
        entry = dict(seed=seed)
        for variant in ("dense", "dsa", "dsa_leaky"):
            torch.manual_seed(seed)
            model = TinyLM(args, task.vocab_size, 1, lambda a: MHADSAttention(a, causal_after_topk=variant != "dsa_leaky"))
            common = dict(steps=sizes["steps"], length=sizes["length"], batch=sizes["batch"], seed=seed,
                          progress=progress)
            if variant == "dense":
                hist = pretrain_dense(model, task, lr=sizes["lr"], **common)
                topk = None
            else:
                hist = sparse_training(model, task, topk=sizes["topk"], lr_main=sizes["lr"], **common)
                topk = sizes["topk"]
            tokens, targets, _ = task.sample(64, sizes["length"], torch.Generator().manual_seed(999))
            with torch.no_grad():
                model.eval()
                entry[variant] = dict(accuracy=half_accuracies(model(tokens, topk=topk)[0], targets),
                                      seconds=hist.seconds)
                if variant == "dsa_leaky":  # the same weights, evaluated with the causal mask restored
                    model.layers[0].attn.causal_after_topk = True
                    entry[variant]["accuracy_remasked"] = half_accuracies(model(tokens, topk=topk)[0], targets)
        per_seed.append(entry)
    summary = {f"{variant}_{half}": _summary(per_seed, (variant, "accuracy", half))
               for variant in ("dense", "dsa", "dsa_leaky") for half in ("first_half", "second_half", "all")}
    summary.update({f"dsa_leaky_remasked_{half}": _summary(per_seed, ("dsa_leaky", "accuracy_remasked", half))
                    for half in ("first_half", "second_half", "all")})
    return dict(sizes=sizes, chance=1 / sizes["vocab"], per_seed=per_seed, summary=summary)
