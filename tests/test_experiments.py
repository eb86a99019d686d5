"""The experiments of chapter 9: every one runs at smoke size and matches its stored smoke result, and
the stored full results are whole."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from dsa_tutorial.experiments import EXPERIMENTS, GPU_SIZED, run
from dsa_tutorial.experiments.__main__ import main
from dsa_tutorial.experiments.common import DATA_DIR, SMOKE, UniformWeights, eval_batch, make_model, mean_std
from dsa_tutorial.experiments.leak import RepeatedSequence, half_accuracies
from smoke_results import (EXPERIMENT_SEEDS, EXPERIMENTS_SMOKE_DIR, RETRIEVAL_SMOKE_DIR, TEXT_SMOKE_DIR, compare_smoke,
                           stored_smoke)

FAST = ["warmup", "weights", "mha_vs_mla", "topk_length", "leak", "selectors"]

# The smallest accuracy cell of each smoke run, in answers (tests/smoke_results.py: an accuracy may
# move by two of them). The key-value experiments score 4 queries a sequence and give the longest
# length (256 at smoke size) the fewest sequences; leak scores next tokens of 64 sequences of length
# 32, and its smallest half (the first) has 15 answers a sequence.
KV_ANSWERS = eval_batch(SMOKE, SMOKE["args"]["max_seq_len"])["batch"] * SMOKE["eval"]["batches"] * \
    SMOKE["task"]["n_queries"]
ANSWERS = {**dict.fromkeys(EXPERIMENTS, KV_ANSWERS), "leak": 64 * (32 // 2 - 1), "cost": None}
# cost times the reference functions on this CPU: its timings (seconds per call, by function) are the
# machine's and are left out; its FLOP counts, lengths and sizes are compared exactly
COST_TIMINGS = frozenset({"index_scores", "select_topk", "dense_mla", "sparse_mla"})


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """name -> the payload of its smoke run (seeds EXPERIMENT_SEEDS), run once for every test of this module
    and written to a temporary folder, as a full run writes book/data."""
    out, payloads = tmp_path_factory.mktemp("smoke"), {}

    def smoke(name):
        if name not in payloads:
            payloads[name] = run(name, smoke=True, out_dir=out, seeds=EXPERIMENT_SEEDS, progress=False)
        return payloads[name], json.loads((out / f"{name}.json").read_text())
    return smoke


def _check_smoke_run(name, smoke_runs):
    payload, written = smoke_runs(name)
    assert written["experiment"] == name and written["seeds"] == list(EXPERIMENT_SEEDS)
    assert written["config"]["smoke"] is True
    assert written["command"] == f"python -m dsa_tutorial.experiments {name}"
    assert {"torch", "python", "torch_threads"} <= set(written["environment"])
    assert written["results"] == json.loads(json.dumps(payload["results"]))
    compare_smoke(written, stored_smoke(EXPERIMENTS_SMOKE_DIR, name), answers=ANSWERS[name],
                  skip=COST_TIMINGS if name == "cost" else frozenset())


@pytest.mark.parametrize("name", FAST)
def test_smoke_run_is_complete_and_matches_the_stored_one(name, smoke_runs):
    _check_smoke_run(name, smoke_runs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cost", "indexer_size"])
def test_slower_smoke_runs(name, smoke_runs):
    _check_smoke_run(name, smoke_runs)


def test_every_experiment_has_a_stored_smoke_result():
    """The CPU experiments' stored smoke runs are checked here; the GPU-sized ones' in tests/test_retrieval.py
    and tests/test_text_lm.py."""
    assert set(FAST) | {"cost", "indexer_size"} | set(GPU_SIZED) == set(EXPERIMENTS)
    cpu = sorted(set(EXPERIMENTS) - set(GPU_SIZED))
    assert sorted(p.stem for p in EXPERIMENTS_SMOKE_DIR.glob("*.json")) == cpu
    assert sorted(p.stem for p in RETRIEVAL_SMOKE_DIR.glob("*.json")) == sorted(set(GPU_SIZED) - {"text"})
    assert [p.stem for p in TEXT_SMOKE_DIR.glob("*.json")] == ["text"]


def test_selectors_indexer_row_is_the_topk_length_evaluation(smoke_runs):
    """The selectors experiment's indexer, through its own layer, gives exactly what topk_length measures
    (same model, same sequences); the oracle recalls at least the indexer's mass; rates are rates."""
    selectors, lengths = smoke_runs("selectors")[0]["results"], smoke_runs("topk_length")[0]["results"]
    for L in selectors["lengths"]:
        grid, reference = selectors["per_seed"][0]["eval"][str(L)], lengths["per_seed"][0]["eval"][str(L)]
        assert grid["dense"]["accuracy"] == reference["dense"]["accuracy"]
        for k in (k for k in selectors["topks"] if k < L):
            for metric in ("accuracy", "recall_answer"):
                assert grid["indexer"][str(k)][metric] == reference[str(k)][metric], (L, k, metric)
            assert grid["oracle"][str(k)]["recall_answer"] >= grid["indexer"][str(k)]["recall_answer"] - 1e-6
            for rule in selectors["rules"]:
                assert all(0 <= grid[rule][str(k)][m] <= 1 for m in ("accuracy", "hit_rate", "recall_answer"))


def test_smoke_run_writes_nothing_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {p.name: p.stat().st_mtime for p in DATA_DIR.glob("*.json")}
    run("weights", smoke=True, seeds=(0,), progress=False)
    assert before == {p.name: p.stat().st_mtime for p in DATA_DIR.glob("*.json")}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_stored_results_are_complete_and_consistent(name):
    """book/data/NAME.json: three seeds or more, full size, and every summary is the mean of at least
    three per-seed values (mha_vs_mla leaves out seeds whose dense model failed; it says which)."""
    payload = json.loads((DATA_DIR / f"{name}.json").read_text())
    assert payload["experiment"] == name and len(payload["seeds"]) >= 3 and payload["config"]["smoke"] is False
    assert payload["seconds"] > 0 and payload["environment"]["torch"]

    def check(node):
        if isinstance(node, dict):
            if {"mean", "std", "values"} <= set(node):
                assert 3 <= len(node["values"]) <= len(payload["seeds"])
                assert node["mean"] == pytest.approx(statistics.fmean(node["values"]), abs=1e-12)
                return 1
            return sum(check(v) for v in node.values())
        if isinstance(node, list):
            return sum(check(v) for v in node)
        return 0

    assert check(payload["results"]) > 0 or name == "cost"


def test_uniform_weights_replace_the_projection():
    model = make_model("mla", SMOKE, 0, weights="uniform")
    indexer = model.layers[0].attn.indexer
    assert isinstance(indexer.weights_proj, UniformWeights)
    assert not any("weights_proj" in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="weights must be"):
        make_model("mla", SMOKE, 0, weights="none")
    with pytest.raises(ValueError, match="kind must be"):
        make_model("gqa", SMOKE, 0)


def test_repeated_sequence_and_half_accuracies():
    tokens, targets, mask = RepeatedSequence(8).sample(3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(tokens[:, :5], tokens[:, 5:]) and not mask[:, -1].any()
    perfect = torch.nn.functional.one_hot(targets, 8).double()
    assert half_accuracies(perfect, targets) == dict(first_half=1.0, second_half=1.0, all=1.0)
    with pytest.raises(ValueError, match="even length"):
        RepeatedSequence(8).sample(1, 7, torch.Generator())


def test_mean_std():
    assert mean_std([1, 2, 3]) == dict(mean=2.0, std=1.0, n=3, values=[1.0, 2.0, 3.0])
    assert mean_std([4])["std"] == 0.0


def test_command_line(capsys):
    assert main(["list"]) == 0
    assert "topk_length" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["no_such_experiment"])
    with pytest.raises(ValueError, match="unknown experiment"):
        run("no_such_experiment")
