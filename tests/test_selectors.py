"""Selectors (chapter 9): every rule obeys select_topk's rules, and each matches its definition by brute force."""
from __future__ import annotations

import math

import pytest
import torch

from dsa_tutorial.compare import assert_close
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.experiments.selectors import RULES, SelectorAttention, needed_positions, selecting
from dsa_tutorial.selectors import (SELECTORS, SelectionInputs, block_scores, block_topk, indexer_topk, oracle_topk,
                                    random_topk, selector, sinks_window_topk, window_topk)
from dsa_tutorial.sparse_attention import DSAttention
from dsa_tutorial.train import KeyValueRetrieval, TinyLM, attention_target, topk_recall

torch.set_num_threads(1)
# (B, T, S, k): prefill (T = S) and queries at the end of a longer sequence (T < S), k below, at and above T
SIZES = [(2, 1, 1, 1), (2, 5, 5, 3), (3, 13, 20, 8), (1, 7, 30, 30), (2, 17, 17, 16), (2, 9, 23, 5), (1, 40, 40, 12)]
# every rule the experiment runs, plus the block rule at a size that does not divide the lengths
CONFIGS = {name: options for name, (_, options) in RULES.items()}
CONFIGS["block3_max"] = lambda k: dict(name="block", block_size=3, pool="max")
CONFIGS["block5_mean"] = lambda k: dict(name="block", block_size=5, pool="mean")
CONFIGS["sinks_all"] = lambda k: dict(name="sinks", n_sink=100)


def random_inputs(B, T, S, n_h=3, D=6, seed=0) -> SelectionInputs:
    """Fresh random index scores (-inf on future positions), causal per-head probabilities, queries and keys."""
    gen = torch.Generator().manual_seed(seed)
    slot = torch.arange(S - T, S)
    future = torch.arange(S)[None, :] > slot[:, None]  # [T, S]
    index_scores = torch.randn(B, T, S, generator=gen).masked_fill(future, float("-inf"))
    logits = torch.randn(B, T, n_h, S, generator=gen) * 3
    attn_probs = torch.softmax(logits.masked_fill(future[:, None, :], float("-inf")), dim=-1)
    queries, keys = torch.randn(B, T, n_h, D, generator=gen), torch.randn(B, S, D, generator=gen)
    return SelectionInputs((B, T, S), index_scores=index_scores, attn_probs=attn_probs, queries=queries, keys=keys)


def check_rules(indices, B, T, S, k) -> None:
    """select_topk's rules, row by row: int32 [B, T, k], distinct visible positions in increasing
    order, then -1; as many as the query sees, at most k."""
    assert indices.dtype == torch.int32 and indices.shape == (B, T, k)
    for b in range(B):
        for t in range(T):
            slot = S - T + t
            row = indices[b, t].tolist()
            chosen = [s for s in row if s >= 0]
            assert row == chosen + [-1] * (k - len(chosen)), (b, t, row)
            assert chosen == sorted(set(chosen)), (b, t, row)
            assert all(0 <= s <= slot for s in chosen), (b, t, row, slot)
            assert len(chosen) == min(k, slot + 1), (b, t, row)


def brute_force_top(values: list[float], k: int, slot: int) -> list[int]:
    """The k largest of values[0..slot] (lower position first among equals), ascending, -1 padded."""
    ranked = sorted(range(slot + 1), key=lambda s: (-values[s], s))[:k]
    return sorted(ranked) + [-1] * (k - len(ranked))


@pytest.mark.parametrize("rule", sorted(CONFIGS))
@pytest.mark.parametrize("B, T, S, k", SIZES)
def test_every_selector_obeys_the_causal_rules(rule, B, T, S, k):
    inputs = random_inputs(B, T, S, seed=B * 1000 + T * 31 + S)
    select = selector(**CONFIGS[rule](k), generator=torch.Generator().manual_seed(7))
    check_rules(select(inputs, k), B, T, S, k)


@pytest.mark.parametrize("rule", sorted(CONFIGS))
def test_a_budget_as_large_as_the_sequence_selects_every_visible_position(rule):
    B, T, S = 2, 6, 11
    indices = selector(**CONFIGS[rule](S))(random_inputs(B, T, S, seed=3), S)
    for t in range(T):
        slot = S - T + t
        expected = list(range(slot + 1)) + [-1] * (S - slot - 1)
        assert indices[:, t].tolist() == [expected] * B


@pytest.mark.parametrize("B, T, S, k", SIZES)
def test_indexer_and_oracle_against_brute_force(B, T, S, k):
    inputs = random_inputs(B, T, S, seed=11 + S)
    by_indexer, by_oracle = indexer_topk(inputs.index_scores, k), oracle_topk(inputs.attn_probs, k)
    summed = inputs.attn_probs.double().sum(2)  # sum over heads; the L1 normalisation keeps the order
    for b in range(B):
        for t in range(T):
            slot = S - T + t
            assert by_indexer[b, t].tolist() == brute_force_top(inputs.index_scores[b, t].tolist(), k, slot)
            assert by_oracle[b, t].tolist() == brute_force_top(summed[b, t].tolist(), k, slot)


def test_the_oracle_recalls_the_most_mass():
    """No rule's selection holds more of p than the oracle's, row by row (the oracle maximises it)."""
    B, T, S, k = 3, 24, 24, 5
    inputs = random_inputs(B, T, S, seed=5)
    p = attention_target(inputs.attn_probs)

    def mass(indices):
        return (p.gather(-1, indices.clamp(min=0).long()) * (indices >= 0)).sum(-1)

    best = mass(selector("oracle")(inputs, k))
    for rule, options in CONFIGS.items():
        assert bool((mass(selector(**options(k))(inputs, k)) <= best + 1e-6).all()), rule
    assert topk_recall(inputs.attn_probs, selector("oracle")(inputs, k)) >= topk_recall(
        inputs.attn_probs, selector("indexer")(inputs, k))


@pytest.mark.parametrize("B, T, S, k", SIZES)
def test_window_and_sinks_against_brute_force(B, T, S, k):
    window = window_topk(B, T, S, k)
    for n_sink in (0, 1, 4, k, k + 3):
        sinks = sinks_window_topk(B, T, S, k, n_sink)
        for t in range(T):
            slot = S - T + t
            recent = list(range(max(0, slot - k + 1), slot + 1))
            assert window[:, t].tolist() == [recent + [-1] * (k - len(recent))] * B
            first = list(range(min(n_sink, k, slot + 1)))
            rest = [s for s in range(slot, -1, -1) if s >= n_sink][: k - len(first)]
            expected = sorted(first + rest)
            assert sinks[:, t].tolist() == [expected + [-1] * (k - len(expected))] * B, (n_sink, t)
    assert torch.equal(sinks_window_topk(B, T, S, k, 0), window)


def test_random_is_reproducible_and_uniform():
    B, T, S, k = 2, 9, 30, 4
    draw = lambda seed: random_topk(B, T, S, k, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    one = torch.Generator().manual_seed(5)
    assert not torch.equal(random_topk(B, T, S, k, one), random_topk(B, T, S, k, one))  # each call a new draw
    # each of 10 visible positions is in the set with probability k / 10 = 0.3
    many = random_topk(20000, 1, 10, 3, torch.Generator().manual_seed(0))[:, 0]
    frequency = torch.stack([(many == s).any(-1).double().mean() for s in range(10)])
    assert bool(((frequency - 0.3).abs() < 0.02).all()), frequency


def brute_force_block_scores(queries, keys, block_size, pool):
    """sum_i q_t,i . pooled key of each block, pooled over its positions s <= slot, with loops (float64);
    None for blocks entirely after the query. -> [B][T][n_blocks]"""
    B, T, n_h, D = queries.shape
    S = keys.shape[1]
    q, kk = queries.double(), keys.double()
    out = []
    for b in range(B):
        rows = []
        for t in range(T):
            slot = S - T + t
            row = []
            for start in range(0, S, block_size):
                visible = [s for s in range(start, min(start + block_size, S)) if s <= slot]
                if not visible:
                    row.append(None)
                    continue
                block = kk[b, visible]  # [n, D]
                score = 0.0
                for i in range(n_h):
                    if pool == "mean":
                        score += float(q[b, t, i] @ block.mean(0))
                    else:  # max over the block of q . k is bounded by sum_d max(q_d max_d, q_d min_d)
                        high, low = block.max(0).values, block.min(0).values
                        score += float(torch.maximum(q[b, t, i] * high, q[b, t, i] * low).sum())
                row.append(score)
            rows.append(row)
        out.append(rows)
    return out


@pytest.mark.parametrize("pool", ["mean", "max"])
@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("B, T, S, k", [(2, 5, 5, 3), (3, 13, 20, 8), (2, 9, 23, 5), (1, 40, 40, 12)])
def test_block_selection_against_brute_force(B, T, S, k, block_size, pool):
    """Scores: each position carries its block's score, pooled causally; selection: whole blocks by
    score (lower block first among equals), the last one cut to its first positions."""
    inputs = random_inputs(B, T, S, seed=S + block_size)
    expected_scores = brute_force_block_scores(inputs.queries, inputs.keys, block_size, pool)
    scores = block_scores(inputs.queries, inputs.keys, block_size, pool)
    indices = block_topk(inputs.queries, inputs.keys, k, block_size, pool)
    for b in range(B):
        for t in range(T):
            slot = S - T + t
            row = expected_scores[b][t]
            for s in range(slot + 1):
                assert scores[b, t, s].item() == pytest.approx(row[s // block_size], abs=1e-4)
            ranked = sorted((j for j, v in enumerate(row) if v is not None), key=lambda j: (-row[j], j))
            order = [s for j in ranked for s in range(j * block_size, min((j + 1) * block_size, slot + 1))]
            chosen = sorted(order[:k])
            assert indices[b, t].tolist() == chosen + [-1] * (k - len(chosen)), (b, t)


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_block_selection_keeps_whole_blocks(pool):
    """Per row: every selected block holds all its visible positions, except at most one (the
    lowest-scored of them), cut to its first positions."""
    B, T, S, k, b = 2, 50, 64, 12, 4
    inputs = random_inputs(B, T, S, seed=9)
    scores = block_scores(inputs.queries, inputs.keys, b, pool)
    indices = block_topk(inputs.queries, inputs.keys, k, b, pool)
    for row_b in range(B):
        for t in range(T):
            slot = S - T + t
            chosen = [s for s in indices[row_b, t].tolist() if s >= 0]
            blocks = sorted({s // b for s in chosen})
            whole = {j: list(range(j * b, min(j * b + b, slot + 1))) for j in blocks}
            cut = [j for j in blocks if [s for s in chosen if s // b == j] != whole[j]]
            assert len(cut) <= 1, (t, chosen)
            if cut:
                kept = [s for s in chosen if s // b == cut[0]]
                assert kept == list(range(cut[0] * b, cut[0] * b + len(kept)))
                assert all(scores[row_b, t, cut[0] * b] <= scores[row_b, t, j * b] for j in blocks)
            assert len(blocks) <= math.ceil(k / b) + 1  # one more only when the query's own block is partial


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_block_scores_do_not_read_the_future(pool):
    """Changing the keys after a cut leaves every score a query before the cut can select unchanged."""
    B, T, S, b, cut = 2, 20, 20, 8, 11
    inputs = random_inputs(B, T, S, seed=4)
    keys = inputs.keys.clone()
    keys[:, cut:] = torch.randn(B, S - cut, keys.shape[-1])
    before = block_scores(inputs.queries, inputs.keys, b, pool)
    after = block_scores(inputs.queries, keys, b, pool)
    for t in range(cut):
        assert torch.equal(before[:, t, : t + 1], after[:, t, : t + 1]), t
    assert torch.equal(block_topk(inputs.queries, inputs.keys, 6, b, pool)[:, :cut],
                       block_topk(inputs.queries, keys, 6, b, pool)[:, :cut])


def test_bad_input_is_refused_with_a_clear_message():
    inputs = random_inputs(1, 4, 6)
    with pytest.raises(ValueError, match="unknown selector"):
        selector("nearest")
    with pytest.raises(ValueError, match="pool must be one of"):
        selector("block", pool="median")
    with pytest.raises(ValueError, match="pool must be one of"):
        block_scores(inputs.queries, inputs.keys, 4, "median")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        block_topk(inputs.queries, inputs.keys, 2, 0)
    with pytest.raises(ValueError, match="n_sink must be an int >= 0"):
        sinks_window_topk(1, 4, 6, 2, -1)
    with pytest.raises(ValueError, match="larger than the sequence"):
        window_topk(1, 4, 6, 7)
    with pytest.raises(ValueError, match="more queries"):
        window_topk(1, 7, 6, 2)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        random_topk(1, 4, 6, 2, generator=0)
    with pytest.raises(ValueError, match="reads attn_probs"):
        selector("oracle")(SelectionInputs((1, 4, 6), index_scores=inputs.index_scores), 2)
    with pytest.raises(ValueError, match="D = 5"):
        block_scores(inputs.queries, inputs.keys[..., :5], 2)
    with pytest.raises(ValueError, match="attn_probs must have 4 dims"):
        oracle_topk(inputs.attn_probs[:, :, 0], 2)
    assert set(SELECTORS) == {"indexer", "oracle", "window", "sinks", "random", "block"}


# ----------------------------------------------------------------------------- the experiment's layer

ARGS = ModelArgs.tiny(max_seq_len=64, original_seq_len=64)
TASK = KeyValueRetrieval(n_keys=8, n_values=8, n_fillers=16, n_records=4, n_queries=4)


def test_the_indexer_as_selector_is_the_dsa_layer_bit_for_bit():
    torch.manual_seed(0)
    layer = DSAttention(ARGS)
    h = torch.randn(2, 37, ARGS.dim)
    for k in (1, 5, 8, 37):
        out, aux = layer(h, topk=k, return_aux=True)
        out_sel, aux_sel = SelectorAttention(layer, selector("indexer"))(h, topk=k, return_aux=True)
        assert torch.equal(out, out_sel)
        assert all(torch.equal(aux[name], aux_sel[name]) for name in ("index_scores", "indices", "attn_probs"))
    # a model under `selecting` gives the same logits, and gets its own layers back afterwards
    model = TinyLM(ARGS, TASK.vocab_size, 2, DSAttention, TASK.token_features())
    tokens, _, mask = TASK.sample(3, 40, torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, _ = model(tokens, topk=6, score_mask=mask)
        with selecting(model, selector("indexer")):
            assert isinstance(model.layers[1].attn, SelectorAttention)
            chosen, _ = model(tokens, topk=6, score_mask=mask)
    assert torch.equal(plain, chosen) and all(isinstance(block.attn, DSAttention) for block in model.layers)


def test_another_selector_changes_what_the_layer_reads():
    torch.manual_seed(0)
    layer = DSAttention(ARGS)
    h = torch.randn(2, 30, ARGS.dim)
    out, aux = SelectorAttention(layer, selector("window"))(h, topk=4, return_aux=True)
    assert torch.equal(aux["indices"], window_topk(2, 30, 30, 4))
    assert not torch.allclose(out, layer(h, topk=4))
    # k >= T: every rule selects every visible position, and the layer is dense MLA
    for rule in ("window", "random", "block"):
        assert_close(SelectorAttention(layer, selector(rule, block_size=4))(h, topk=30), layer(h, topk=30),
                     atol=1e-6)


def test_needed_positions_point_at_the_record_of_the_asked_key():
    tokens, _, mask = TASK.sample(5, 30, torch.Generator().manual_seed(2))
    needed = needed_positions(TASK, tokens, mask)
    assert bool((needed[~mask] == -1).all())
    for b, t in mask.nonzero().tolist():
        key = int(tokens[b, t]) - TASK.first_query
        s = int(needed[b, t])
        record = int(tokens[b, s]) - TASK.first_record
        assert 0 <= record < TASK.n_keys * TASK.n_values and record // TASK.n_values == key and s < t
        # the value after the query is the record's value
        assert int(tokens[b, t + 1]) - TASK.first_value == record % TASK.n_values
    # a query naming a key no record holds
    b, t = mask.nonzero()[0].tolist()
    stored = {(int(x) - TASK.first_record) // TASK.n_values for x in tokens[b]
              if TASK.first_record <= int(x) < TASK.first_query}
    broken = tokens.clone()
    broken[b, t] = TASK.first_query + min(set(range(TASK.n_keys)) - stored)
    with pytest.raises(ValueError, match="exactly one stored record"):
        needed_positions(TASK, broken, mask)
