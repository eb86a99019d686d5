"""The causality guard: outputs before position t never move when tokens after t change.

For dense attention, DSA prefill and DSA decode, on the book's DSA layer (MLA + indexer) and on
the MHA variant of chapter 9; and the guard catches chapter 5's leak (top-k without
re-applying the causal mask), so it is a test that can fail.
"""
from __future__ import annotations

import pytest
import torch

from dsa_tutorial.compare import assert_close
from dsa_tutorial.config import ModelArgs
from dsa_tutorial.experiments.mha import MHACache, MHADSAttention
from dsa_tutorial.sparse_attention import DSACache, DSAttention
from dsa_tutorial.train import KeyValueRetrieval, TinyLM, future_influence

torch.set_num_threads(1)
ARGS = ModelArgs.tiny(max_seq_len=64, original_seq_len=64)
TASK = KeyValueRetrieval(n_keys=8, n_values=8, n_fillers=16, n_records=4, n_queries=4)
T, CUT, K = 20, 6, 8  # rows t < K - 1 = 7 see fewer than k tokens: the -1 (leak-prone) rows
LAYERS = {"mla": lambda: DSAttention(ARGS), "mha": lambda: MHADSAttention(ARGS)}
CACHES = {"mla": lambda: DSACache(ARGS, 2), "mha": lambda: MHACache(ARGS, 2)}


def hidden(seed):
    return torch.randn(2, T, ARGS.dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("topk", [T, K], ids=["dense", "dsa_prefill"])
def test_layer_prefill_is_causal(kind, topk):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    change = future_influence(lambda h: layer(h, topk=topk), hidden(1), CUT, hidden(2)[:, CUT:])
    assert change <= 1e-6, f"{kind} (k={topk}): outputs before {CUT} moved by {change:.3g}"


@pytest.mark.parametrize("kind", LAYERS)
def test_layer_decode_is_causal_and_matches_prefill(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()

    def decode(h):
        cache = CACHES[kind]()
        return torch.cat([layer(h[:, t:t + 1], cache=cache, topk=K) for t in range(h.shape[1])], dim=1)

    h = hidden(1)
    assert future_influence(decode, h, CUT, hidden(2)[:, CUT:]) <= 1e-6
    with torch.no_grad():
        assert_close(decode(h), layer(h, topk=K), atol=1e-5, rtol=1e-5, name=f"{kind} decode vs prefill")


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("topk", [None, K], ids=["dense", "dsa"])
def test_language_model_is_causal(kind, topk):
    torch.manual_seed(0)
    model = TinyLM(ARGS, TASK.vocab_size, 2, lambda a: LAYERS[kind](), TASK.token_features())
    tokens, _, _ = TASK.sample(2, T, torch.Generator().manual_seed(3))
    future = torch.randint(TASK.vocab_size, (2, T - CUT), generator=torch.Generator().manual_seed(4))
    change = future_influence(lambda x: model(x, topk=topk)[0], tokens, CUT, future)
    assert change <= 1e-5, f"{kind} model (k={topk}): logits before {CUT} moved by {change:.3g}"


def test_guard_catches_topk_without_causal_mask():
    torch.manual_seed(0)
    leaky = MHADSAttention(ARGS, causal_after_topk=False)
    change = future_influence(lambda h: leaky(h, topk=K), hidden(1), CUT, hidden(2)[:, CUT:])
    assert change > 1e-3, "the leak went unnoticed"
    # with k >= T every row selects future positions too: the leak is not limited to t < k - 1 then
    model = TinyLM(ARGS, TASK.vocab_size, 1, lambda a: MHADSAttention(a, causal_after_topk=False),
                   TASK.token_features())
    tokens, _, _ = TASK.sample(2, T, torch.Generator().manual_seed(3))
    future = torch.randint(TASK.vocab_size, (2, T - CUT), generator=torch.Generator().manual_seed(4))
    assert future_influence(lambda x: model(x, topk=K)[0], tokens, CUT, future) > 1e-3


def test_guard_rejects_bad_cut():
    with pytest.raises(ValueError, match="cut must be inside"):
        future_influence(lambda x: x, torch.zeros(1, 4), 4, torch.zeros(1, 0))
