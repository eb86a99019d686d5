"""LongRetrieval and the retrieval_* experiments (dsa_tutorial/experiments/retrieval.py), and the
statistics helpers of experiments.common they report with."""
from __future__ import annotations

import math

import pytest
import torch

from dsa_tutorial.compare import assert_close
from dsa_tutorial.experiments import retrieval as R
from dsa_tutorial.experiments.common import environment, format_mean_std, paired_difference, t_quantile
from dsa_tutorial.sparse_attention import DSAttention
from smoke_results import RETRIEVAL_RUNS, RETRIEVAL_SMOKE_DIR, compare_smoke, stored_smoke

TASK = R.LongRetrieval()
TASK_LENGTHS = tuple(R.RETRIEVAL["lengths"])  # the lengths the experiments evaluate


def _records(task, tokens):
    """(position, key, value) of every record token in each row."""
    is_record = (tokens >= task.first_record) & (tokens < task.first_value_query)
    record = tokens - task.first_record
    return is_record, record // task.n_values, record % task.n_values


# ----------------------------------------------------------------------------- the task

def test_records_grow_with_length_at_a_fixed_density():
    generator = torch.Generator().manual_seed(0)
    counts = []
    for length in TASK_LENGTHS:
        tokens, _, _ = TASK.sample(4, length, generator)
        is_record, _, _ = _records(TASK, tokens)
        assert (is_record.sum(-1) == TASK.n_records(length)).all()
        counts.append(TASK.n_records(length))
        # one record per `density` context tokens, rounded down to whole groups
        assert TASK.n_records(length) > (length - 2 * TASK.n_queries) / TASK.density - TASK.group - 1
    assert counts == sorted(counts) and counts[-1] >= 2 * counts[0]
    with pytest.raises(ValueError, match="length"):
        TASK.sample(1, TASK.max_length() + 1, generator)


def test_keys_and_values_are_distinct_and_every_key_has_near_misses():
    tokens, _, mask = TASK.sample(8, 1024, torch.Generator().manual_seed(1))
    is_record, keys, values = _records(TASK, tokens)
    for b in range(tokens.shape[0]):
        row_keys, row_values = keys[b][is_record[b]], values[b][is_record[b]]
        assert row_keys.unique().numel() == row_keys.numel() and row_values.unique().numel() == row_values.numel()
        prefixes = row_keys // TASK.n_suffixes
        # every prefix in use is shared by exactly `group` records (distinct suffixes): group - 1 near misses
        assert (torch.bincount(prefixes)[prefixes.unique()] == TASK.group).all()
    # the asked keys: each has group - 1 records that share its prefix and differ in the suffix
    needed = R.needed_positions(TASK, tokens, mask)
    for b, t in mask.nonzero().tolist():
        asked = keys[b, needed[b, t]]
        near = is_record[b] & (keys[b] // TASK.n_suffixes == asked // TASK.n_suffixes) & (keys[b] != asked)
        assert int(near.sum()) == TASK.group - 1


def test_answers_are_determined_by_the_sequence():
    """The target after each query follows from the tokens alone: the needed record's value or key."""
    tokens, targets, mask = TASK.sample(8, 512, torch.Generator().manual_seed(2))
    kinds, needed = R.query_kinds(TASK, tokens, mask), R.needed_positions(TASK, tokens, mask)
    _, keys, values = _records(TASK, tokens)
    b, t = mask.nonzero(as_tuple=True)
    record_key, record_value = keys[b, needed[b, t]], values[b, needed[b, t]]
    expected = torch.where(kinds[b, t] == 0, TASK.first_value_answer + record_value,
                           TASK.first_key_answer + record_key)
    assert torch.equal(targets[b, t], expected)
    assert (needed[b, t] < t).all()  # the record comes before its query
    assert int((kinds[b, t] == 0).sum()) == int((kinds[b, t] == 1).sum())  # half of each kind
    # distinct records per sequence: no answer gives a later one away
    assert all(needed[i][mask[i]].unique().numel() == TASK.n_queries for i in range(tokens.shape[0]))


def test_token_features_link_records_queries_and_answers():
    features = TASK.token_features()
    key, value = 13, 5
    record = features[TASK.first_record + key * TASK.n_values + value]
    shared = lambda a, b: int((features[a] * features[b]).sum())  # noqa: E731
    assert shared(TASK.first_value_query + key, TASK.first_record + key * TASK.n_values + value) == 2  # prefix, suffix
    assert shared(TASK.first_key_query + value, TASK.first_record + key * TASK.n_values + value) == 1  # the value
    assert shared(TASK.first_value_answer + value, TASK.first_record + key * TASK.n_values + value) == 1
    near = key // TASK.n_suffixes * TASK.n_suffixes + (key + 1) % TASK.n_suffixes  # same prefix
    assert shared(TASK.first_value_query + near, TASK.first_record + key * TASK.n_values + value) == 1
    assert record.sum() == 4 and features.shape[0] == TASK.vocab_size


def test_batches_are_the_same_on_any_device_and_for_any_arm():
    """A stream is fixed by its seed alone; the device only moves it."""
    a = next(TASK.batches(2, 512, 7))
    b = next(R.LongRetrieval(device="meta").batches(2, 512, 7))
    assert b[0].device.type == "meta" and all(torch.equal(x, y) for x, y in zip(a, next(TASK.batches(2, 512, 7))))


# ----------------------------------------------------------------------------- the model

def test_the_masked_layer_equals_dsattention():
    """The model's layer (common.MaskedDSAttention: dense attention, -inf outside S_t) against the book's
    DSAttention, dense (k = T) and sparse (k = 8)."""
    config = R.RETRIEVAL_SMOKE
    model = R.make_model(config, 0)
    layer = model.layers[0].attn
    h = torch.randn(2, 48, layer.args.dim, generator=torch.Generator().manual_seed(3))
    for k in (48, 8):
        out, aux = layer(h, topk=k, return_aux=True)
        ref, ref_aux = DSAttention.forward(layer, h, topk=k, return_aux=True)
        # float32, the same products summed in another order (P c^KV over all s, or over the gathered
        # latents): rounding only, a few ulps of outputs of size ~1
        assert_close(out, ref, atol=1e-6, rtol=1e-5, name=f"masked layer vs DSAttention, k = {k}")
        assert torch.equal(aux["indices"], ref_aux["indices"])
        assert torch.equal(aux["attn_probs"], ref_aux["attn_probs"])


def test_arms_train_on_the_same_data_in_the_same_order(monkeypatch, tmp_path):
    """Every arm of run r reads the same batches in the same order (learned and uniform w^I, another size)."""
    monkeypatch.setenv("DSA_TUTORIAL_CACHE", str(tmp_path))
    drawn = [[]]  # the digests of the batches each stage draws, one list per call below
    sample = R.LongRetrieval.sample

    def recording(self, batch, length, generator):
        out = sample(self, batch, length, generator)
        drawn[-1].append(R.batch_digest(out[0]))
        return out

    monkeypatch.setattr(R.LongRetrieval, "sample", recording)
    config = R.RETRIEVAL_SMOKE
    R.pretrained(config, 0, progress=False)  # cached: the arms below draw only their warm-up batches
    assert len(drawn[0]) == sum(phase["steps"] for phase in config["pretrain"])
    arms = (dict(weights="learned"), dict(weights="uniform"), dict(weights="learned", index_n_heads=2))
    for arm in arms:
        drawn.append([])
        R.warmed(config, 0, progress=False, **arm)
    assert len(drawn[1]) == config["warmup"]["steps"]
    assert drawn[1] == drawn[2] == drawn[3]
    drawn.append([])
    R.warmed(config, 1, progress=False)  # another run: its own pre-training and warm-up data
    assert drawn[4][-config["warmup"]["steps"]:] != drawn[1]
    # the digests the results record are those of the first batches drawn
    digests = R.data_digests(config, 0)
    assert digests["warmup"] == drawn[1][0] and digests["pretrain"][0] == drawn[0][0]


# ----------------------------------------------------------------------------- the statistics

def test_t_quantile_and_paired_difference_on_known_values():
    # Student's t table: t_{0.975, 1} = 12.706, t_{0.975, 4} = 2.776, t_{0.975, 30} = 2.042
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-4)
    # differences 1, 2, 3, 4, 5: mean 3, std sqrt(2.5), half-width 2.7764 sqrt(2.5) / sqrt(5) = 1.9632
    result = paired_difference([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert result["mean"] == 3 and result["std"] == pytest.approx(math.sqrt(2.5))
    assert result["ci"] == pytest.approx([3 - 1.96324, 3 + 1.96324], abs=1e-4)
    assert paired_difference([1.0], [0.5])["ci"] is None
    with pytest.raises(ValueError, match="equal length"):
        paired_difference([1, 2], [1])


def test_format_mean_std_keeps_the_digits_the_std_supports():
    assert format_mean_std(0.8347, 0.0213) == "0.83 +- 0.02"
    assert format_mean_std(0.8347, 0.14) == "0.83 +- 0.14"  # leading digit 1: two digits
    assert format_mean_std(12.34, 3.1) == "12 +- 3"
    assert format_mean_std(0.91234, 0.00149) == "0.9123 +- 0.0015"
    assert format_mean_std(0.5, 0.0) == "0.5 +- 0"
    with pytest.raises(ValueError):
        format_mean_std(1.0, -0.1)


def test_environment_records_the_device():
    assert environment("cpu")["device"] == "cpu" and environment()["torch"] == torch.__version__


# ----------------------------------------------------------------------------- the smoke runs against stored ones

# The tolerance rules (tests/smoke_results.py, shared with the other experiments): continuous metrics
# (KL, recalled mass) to rtol 1e-3, atol 1e-4; accuracy and hit rate within two answers of a cell (2 / 32
# at smoke size); every value of every run, and the mean of every summary cell.
SMOKE_ANSWERS = R.RETRIEVAL_SMOKE["eval"]["sequences"] * R.RETRIEVAL_SMOKE["task"]["n_queries"]


@pytest.mark.parametrize("name", list(R.EXPERIMENTS))
def test_smoke_run_matches_the_stored_one(name, monkeypatch, tmp_path):
    monkeypatch.setenv("DSA_TUTORIAL_CACHE", str(tmp_path))
    stored = stored_smoke(RETRIEVAL_SMOKE_DIR, name)
    assert tuple(stored["seeds"]) == RETRIEVAL_RUNS
    payload = R.run(name, smoke=True, runs=RETRIEVAL_RUNS, progress=False)
    assert payload["environment"]["device"] == "cpu" and payload["config"]["smoke"]
    compare_smoke(payload, stored, answers=SMOKE_ANSWERS)


def test_device_and_jobs_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="cpu or cuda"):
        R.run("retrieval_weights", smoke=True, device="meta")
    with pytest.raises(ValueError, match="jobs"):
        R.run("retrieval_weights", smoke=True, jobs=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            R.run("retrieval_weights", smoke=True, device="cuda")
