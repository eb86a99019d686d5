"""Smoke runs against stored ones: one comparison and one set of tolerance rules for every experiment.

The stored smoke results are tests/data/experiments_smoke/NAME.json (the experiments of
dsa_tutorial.experiments.EXPERIMENTS), tests/data/retrieval_smoke/NAME.json (retrieval.EXPERIMENTS) and
tests/data/text_smoke/text.json. Regenerate them after a change that moves the results on purpose:

    python tests/smoke_results.py --write              # every one
    python tests/smoke_results.py --write warmup text  # only these

The tolerance rules. A smoke run is single-threaded CPU training from fixed initial weights and
data, bit for bit the same on one machine and torch build. Another CPU or torch version rounds
matmuls differently (about 1e-7 relative per operation), which a few dozen optimizer steps amplify to
about 1e-4: the continuous metrics (KL, recalled mass, loss, bits per byte) must agree to rtol 1e-3,
atol 1e-4. Accuracy and hit rate count answers: a logit or index score near a tie may flip, so each
may differ by at most two answers of the smallest cell of the run (`answers` answers), a difference
of two such shares by four. Settings recorded as results (learning rates, thresholds) are exact, as
are integers, strings and the configuration. Skipped: what the machine decides (MACHINE: the
environment, wall times, the standard library's path), and what is computed from compared values
(DERIVED: std, intervals, the per-seed values a summary repeats). A float under no rule fails, so a
new metric must be given one here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
EXPERIMENTS_SMOKE_DIR = DATA / "experiments_smoke"
RETRIEVAL_SMOKE_DIR = DATA / "retrieval_smoke"
TEXT_SMOKE_DIR = DATA / "text_smoke"
EXPERIMENT_SEEDS = (0,)  # the older experiments and text: one seed (CI time)
RETRIEVAL_RUNS = (0, 1)  # the retrieval_* experiments: two paired runs

# fields the machine decides, skipped by name wherever they occur: the versions and CPU
# (environment; python also in text's corpus description), wall times, the standard library's path
MACHINE = frozenset({"environment", "seconds", "pretrain_seconds", "warmup_seconds", "sparse_seconds", "stdlib",
                     "python"})
# computed from values compared elsewhere in the payload (the summaries' means are compared)
DERIVED = frozenset({"std", "ci", "minus_reference", "values", "n", "confidence"})
# the classes of floats, by the words of their names ("sparse_recall_L64_k8": sparse, recall, L64, k8)
CONTINUOUS_WORDS = frozenset({"kl", "recall", "loss", "bits"})
CONTINUOUS_NAMES = frozenset({"uniform_minus_learned"})  # text: a difference of bits per byte
DIFFERENCE_WORDS = frozenset({"minus", "gap"})  # a difference of two shares
SHARE_WORDS = frozenset({"accuracy", "hit", "half", "all"})  # a share of answers ("dense_all": leak)
EXACT_WORDS = frozenset({"lr", "chance", "threshold"})  # settings, computed in Python floats


def _words(name: str) -> set[str]:
    return set(name.split("_"))


def _tolerance(path: str, answers: int | None) -> dict:
    """pytest.approx's arguments for the float at `path` (the rules above); fails for a float under none."""
    names = [part for part in path.split("/") if part and not part.isdigit()]
    if any(name in CONTINUOUS_NAMES or _words(name) & CONTINUOUS_WORDS for name in names):
        return dict(rel=1e-3, abs=1e-4)
    if any(_words(name) & (DIFFERENCE_WORDS | SHARE_WORDS) for name in names):
        assert answers, f"{path}: a share of answers, but the comparison was given no answer count"
        shares = 2 if any(_words(name) & DIFFERENCE_WORDS for name in names) else 1
        return dict(rel=0, abs=shares * 2 / answers + 1e-9)
    if any(_words(name) & EXACT_WORDS for name in names):
        return dict(rel=0, abs=0)
    raise AssertionError(f"{path}: a float under no tolerance rule; name it in tests/smoke_results.py")


def compare_smoke(new: dict, old: dict, *, answers: int | None, skip=frozenset(), path: str = "") -> None:
    """Assert that smoke payload `new` matches the stored `old` within the rules above. `answers`: the
    number of answers of the run's smallest accuracy cell; `skip`: more names to leave out."""
    if not path:  # the whole payload, as its JSON file has it (string keys, lists); the configuration exact
        new = json.loads(json.dumps(new))
        assert new["config"] == old["config"], "the smoke configuration changed: regenerate the stored results"
    leaf = path.rsplit("/", 1)[-1]
    if leaf in MACHINE or leaf in DERIVED or leaf in skip or path == "/config":
        return
    if isinstance(old, dict):
        assert set(new) == set(old), f"{path or '/'}: keys {sorted(set(new) ^ set(old))} differ"
        for key in old:
            compare_smoke(new[key], old[key], answers=answers, skip=skip, path=f"{path}/{key}")
    elif isinstance(old, list):
        assert len(new) == len(old), f"{path}: {len(new)} entries, stored {len(old)}"
        for i, (a, b) in enumerate(zip(new, old)):
            compare_smoke(a, b, answers=answers, skip=skip, path=f"{path}/{i}")
    elif isinstance(old, float):
        assert new == pytest.approx(old, **_tolerance(path, answers)), f"{path}: {new!r}, stored {old!r}"
    else:
        assert new == old and type(new) is type(old), f"{path}: {new!r}, stored {old!r}"


def stored_smoke(folder: Path, name: str) -> dict:
    path = folder / f"{name}.json"
    assert path.exists(), f"no stored smoke result {path}: python tests/smoke_results.py --write {name}"
    return json.loads(path.read_text())


def write(names=()) -> None:
    """Run the smoke experiments `names` (all when empty) and store their payloads."""
    import os
    import tempfile

    from dsa_tutorial.experiments import EXPERIMENTS, retrieval, run, text

    everything = list(EXPERIMENTS)  # the retrieval_* experiments and text among them
    unknown = set(names) - set(everything)
    if unknown:
        raise SystemExit(f"unknown experiments {sorted(unknown)}; choose from {', '.join(everything)}")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DSA_TUTORIAL_CACHE"] = cache  # smoke models are trained afresh, as in the tests
        for name in names or everything:
            if name in retrieval.EXPERIMENTS:
                retrieval.run(name, smoke=True, out_dir=RETRIEVAL_SMOKE_DIR, runs=RETRIEVAL_RUNS, progress=False)
            elif name == "text":
                text.run(name, smoke=True, out_dir=TEXT_SMOKE_DIR, seeds=EXPERIMENT_SEEDS, progress=False)
            else:
                run(name, smoke=True, out_dir=EXPERIMENTS_SMOKE_DIR, seeds=EXPERIMENT_SEEDS, progress=False)
            print(f"wrote the smoke result of {name}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--write"]:
        raise SystemExit("usage: python tests/smoke_results.py --write [NAME ...]")
    write(tuple(sys.argv[2:]))
