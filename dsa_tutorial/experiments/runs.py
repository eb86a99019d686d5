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
from ..train import TinyLM, evaluate, indexer_parameters, pretrain_dense, progress_bar, sparse_training
from .common import eval_batch, make_model, mean_std, model_args, paired_difference, task_of, warmed_model
from .leak import RepeatedSequence, half_accuracies, record_lr, weights_digest
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


# Research question 2's design, fixed before its runs with seeds 0-4 (see mha_vs_mla's docstring).
SPARSE_RATIO = 15  # sparse-stage steps per warm-up step: the report's 15,000 sparse after 1,000 warm-up steps
SOLVED = 0.9  # the secondary subset: seeds whose dense models (both kinds) reach this accuracy at the training length
PRIMARY = "sparse_gap_L256_k8"  # the primary comparison: its paired difference MLA - MHA


def _q2_metrics(arm: dict, lengths, topks) -> dict:
    """One run's numbers by name: {stage}_accuracy_L{L}_k{k or dense}, {stage}_recall_L{L}_k{k} for the
    stages warmup (the warmed model, its dense parent's accuracy as k = dense) and sparse (after the
    sparse stage), sparse_gap_L{L}_k{k} = sparse-stage accuracy at k minus the dense parent's at L,
    and the final indexer KL of each stage."""
    out = dict(warmup_final_kl=arm["final_kl"], sparse_final_kl=arm["sparse"]["metrics"]["kl"][-1])
    for stage in ("warmup", "sparse"):
        grid = arm[f"eval_{stage}"]
        for L in lengths:
            for k in (k for k in topks if k is None or k < L):
                out[f"{stage}_accuracy_L{L}_k{_key(k)}"] = grid[str(L)][_key(k)]["accuracy"]
                if k is not None:
                    out[f"{stage}_recall_L{L}_k{k}"] = grid[str(L)][str(k)]["recall_answer"]
    for L in lengths:
        for k in (k for k in topks if k is not None and k < L):
            out[f"sparse_gap_L{L}_k{k}"] = (arm["eval_sparse"][str(L)][str(k)]["accuracy"]
                                            - arm["eval_warmup"][str(L)]["dense"]["accuracy"])
    return out


def _q2_summary(per_seed: list[dict], lengths, topks) -> tuple[dict, dict]:
    """Per kind mean_std of every metric, and the paired difference MLA - MHA (same seeds) of each."""
    rows = {kind: [_q2_metrics(s[kind], lengths, topks) for s in per_seed] for kind in ("mla", "mha")}
    names = list(rows["mla"][0])
    summary = {kind: {name: mean_std([row[name] for row in rows[kind]]) for name in names} for kind in rows}
    paired = {name: paired_difference([row[name] for row in rows["mla"]], [row[name] for row in rows["mha"]])
              for name in names}
    return summary, paired


def mha_vs_mla(config, seeds, progress=True, use_cache=True, device="cpu") -> dict:
    """The same indexer, warm-up, sparse stage and top-k on MLA (the book's DSAttention) and on classic
    MHA (`mha.MHADSAttention`, whose indexer reads its own query latent c^Q as MLA's does).

    The design, fixed before the runs with seeds 0-4:

    * paired: run i of both kinds uses seed i for its initial weights and the same batches in the
      same order at every stage (pre-training: seed i, warm-up: 100 + i, sparse stage: 200 + i,
      evaluation: config eval seed); the paired difference MLA - MHA over seeds carries the
      comparison, with its 95% t-interval (`common.paired_difference`);
    * the stages: dense pre-training and dense warm-up as every experiment (`common.warmed_model`),
      then a sparse stage of SPARSE_RATIO x the warm-up's steps (3000 at full size) at k =
      index_topk, `train.sparse_training`'s learning rates; the report trains 15,000 sparse steps
      after 1,000 warm-up steps, and 15 : 1 here lets the main model adapt to its selection;
    * evaluated after the warm-up (the dense parent and its DSA) and after the sparse stage, at
      T = 64, 256, 1024 and k = 2, 8, 32 (`_q2_metrics` names every number);
    * primary comparison: PRIMARY, the accuracy DSA keeps against its own dense parent after the
      sparse stage at T = 256, k = 8 (so that the two kinds' different dense models do not enter
      it), its paired difference MLA - MHA;
    * every seed is reported and summarised: no seed is left out. Secondary, also fixed now: the same
      summary over the seeds whose dense models of both kinds reach SOLVED (0.9) accuracy at the
      training length (None when fewer than 3 seeds qualify).

    `device`: where the sparse stage and the evaluations run (the cached pre-training and warm-up run
    on the CPU); the models move there, and the training loops must put each batch on the model's device.
    """
    lengths, topks = _lengths(config, (64, 256, 1024)), (None, 2, 8, 32)
    train_length = config["pretrain"]["length"]
    warm = config["warmup"]
    sparse = dict(steps=SPARSE_RATIO * warm["steps"], length=warm["length"], batch=warm["batch"],
                  topk=config["args"]["index_topk"])
    per_seed = []
    for seed in seeds:
        entry = dict(seed=seed)
        for kind in ("mla", "mha"):
            model, base_hist, warm_hist = warmed_model(kind, config, seed, use_cache=use_cache, progress=progress)
            model = model.to(device)
            after_warmup = _evaluate_grid(model, config, sorted(set(lengths) | {train_length}), topks)
            sparse_hist = sparse_training(model, task_of(config), seed=200 + seed, progress=progress,
                                          log_every=max(1, sparse["steps"] // 60), **sparse).as_dict()
            entry[kind] = dict(
                data_seeds=dict(pretrain=base_hist["settings"]["seed"], warmup=warm_hist["settings"]["seed"],
                                sparse=sparse_hist["settings"]["seed"], eval=config["eval"]["seed"]),
                pretrain_seconds=base_hist["seconds"], warmup_seconds=warm_hist["seconds"],
                sparse_seconds=sparse_hist["seconds"], final_kl=warm_hist["metrics"]["kl"][-1],
                sparse=dict(steps=sparse_hist["steps"], metrics=sparse_hist["metrics"]),
                eval_warmup=after_warmup, eval_sparse=_evaluate_grid(model, config, lengths, topks),
                solved=after_warmup[str(train_length)]["dense"]["accuracy"] >= SOLVED)
        if entry["mla"]["data_seeds"] != entry["mha"]["data_seeds"]:
            raise AssertionError(f"seed {seed}: the two kinds saw different data {entry['mla']['data_seeds']}, "
                                 f"{entry['mha']['data_seeds']}")
        per_seed.append(entry)
    args = model_args(config)
    models = {kind: make_model(kind, config, 0) for kind in ("mla", "mha")}
    structure = {kind: dict(parameters=sum(p.numel() for p in m.parameters()),
                            indexer_parameters=sum(p.numel() for p in indexer_parameters(m)),
                            cache_values_per_token_tiny=_cache_values_per_token(args, kind),
                            cache_values_per_token_v32=_cache_values_per_token(ModelArgs(), kind))
                 for kind, m in models.items()}
    summary, paired = _q2_summary(per_seed, lengths, topks)
    solved_seeds = [s["seed"] for s in per_seed if s["mla"]["solved"] and s["mha"]["solved"]]
    summary_solved, paired_solved = (_q2_summary([s for s in per_seed if s["seed"] in solved_seeds], lengths, topks)
                                     if len(solved_seeds) >= 3 else (None, None))
    return dict(lengths=list(lengths), topks=[_key(k) for k in topks], sparse_stage=dict(sparse, ratio=SPARSE_RATIO),
                structure=structure, primary=PRIMARY, solved_threshold=SOLVED, per_seed=per_seed,
                summary=summary, paired=paired, solved_seeds=solved_seeds, summary_solved=summary_solved,
                paired_solved=paired_solved)


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
LEAK_ARMS = ("dense", "dense_constant", "dsa", "dsa_leaky")
# paired differences (first arm - second, same seeds) reported for every half
LEAK_PAIRS = (("dsa_leaky", "dsa"), ("dsa", "dense"), ("dsa", "dense_constant"), ("dense_constant", "dense"))


def leak(config, seeds, progress=True, use_cache=True, sizes: dict | None = None, device="cpu") -> dict:
    """Four arms trained on `RepeatedSequence` from the same initial weights (seeded) on the same batches;
    next-token accuracy per half.

    dense: `pretrain_dense` (AdamW, learning rate decayed to 0 along a cosine); dense_constant: dense
    attention (k = T) trained by `sparse_training`, the DSA arms' optimiser and constant learning rate (the
    schedule control); dsa and dsa_leaky (top-k without re-masking): `sparse_training` at k = topk. Each
    arm logs its main parameters' learning rate at every step (lr_main) and its initial weights'
    fingerprint; the summary holds mean_std per arm and half and the paired differences LEAK_PAIRS."""
    sizes = dict(LEAK, **(sizes or {}))
    task = RepeatedSequence(sizes["vocab"], device=str(device))  # batches on the device, the same data anywhere
    args = ModelArgs.tiny(max_seq_len=sizes["length"], original_seq_len=sizes["length"], index_topk=sizes["topk"])
    tokens, targets, _ = task.sample(64, sizes["length"], torch.Generator().manual_seed(999))
    per_seed = []
    for seed in seeds:
        entry = dict(seed=seed)
        for arm in LEAK_ARMS:
            torch.manual_seed(seed)
            model = TinyLM(args, task.vocab_size, 1,
                           lambda a: MHADSAttention(a, causal_after_topk=arm != "dsa_leaky")).to(device)
            initial = weights_digest(model)
            common = dict(steps=sizes["steps"], length=sizes["length"], batch=sizes["batch"], seed=seed,
                          progress=progress)
            with record_lr() as lrs:
                if arm == "dense":
                    hist = pretrain_dense(model, task, lr=sizes["lr"], **common)
                else:  # k = T selects every visible token: dense attention under sparse_training's schedule
                    train_topk = sizes["length"] if arm == "dense_constant" else sizes["topk"]
                    hist = sparse_training(model, task, topk=train_topk, lr_main=sizes["lr"], **common)
            topk = None if arm.startswith("dense") else sizes["topk"]
            with torch.no_grad():
                model.eval()
                entry[arm] = dict(accuracy=half_accuracies(model(tokens, topk=topk)[0], targets),
                                  seconds=hist.seconds, initial_weights=initial, data_seed=hist.settings["seed"],
                                  lr_main=[step[0] for step in lrs])
                if arm == "dsa_leaky":  # the same weights, evaluated with the causal mask restored
                    model.layers[0].attn.causal_after_topk = True
                    entry[arm]["accuracy_remasked"] = half_accuracies(model(tokens, topk=topk)[0], targets)
        per_seed.append(entry)
    halves = ("first_half", "second_half", "all")
    summary = {f"{arm}_{half}": _summary(per_seed, (arm, "accuracy", half)) for arm in LEAK_ARMS for half in halves}
    summary.update({f"dsa_leaky_remasked_{half}": _summary(per_seed, ("dsa_leaky", "accuracy_remasked", half))
                    for half in halves})
    paired = {f"{a}_minus_{b}_{half}": paired_difference([s[a]["accuracy"][half] for s in per_seed],
                                                         [s[b]["accuracy"][half] for s in per_seed])
              for a, b in LEAK_PAIRS for half in halves}
    return dict(sizes=sizes, chance=1 / sizes["vocab"], arms=list(LEAK_ARMS), per_seed=per_seed, summary=summary,
                paired=paired)
