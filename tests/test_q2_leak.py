"""Research question 2 (DSA on MHA against MLA) and the leak experiment's schedule control.

* the MHA indexer reads its own query latent c^Q = RMSNorm(W^DQ h), as MLA's reads c^Q;
* the two kinds of research question 2 are paired: run i of both sees the same batches in the same order;
* the leak experiment's control arm, dense attention trained by `sparse_training`, gets the DSA arms'
  schedule (the learning rates each optimiser step used, as logged) from the same initial weights;
* both experiments run at smoke size and their summaries are the per-seed numbers they claim.
"""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from dsa_tutorial.compare import assert_close
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.experiments import run, runs
from dsa_tutorial.experiments.common import SMOKE, Settings
from dsa_tutorial.experiments.leak import RepeatedSequence, record_lr, weights_digest
from dsa_tutorial.experiments.mha import MHADSAttention, QueryLatentIndexer
from dsa_tutorial.indexer import Indexer
from dsa_tutorial.sparse_attention import DSAttention
from dsa_tutorial.train import (TinyLM, indexer_parameters, main_parameters, pretrain_dense,
                                sparse_training)

ARGS = ModelArgs.tiny()


@pytest.fixture(autouse=True)
def one_thread():
    """The experiments run single-threaded (as `experiments.run` sets them); so do their calls here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the MHA indexer's query latent

def test_mha_indexer_reads_a_query_latent_sized_as_mla():
    mha, mla = MHADSAttention(ARGS), DSAttention(ARGS)
    assert isinstance(mha.indexer, QueryLatentIndexer)
    assert mha.indexer.wq_a.weight.shape == (ARGS.q_lora_rank, ARGS.dim)  # W^DQ: dim -> d_c'
    # the indexer's query projection reads d_c' = q_lora_rank features, exactly as MLA's does
    assert mha.indexer.wq_b.in_features == mla.indexer.wq_b.in_features == ARGS.q_lora_rank < ARGS.dim


def test_mha_index_scores_are_the_indexer_on_the_hand_computed_latent():
    torch.manual_seed(0)
    layer = MHADSAttention(ARGS)
    with torch.no_grad():
        layer.indexer.q_norm.weight.uniform_(0.5, 1.5)  # a norm weight that is not all ones
    h, positions = torch.randn(2, 12, ARGS.dim), torch.arange(12)
    _, aux = layer(h, return_aux=True)
    # c^Q_t = RMSNorm(W^DQ h_t), written out: [B, T, d_c']
    x = h @ layer.indexer.wq_a.weight.T
    c_q = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ARGS.norm_eps) * layer.indexer.q_norm.weight
    with torch.no_grad():
        assert_close(aux["index_scores"], Indexer.forward(layer.indexer, h, c_q, positions), atol=1e-5, rtol=1e-5,
                     name="index scores")
        # and not the indexer on h itself (the old design): a different input, different scores
        other = Indexer.forward(layer.indexer, h, torch.randn_like(c_q), positions)
        visible = torch.isfinite(other)
        assert (aux["index_scores"][visible] - other[visible]).abs().max() > 1e-2


def test_the_query_latent_trains_with_the_indexer_and_the_attention_does_not_read_it():
    torch.manual_seed(1)
    layer = MHADSAttention(ARGS)
    h = torch.randn(2, 16, ARGS.dim, requires_grad=True)
    latent = [layer.indexer.wq_a.weight, layer.indexer.q_norm.weight]
    out, aux = layer(h, topk=4, return_aux=True)
    # the index scores depend on W^DQ and the norm: nonzero gradients
    grads = torch.autograd.grad(aux["index_scores"].masked_fill(aux["index_scores"].isinf(), 0).sum(), latent)
    assert all(g.abs().sum() > 0 for g in grads)
    # the attention's output does not read c^Q (top-k is not differentiable; the attention is classic)
    grads = torch.autograd.grad(out.sum(), latent, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    # so they are indexer parameters: L^I trains them, the language-model loss does not
    model = TinyLM(ARGS, 8, 1, MHADSAttention)
    ids = {id(p) for p in indexer_parameters(model)}
    latent = [model.layers[0].attn.indexer.wq_a.weight, model.layers[0].attn.indexer.q_norm.weight]
    assert all(id(p) in ids for p in latent) and not any(id(p) in {id(q) for q in main_parameters(model)}
                                                        for p in latent)


# ----------------------------------------------------------------------------- research question 2 is paired

TINY = Settings({**SMOKE, "pretrain": dict(steps=4, length=32, batch=4, lr=1e-2),
                 "warmup": dict(steps=2, length=32, batch=4, lr=1e-3),
                 "eval": dict(tokens=128, batches=1, seed=12345),
                 "args": dict(SMOKE["args"], max_seq_len=64, original_seq_len=64)})


@pytest.fixture(scope="module")
def paired_run():
    """research question 2 at a tiny size, seeds 0 and 1, with every forward call of a TinyLM (training
    and evaluation) recorded by its attention's kind, its mode and a digest of its tokens."""
    seen = {"DSAttention": [], "MHADSAttention": []}

    def hook(module, args):
        if isinstance(module, TinyLM):
            seen[type(module.layers[0].attn).__name__].append(
                (module.training, hashlib.sha256(args[0].cpu().numpy().tobytes()).hexdigest()))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        results = runs.mha_vs_mla(TINY, (0, 1), progress=False, use_cache=False)
    finally:
        handle.remove()
        torch.set_num_threads(threads)
    return results, seen


def test_both_kinds_see_the_same_batches(paired_run):
    """The MLA and the MHA runs see the same sequence of batches; the two seeds see different ones."""
    results, seen = paired_run
    mla, mha = seen["DSAttention"], seen["MHADSAttention"]
    sparse_steps = runs.SPARSE_RATIO * TINY["warmup"]["steps"]
    # per seed: pre-training, warm-up and sparse steps, and the evaluations
    assert len(mla) > 2 * (TINY["pretrain"]["steps"] + TINY["warmup"]["steps"] + sparse_steps)
    assert {training for training, _ in mla} == {True, False}
    assert mla == mha
    half = len(mla) // 2
    assert mla[:half] != mla[half:]  # seed 0 and seed 1 do differ: the check above can fail
    for entry in results["per_seed"]:
        assert entry["mla"]["data_seeds"] == entry["mha"]["data_seeds"]
        assert entry["mla"]["data_seeds"]["pretrain"] == entry["seed"]


def test_paired_differences_are_mla_minus_mha_per_seed(paired_run):
    results, _ = paired_run
    assert results["paired"] and set(results["paired"]) == set(results["summary"]["mla"])
    for name, paired in results["paired"].items():
        mla, mha = results["summary"]["mla"][name]["values"], results["summary"]["mha"][name]["values"]
        assert paired["values"] == pytest.approx([a - b for a, b in zip(mla, mha)], abs=1e-15)
        low, high = paired["ci"]
        assert low <= paired["mean"] <= high
    # every seed is summarised, none left out
    assert all(s["n"] == 2 for kind in ("mla", "mha") for s in results["summary"][kind].values())
    gap = results["summary"]["mla"]["sparse_gap_L64_k8"]["values"]
    per_seed = [s["mla"]["eval_sparse"]["64"]["8"]["accuracy"] - s["mla"]["eval_warmup"]["64"]["dense"]["accuracy"]
                for s in results["per_seed"]]
    assert gap == pytest.approx(per_seed, abs=1e-15)


# ----------------------------------------------------------------------------- the leak's schedule control

LEAK_SIZES = dict(vocab=8, length=16, topk=8, steps=12, batch=4, lr=1e-2)


def test_leak_control_arm_has_the_dsa_schedule_and_the_same_start():
    results = runs.leak(None, (0, 1), progress=False, sizes=LEAK_SIZES)
    steps, lr = LEAK_SIZES["steps"], LEAK_SIZES["lr"]
    cosine = [lr * 0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)]
    for entry in results["per_seed"]:
        logged = {arm: entry[arm]["lr_main"] for arm in results["arms"]}
        assert all(len(values) == steps for values in logged.values())
        # the control and both DSA arms: the constant learning rate at every step
        for arm in ("dense_constant", "dsa", "dsa_leaky"):
            assert logged[arm] == [lr] * steps, arm
        # the dense arm as before: cosine decay to 0
        assert logged["dense"] == pytest.approx(cosine, rel=1e-12)
        # the same initial weights and the same data in every arm
        assert len({entry[arm]["initial_weights"] for arm in results["arms"]}) == 1
        assert {entry[arm]["data_seed"] for arm in results["arms"]} == {entry["seed"]}
    digests = [entry["dense"]["initial_weights"] for entry in results["per_seed"]]
    assert digests[0] != digests[1]


@pytest.mark.parametrize("steps, same", [(1, True), (2, False)])
def test_the_control_arm_is_dense_training_on_the_constant_schedule(steps, same):
    """One step of sparse_training at k = T moves the main parameters exactly as one step of
    pretrain_dense (whose cosine factor is 1 at the first step): the control arm is dense attention,
    only the schedule differs. From the second step on the cosine lowers the dense arm's rate."""
    task = RepeatedSequence(8)
    args = ModelArgs.tiny(max_seq_len=16, original_seq_len=16, index_topk=8)
    models = []
    for train in ("pretrain_dense", "sparse_training"):
        torch.manual_seed(3)
        model = TinyLM(args, task.vocab_size, 1, MHADSAttention)
        common = dict(steps=steps, length=16, batch=4, seed=5, progress=False)
        with record_lr() as lrs:
            if train == "pretrain_dense":
                pretrain_dense(model, task, lr=1e-2, **common)
            else:
                sparse_training(model, task, topk=16, lr_main=1e-2, **common)
        assert lrs[0][0] == 1e-2
        models.append(model)
    dense, control = (main_parameters(m) for m in models)
    if same:
        for a, b in zip(dense, control):
            assert_close(b, a, atol=1e-6, rtol=1e-6, name="main parameters after one step")
    else:
        assert max((a - b).abs().max().item() for a, b in zip(dense, control)) > 1e-4
    assert weights_digest(models[0]) != weights_digest(models[1])  # the indexers differ (only L^I trains them)


# ----------------------------------------------------------------------------- smoke runs

@pytest.mark.parametrize("name", ["mha_vs_mla", "leak"])
def test_smoke_runs_report_their_comparisons(name):
    results = run(name, smoke=True, out_dir=None, seeds=(0,), progress=False)["results"]
    if name == "mha_vs_mla":
        assert results["primary"] in results["paired"]
        assert results["sparse_stage"]["steps"] == runs.SPARSE_RATIO * SMOKE["warmup"]["steps"]
        assert results["structure"]["mha"]["indexer_parameters"] > results["structure"]["mla"]["indexer_parameters"]
    else:
        assert set(results["arms"]) == {"dense", "dense_constant", "dsa", "dsa_leaky"}
        assert "dsa_minus_dense_constant_second_half" in results["paired"]
        entry = results["per_seed"][0]
        assert results["paired"]["dsa_minus_dense_constant_second_half"]["values"] == [
            entry["dsa"]["accuracy"]["second_half"] - entry["dense_constant"]["accuracy"]["second_half"]]
