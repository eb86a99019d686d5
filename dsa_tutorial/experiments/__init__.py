"""Experiments of chapters 8-9: `python -m dsa_tutorial.experiments NAME`.

Each answers one question with one command and writes book/data/NAME.json (results per seed,
mean and standard deviation over seeds 0, 1, 2 (mha_vs_mla and leak: 0-4, see there), the configuration,
versions and wall time):

    warmup       (a) the dense warm-up: KL and recalled attention mass against steps; then the sparse stage
    weights      (b) research question 1: learned w^I against uniform weights
    mha_vs_mla   (c) research question 2: DSA on classic multi-head attention against MLA
    topk_length  (d) research question 3: budget k against sequence length (accuracy and recall)
    cost         (e) research question 4: indexer FLOPs and CPU time against length
    indexer_size (f) research question 5: indexer heads H_I and head dim d_I
    leak         the causal leak of top-k without re-masking, and what it does to the metric
    selectors    the lightning indexer against simple selection rules at equal k: the oracle (top-k of the
                 dense attention), a sliding window, sinks + window, random, whole blocks (experiments/selectors.py)
    retrieval_weights, retrieval_topk_length, retrieval_indexer_size
                 questions 1, 3 and 5 on LongRetrieval, a task whose records grow with the length, with
                 near-miss keys and two query types, trained at T = 1024 (experiments/retrieval.py; 5 paired
                 runs, --device cuda --jobs 5 for the full run)
    text         a byte-level model on the Python standard library: validation bits per byte, dense against DSA
                 at k = 16 ... 256 (experiments/text.py; 5 seeds, --device cuda --jobs 5 for the full run)

`python -m dsa_tutorial.experiments all` runs them in this order (the first eight in about 15 minutes
on two shared CPU cores; the GPU_SIZED four only with --device cuda; trained models are cached, see
`common`). `--smoke` runs the same code at a size
of seconds and writes nothing unless `--out` is given. Importing this package computes nothing.
"""
from __future__ import annotations

import time
from pathlib import Path

from . import retrieval as _retrieval, text as _text

__all__ = ["EXPERIMENTS", "GPU_SIZED", "DEFAULT_SEEDS", "run"]

# name -> (function name in runs, the question it answers)
EXPERIMENTS = {
    "warmup": ("warmup", "Does the dense warm-up teach the indexer the main attention? KL and the attention mass "
                         "its top-k set recalls against steps, then the sparse stage."),
    "weights": ("weights", "Research question 1: is the per-head weight w^I needed? Learned against uniform."),
    "mha_vs_mla": ("mha_vs_mla", "Research question 2: does DSA work on classic MHA, not only MLA?"),
    "topk_length": ("topk_length", "Research question 3: which k for which sequence length?"),
    "cost": ("indexer_cost", "Research question 4: how does the indexer's cost scale with length?"),
    "indexer_size": ("indexer_size", "Research question 5: how do the indexer's heads and head dim change its "
                                     "accuracy and cost?"),
    "leak": ("leak", "What does top-k without re-applying the causal mask do to the metric?"),
    "selectors": ("selector_comparison", "What does the indexer buy over simpler selectors at the same k? The "
                                         "oracle, a sliding window, sinks + window, random and block top-k."),
    # the GPU-sized experiments: each module holds its questions (recorded in its results)
    **{name: ("retrieval", question) for name, (_, question) in _retrieval.EXPERIMENTS.items()},
    "text": ("text", _text.QUESTION),
}
# made for one GPU (--device cuda): a day or more each on two CPU cores; every other experiment runs on the CPU
GPU_SIZED = (*_retrieval.EXPERIMENTS, "text")


# seeds per experiment (default 0, 1, 2); mha_vs_mla and leak report paired differences between their arms
# over 5 seeds, every seed counted (see runs.mha_vs_mla, runs.leak)
DEFAULT_SEEDS = {"mha_vs_mla": (0, 1, 2, 3, 4), "leak": (0, 1, 2, 3, 4),
                 **dict.fromkeys(("retrieval_weights", "retrieval_topk_length", "retrieval_indexer_size", "text"),
                                 (0, 1, 2, 3, 4))}


def run(name: str, *, smoke: bool = False, out_dir: Path | str | None = "default", seeds=None,
        progress: bool = True, use_cache: bool = True, device: str = "cpu", jobs: int = 1) -> dict:
    """Run one experiment; return its JSON payload and write it to out_dir/NAME.json
    (default book/data for full runs, nothing for smoke runs; None writes nothing). `device` and
    `jobs` (runs in parallel processes) apply to the GPU_SIZED experiments; the others run on the CPU."""
    import torch

    from . import runs
    from .common import CONFIG, DATA_DIR, SEEDS, SMOKE, save_result

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    config = SMOKE if smoke else CONFIG
    if out_dir == "default":
        out_dir = None if smoke else DATA_DIR
    seeds = tuple(DEFAULT_SEEDS.get(name, SEEDS) if seeds is None else seeds)
    if EXPERIMENTS[name][0] == "retrieval":
        from . import retrieval

        return retrieval.run(name, smoke=smoke, out_dir=out_dir, runs=seeds, progress=progress,
                             use_cache=use_cache, device=device, jobs=jobs)
    if EXPERIMENTS[name][0] == "text":
        from . import text

        return text.run(name, smoke=smoke, out_dir=out_dir, seeds=seeds, progress=progress, use_cache=use_cache,
                        device=device, jobs=jobs)
    if torch.device(device).type != "cpu" or jobs != 1:
        raise ValueError(f"{name} runs on the CPU in one process; device and jobs apply to the GPU-sized "
                         f"experiments ({', '.join(GPU_SIZED)}), got device={device!r}, jobs={jobs}")
    threads = torch.get_num_threads()
    torch.set_num_threads(config["threads"])
    try:
        function, question = EXPERIMENTS[name]
        started = time.perf_counter()
        kwargs = {}
        if smoke and name == "leak":
            kwargs["sizes"] = dict(length=32, topk=16, steps=30, batch=8)
        results = getattr(runs, function)(config, seeds, progress=progress, use_cache=use_cache and not smoke,
                                          **kwargs)
        return save_result(name, question, dict(config, smoke=smoke), seeds, results, started, out_dir)
    finally:
        torch.set_num_threads(threads)
