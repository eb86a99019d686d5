"""The indexer's training (chapter 8): the target p, the KL loss, the two stages and the task."""
from __future__ import annotations

import pytest
import torch

from dsa_tutorial.compare import assert_close
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.experiments.mha import MHADSAttention
from dsa_tutorial.sparse_attention import DSAttention
from dsa_tutorial.topk import select_topk
from dsa_tutorial.train import (KeyValueRetrieval, TinyLM, attention_target, dense_warmup,
                                indexer_kl_loss, indexer_parameters, lm_loss, main_parameters, pretrain_dense,
                                selected_attention, sparse_training, topk_recall)

torch.set_num_threads(1)
ARGS = ModelArgs.tiny(max_seq_len=256, original_seq_len=256)
TASK = KeyValueRetrieval(n_keys=8, n_values=8, n_fillers=16, n_records=4, n_queries=4)
ATTENTIONS = {"mla": DSAttention, "mha": MHADSAttention}


def causal_probs(batch, n_tokens, n_heads, seed=0, dtype=torch.float64):
    """Random per-head causal attention probabilities [B, T, n_h, T] and index scores [B, T, T]."""
    gen = torch.Generator().manual_seed(seed)
    future = torch.ones(n_tokens, n_tokens, dtype=torch.bool).triu(1)
    scores = torch.randn(batch, n_tokens, n_heads, n_tokens, generator=gen, dtype=dtype) * 2
    probs = torch.softmax(scores.masked_fill(future[:, None, :], float("-inf")), dim=-1)
    index_scores = torch.randn(batch, n_tokens, n_tokens, generator=gen, dtype=dtype).masked_fill(future, float("-inf"))
    return scores, probs, index_scores, future


def test_target_sums_heads_and_normalises():
    _, probs, _, future = causal_probs(2, 7, 3)
    p = attention_target(probs)
    assert p.shape == (2, 7, 7)
    assert_close(p.sum(-1), torch.ones(2, 7, dtype=torch.float64), atol=1e-12)
    assert_close(p, probs.mean(2), atol=1e-12)  # rows of probabilities: the L1 norm of the head sum is n_h
    assert bool((p[:, future] == 0).all())


def test_dense_loss_is_the_kl_divergence_and_zero_at_the_target():
    _, probs, index_scores, future = causal_probs(2, 6, 4)
    p = attention_target(probs)
    loss = indexer_kl_loss(index_scores, probs)
    log_q = torch.log_softmax(index_scores, -1)
    expected = torch.stack([sum(p[b, t, s] * (p[b, t, s].log() - log_q[b, t, s]) for s in range(t + 1))
                            for b in range(2) for t in range(6)]).mean()
    assert_close(loss, expected, atol=1e-12)
    # I_t,s = log p_t,s: softmax(I) = p exactly, the loss is 0
    matched = p.log().masked_fill(future, float("-inf"))
    assert abs(indexer_kl_loss(matched, probs).item()) < 1e-12


def test_dense_loss_gradient_is_softmax_minus_target():
    _, probs, index_scores, future = causal_probs(1, 5, 2)
    index_scores.requires_grad_(True)
    indexer_kl_loss(index_scores, probs).backward()
    # d/dI_t,s of mean_t KL(p_t || softmax(I_t)) = (softmax(I_t)_s - p_t,s) / T
    expected = (torch.softmax(index_scores.detach(), -1) - attention_target(probs)) / 5
    assert_close(index_scores.grad[:, ~future], expected[:, ~future], atol=1e-12)
    assert bool((index_scores.grad[:, future] == 0).all())


def test_sparse_loss_matches_megatron_masking():
    """Megatron-LM: -inf outside S_t on the attention scores before each head's softmax, sum over
    heads, L1-normalise; -inf outside S_t on the index scores before their softmax."""
    scores, probs, index_scores, future = causal_probs(2, 9, 3, seed=1)
    k = 4
    indices = select_topk(index_scores.float(), k)  # rows t < 3 have -1 slots
    assert bool((indices < 0).any())
    loss = indexer_kl_loss(index_scores, probs, indices)
    outside = torch.ones(2, 9, 10, dtype=torch.bool)
    outside.scatter_(-1, torch.where(indices < 0, 9, indices).long(), False)
    outside = outside[..., :9] | future
    target = torch.softmax(scores.masked_fill(outside[:, :, None, :], float("-inf")), -1).sum(2)
    target = target / target.sum(-1, keepdim=True)
    log_q = torch.log_softmax(index_scores.masked_fill(outside, float("-inf")), -1)
    kl = torch.where(outside, torch.zeros_like(target), target * (target.log() - log_q)).sum(-1).mean()
    assert_close(loss, kl, atol=1e-12)
    assert_close(selected_attention(probs, indices).sum(-1), torch.ones(2, 9, 3, dtype=torch.float64), atol=1e-12)


def test_loss_rejects_bad_inputs():
    _, probs, index_scores, _ = causal_probs(1, 4, 2)
    with pytest.raises(ValueError, match="index_scores must have 3 dims"):
        indexer_kl_loss(index_scores[0], probs)
    with pytest.raises(ValueError, match="S = 3"):
        indexer_kl_loss(index_scores, probs[..., :3])
    with pytest.raises(ValueError, match="indices must be <= 3"):
        indexer_kl_loss(index_scores, probs, torch.full((1, 4, 2), 4))
    with pytest.raises(ValueError, match="masks disagree"):  # target mass on a -inf score
        indexer_kl_loss(torch.zeros(1, 4, 4).double().masked_fill(torch.eye(4, dtype=torch.bool), float("-inf")),
                        probs)


def test_recall_is_one_when_everything_visible_is_selected():
    _, probs, index_scores, _ = causal_probs(2, 6, 2)
    everything = select_topk(index_scores.float(), 6)
    assert abs(topk_recall(probs, everything).item() - 1) < 1e-12
    one = select_topk(index_scores.float(), 1)
    p = attention_target(probs)
    assert_close(topk_recall(probs, one), p.gather(-1, one.long()).mean(), atol=1e-12)


def test_task_layout():
    tokens, targets, mask = TASK.sample(3, 40, torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == mask.shape == (3, 40)
    assert int(mask.sum()) == 3 * TASK.n_queries
    for b in range(3):
        for t in mask[b].nonzero().flatten().tolist():
            key = int(tokens[b, t]) - TASK.first_query
            value = int(targets[b, t]) - TASK.first_value
            assert 0 <= key < TASK.n_keys and 0 <= value < TASK.n_values
            record = TASK.first_record + key * TASK.n_values + value
            assert int((tokens[b, :t] == record).sum()) == 1  # the answer is stored once, before the query
    again = TASK.sample(3, 40, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], tokens)
    with pytest.raises(ValueError, match="length >="):
        TASK.sample(2, 8, torch.Generator())


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_warmup_trains_only_the_indexer(kind):
    torch.manual_seed(0)
    model = TinyLM(ARGS, TASK.vocab_size, 1, ATTENTIONS[kind], TASK.token_features())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = dense_warmup(model, TASK, steps=3, length=24, batch=2, topk=4, progress=False)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    indexer = {name for name, _ in model.named_parameters() if ".indexer." in name}
    assert changed == indexer, f"changed {sorted(changed ^ indexer)}"
    assert len(history.metrics["kl"]) == len(history.steps) and history.steps[-1] == 3


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_sparse_stage_losses_reach_disjoint_parameters(kind):
    torch.manual_seed(0)
    model = TinyLM(ARGS, TASK.vocab_size, 1, ATTENTIONS[kind], TASK.token_features())
    tokens, targets, mask = TASK.sample(2, 24, torch.Generator().manual_seed(1))
    indexer, main = indexer_parameters(model), main_parameters(model)
    assert indexer and main and len(indexer) + len(main) == len(list(model.parameters()))

    def grads(detach):
        logits, auxes = model(tokens, topk=4, detach_indexer_input=detach, score_mask=mask)
        language = lm_loss(logits, targets, mask)
        kl = indexer_kl_loss(auxes[0]["index_scores"], auxes[0]["attn_probs"], auxes[0]["indices"])
        params = indexer + main
        g_lm = torch.autograd.grad(language, params, allow_unused=True, retain_graph=True)
        g_kl = torch.autograd.grad(kl, params, allow_unused=True)
        reached = lambda gs: [g is not None and bool(g.abs().sum() > 0) for g in gs]  # noqa: E731
        return reached(g_lm), reached(g_kl)

    lm_reach, kl_reach = grads(detach=True)
    n = len(indexer)
    assert not any(lm_reach[:n]), "the language-model loss reached the indexer (top-k is not differentiable)"
    assert any(lm_reach[n:])
    assert all(kl_reach[:n]), "the KL loss must train every indexer parameter"
    assert not any(kl_reach[n:]), "the KL loss reached the main model through the indexer's input"
    # without the detach the KL loss does reach the main model: the test above can fail
    _, kl_reach_attached = grads(detach=False)
    assert any(kl_reach_attached[n:])


def test_pretraining_and_sparse_stage_learn_the_task():
    """Smoke size: a few seconds. Dense pre-training learns the retrieval; the sparse stage keeps it."""
    torch.manual_seed(0)
    model = TinyLM(ARGS, TASK.vocab_size, 1, MHADSAttention, TASK.token_features())
    pre = pretrain_dense(model, TASK, steps=60, length=32, batch=16, lr=1e-2, progress=False, log_every=20)
    assert pre.metrics["lm_loss"][-1] < 0.5 * pre.metrics["lm_loss"][0]
    sparse = sparse_training(model, TASK, steps=10, length=32, topk=8, batch=8, progress=False, log_every=5)
    assert sparse.metrics["accuracy"][-1] > 0.5
    assert sparse.metrics["kl"][-1] < sparse.metrics["kl"][0]
