"""The byte-level language model on the Python standard library (dsa_tutorial/experiments/text.py)."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from dsa_tutorial.config import ModelArgs
from dsa_tutorial.experiments.text import (TEXT_SMOKE, ByteStream, MaskedDSAttention, corpus_paths, is_validation,
                                           load_corpus, make_text_model, merge, run, stdlib_root, text_lm,
                                           validation_windows)
from dsa_tutorial.sparse_attention import DSAttention
from smoke_results import EXPERIMENT_SEEDS, TEXT_SMOKE_DIR, compare_smoke, stored_smoke


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def smoke_payload(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    payload = run("text", smoke=True, out_dir=out, seeds=EXPERIMENT_SEEDS, progress=False)
    assert json.loads((out / "text.json").read_text()) == json.loads(json.dumps(payload))
    return payload


@pytest.fixture(scope="module")
def smoke(smoke_payload):
    return smoke_payload["results"]


def test_recorded(smoke_payload):
    assert smoke_payload["experiment"] == "text"
    assert smoke_payload["config"]["smoke"] is True and smoke_payload["config"]["corpus"]["max_bytes"]
    assert smoke_payload["environment"]["device"] == "cpu" and smoke_payload["seeds"] == [0]
    with pytest.raises(ValueError, match="text configuration"):
        text_lm({"args": {}}, (0,))
    with pytest.raises(ValueError, match="jobs"):
        run("text", smoke=True, jobs=0)


def test_seeds_in_parallel_processes_and_merged_runs(smoke_payload):
    """Seeds run in spawned processes (jobs) give what one process gives, bit for bit (CPU, one thread);
    a run of seed 1 merged with the stored run of seed 0 is the run of seeds (0, 1): per-seed entries in
    order, the summary recomputed over both, where each came from recorded."""
    def timeless(entry):  # each stage's wall time ("seconds") is the machine's, not the result's
        return {key: {arm: {k: v for k, v in stage.items() if k != "seconds"} for arm, stage in value.items()}
                if key == "warmup" else {k: v for k, v in value.items() if k != "seconds"}
                if key in ("pretrain", "sparse") else value for key, value in entry.items()}

    both = run("text", smoke=True, seeds=(0, 1), progress=False, jobs=2)
    one = run("text", smoke=True, seeds=(1,), progress=False)
    assert timeless(both["results"]["per_seed"][0]) == timeless(smoke_payload["results"]["per_seed"][0])
    assert timeless(both["results"]["per_seed"][1]) == timeless(one["results"]["per_seed"][0])
    merged = merge([one, smoke_payload])
    assert merged["seeds"] == [0, 1]
    assert [timeless(e) for e in merged["results"]["per_seed"]] == [timeless(e) for e in both["results"]["per_seed"]]
    assert merged["results"]["summary"] == both["results"]["summary"]
    assert [m["seeds"] for m in merged["merged_from"]] == [[1], [0]]
    with pytest.raises(ValueError, match="disjoint seeds"):
        merge([smoke_payload, smoke_payload])
    with pytest.raises(ValueError, match="same config"):
        merge([smoke_payload, dict(one, config=dict(one["config"], n_layers=3))])


def test_smoke_run_matches_the_stored_one(smoke_payload):
    """tests/data/text_smoke/text.json within the tolerance rules of tests/smoke_results.py. The corpus is
    this interpreter's standard library: another Python's is other data, and the comparison cannot apply."""
    stored = stored_smoke(TEXT_SMOKE_DIR, "text")
    corpus, stored_corpus = smoke_payload["results"]["corpus"], stored["results"]["corpus"]
    digests = ("train_sha256", "valid_sha256")
    if [corpus[d] for d in digests] != [stored_corpus[d] for d in digests]:
        pytest.skip(f"the stored smoke result was trained on Python {stored_corpus['python']}'s standard library; "
                    f"this is Python {corpus['python']}'s, other bytes")
    # accuracies: next-byte accuracy over one training batch, batch x length answers
    answers = TEXT_SMOKE["pretrain"]["batch"] * TEXT_SMOKE["pretrain"]["length"]
    compare_smoke(smoke_payload, stored, answers=answers)


def _fake_stdlib(root):
    files = {"os.py": b"import sys\n", "json/__init__.py": b"# json\n", "json/decoder.py": b"x = 1\n" * 50,
             "test/test_os.py": b"skip", "unittest/test/test_case.py": b"skip", "lib2to3/tests/data/a.py": b"skip",
             "idlelib/idle_test/t.py": b"skip", "site-packages/pkg/mod.py": b"skip", "notes.txt": b"skip"}
    files.update({f"pkg{i}/mod{i}.py": bytes([i % 256]) * (i + 1) for i in range(40)})
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_split_rule_and_exclusions(tmp_path):
    files = _fake_stdlib(tmp_path)
    paths = corpus_paths(tmp_path)
    kept = sorted(n for n in files if n.endswith(".py") and n.split("/")[0] not in ("test", "site-packages")
                  and "/test/" not in n and "/tests/" not in n and "/idle_test/" not in n)
    assert paths == kept and "json/decoder.py" in paths and "unittest/test/test_case.py" not in paths
    # the documented rule, written out: sha256 of the relative path, as an integer, mod 10
    for name in paths:
        assert is_validation(name) == (int.from_bytes(hashlib.sha256(name.encode()).digest(), "big") % 10 == 0)
    fake = load_corpus(tmp_path)
    valid = [name for name, _, _ in fake.files["valid"]]
    train = [name for name, _, _ in fake.files["train"]]
    assert valid and train and sorted(valid + train) == paths and not set(valid) & set(train)
    assert all(is_validation(n) for n in valid) and not any(is_validation(n) for n in train)


def test_stdlib_split_is_deterministic_and_disjoint(corpus):
    again = load_corpus()
    assert corpus.description == again.description and torch.equal(corpus.train, again.train)
    valid = {name for name, _, _ in corpus.files["valid"]}
    train = {name for name, _, _ in corpus.files["train"]}
    assert not valid & train and sorted(valid | train) == corpus_paths()
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for name in valid | train
                   for part in name.split("/")[:-1])
    d = corpus.description
    assert (d["train_files"], d["valid_files"]) == (len(train), len(valid))
    assert 0.05 < len(valid) / (len(valid) + len(train)) < 0.2  # about one file in ten
    assert d["train_bytes"] == corpus.train.numel() > 1_000_000 and d["valid_bytes"] == corpus.valid.numel()


def test_byte_streams_round_trip_to_the_files(corpus):
    root = stdlib_root()
    for split in ("train", "valid"):
        stream = corpus.stream(split).numpy().tobytes()
        assert hashlib.sha256(stream).hexdigest() == corpus.description[f"{split}_sha256"]
        end = 0
        for name, start, stop in corpus.files[split]:
            assert start == end and stream[start:stop] == (root / name).read_bytes(), name
            end = stop
        assert end == len(stream)
    head = load_corpus(max_bytes=5000)
    assert torch.equal(head.train, corpus.train[:5000]) and torch.equal(head.valid, corpus.valid[:5000])


def test_byte_stream_batches_and_windows(corpus):
    data = corpus.valid[:20000]
    tokens, targets, mask = next(ByteStream(data).batches(4, 33, seed=7))
    again = next(ByteStream(data).batches(4, 33, seed=7))
    assert torch.equal(tokens, again[0]) and tokens.dtype == torch.int64 and mask.all()
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    raw = data.numpy().tobytes()
    for row, last in zip(tokens, targets[:, -1]):
        assert bytes(row.tolist() + [int(last)]) in raw
    windows = validation_windows(data, 64, 5)
    assert windows.shape == (5, 65) and windows[0, 0] == data[0] and windows[-1, -1] == data[-1]


@pytest.mark.parametrize("topk", [1, 5, 23, 24, 100, None])
def test_masked_layer_is_the_dsa_layer(topk):
    args = ModelArgs(**TEXT_SMOKE["args"])
    torch.manual_seed(0)
    reference = DSAttention(args, dtype=torch.float64)
    layer = MaskedDSAttention(args, dtype=torch.float64)
    layer.load_state_dict(reference.state_dict())
    h = torch.randn(2, 24, args.dim, dtype=torch.float64, requires_grad=True)
    out, aux = layer(h, topk=topk, return_aux=True)
    expected, expected_aux = reference(h, topk=topk, return_aux=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(aux["indices"], expected_aux["indices"])
    for name in ("index_scores", "attn_probs"):
        torch.testing.assert_close(aux[name], expected_aux[name], rtol=0, atol=0)
    grad, = torch.autograd.grad(out.square().sum(), h)
    expected_grad, = torch.autograd.grad(expected.square().sum(), h)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="no cache"):
        layer(h, cache=object())


def test_uniform_weights_model():
    model = make_text_model(TEXT_SMOKE, 0, "uniform")
    assert not any("weights_proj" in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="weights must be"):
        make_text_model(TEXT_SMOKE, 0, "none")


def test_smoke_run_learns_and_reports_every_arm(smoke):
    s = smoke["summary"]
    assert smoke["arms"] == ["learned", "uniform", "sparse"] and smoke["topks"] == TEXT_SMOKE["topks"]
    untrained = s["untrained_bits_per_byte"]["mean"]
    dense = s["bits_per_byte"]["learned"]["dense"]["mean"]
    # an untrained model is no better than uniform bytes (8 bits); training must beat that by far
    assert untrained > 8 and dense < 8 - 2
    # the warm-ups only train the indexer: dense attention (and its loss) is the dense model's in both
    assert s["bits_per_byte"]["uniform"]["dense"]["mean"] == dense
    for arm in smoke["arms"]:
        for k in smoke["topks"]:
            bits = s["bits_per_byte"][arm][str(k)]["mean"]
            assert math.isfinite(bits) and bits < 8
            assert s["excess_bits_per_byte"][arm][str(k)]["mean"] == pytest.approx(
                bits - s["bits_per_byte"][arm]["dense"]["mean"], abs=1e-12)
        # top-k sets are nested, so the recalled mass cannot fall as k grows
        recall = [[layer["mean"] for layer in s["recall"][arm][str(k)]] for k in smoke["topks"]]
        assert all(0 < r <= 1 + 1e-6 for row in recall for r in row) and len(recall[0]) == TEXT_SMOKE["n_layers"]
        assert all(a <= b + 1e-6 for small, large in zip(recall, recall[1:]) for a, b in zip(small, large))
    warmup = smoke["per_seed"][0]["warmup"]["learned"]["metrics"]
    assert warmup["kl"][-1] < warmup["kl"][0]
    assert smoke["corpus"]["python"] and smoke["corpus"]["train_bytes_used"] == TEXT_SMOKE["corpus"]["max_bytes"]
    assert json.loads(json.dumps(smoke)) == smoke
