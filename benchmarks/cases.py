"""Inputs of the benchmark cases that several benchmarks time (fp8_logits.py, public_calls.py): random
data at DeepSeek-V3.2 sizes, on the GPU, from a seeded generator. Each returns the arguments of the
public call, in order."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import paged  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402

H, D = 64, 128  # indexer heads and head width
V32 = ModelArgs()


def paged_inputs(B: int, mean_context: int, next_n: int, seed: int = 0):
    """paged_mqa_logits_cuda's arguments: a paged indexer-key cache holding B contexts of 0.7 to 1.3 x
    mean_context tokens (blocks shuffled; every entry of block_table a valid block), random e4m3
    keys with scales in [0.5, 1.5), e4m3 q, weights, the schedule and max_context_len."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = ((0.7 + 0.6 * torch.rand(B, generator=g, device="cuda")) * mean_context).int()
    max_context_len = int(lens.max())
    max_blocks = -(-max_context_len // 64)
    num_blocks = B * max_blocks
    block_table = torch.randperm(num_blocks, device="cuda", generator=g).int().view(B, max_blocks)
    values = torch.randn(num_blocks * 64, D, device="cuda", generator=g).to(torch.float8_e4m3fn)
    scales = torch.rand(num_blocks * 64, device="cuda", generator=g) + 0.5
    kv_cache = torch.cat([values.view(torch.uint8).view(num_blocks, 64 * D),
                          scales.view(torch.uint8).view(num_blocks, 256)], 1).view(num_blocks, 64, 1, D + 4)
    q = torch.randn(B, next_n, H, D, device="cuda", generator=g).to(torch.float8_e4m3fn)
    weights = torch.randn(B * next_n, H, device="cuda", generator=g)
    schedule = paged.paged_mqa_logits_metadata(lens, 64, paged.schedule_size())
    return q, kv_cache, weights, lens, block_table, schedule, max_context_len


def mqa_inputs(S_q: int, S_k: int, seed: int = 0):
    """mqa_logits_cuda's arguments: the last S_q of S_k tokens as causal queries (query i sees keys
    0 .. S_k - S_q + i), random e4m3 q and k, key scales in [0.5, 1.5), weights."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(S_q, H, D, device="cuda", generator=g).to(torch.float8_e4m3fn)
    k = torch.randn(S_k, D, device="cuda", generator=g).to(torch.float8_e4m3fn)
    k_scale = torch.rand(S_k, device="cuda", generator=g) + 0.5
    weights = torch.randn(S_q, H, device="cuda", generator=g)
    ks = torch.zeros(S_q, dtype=torch.int32, device="cuda")
    ke = torch.arange(S_k - S_q + 1, S_k + 1, dtype=torch.int32, device="cuda")
    return q, (k, k_scale), weights, ks, ke


def sparse_inputs(B: int = 64, S: int = 32768, k: int = 2048, seed: int = 0):
    """sparse_mla_attention_cuda's arguments: decode, 128 heads, a bf16 latent cache of S tokens and k
    distinct random selected positions per sequence."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q_abs = torch.randn(B, 128, 512, device="cuda", generator=g).bfloat16()
    q_rope = torch.randn(B, 128, 64, device="cuda", generator=g).bfloat16()
    kv = torch.randn(B, S, 576, device="cuda", generator=g).bfloat16()
    indices = torch.argsort(torch.rand(B, S, device="cuda", generator=g), dim=-1)[:, :k].int()
    return q_abs, q_rope, kv, indices, V32.softmax_scale
