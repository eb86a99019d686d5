"""Bytes and FLOPs, counted from the configuration: cache per token, attention and indexer work.

These are the numbers behind the book's cost plots. FLOPs count a multiply-add as two.
"""
from __future__ import annotations

from .config import ModelArgs

__all__ = ["cache_bytes_per_token", "causal_pairs", "mla_attention_flops", "indexer_flops"]

BF16, FP32, FP8 = 2, 4, 1
QUANT_BLOCK = 128  # values per FP8 scale


def cache_bytes_per_token(args: ModelArgs) -> dict[str, int]:
    """What one token costs in the cache of one layer, per storage scheme."""
    mha = args.n_heads * (args.qk_head_dim + args.v_head_dim) * BF16
    mla_bf16 = args.latent_dim * BF16
    # FlashMLA's V3.2 format: c^KV in e4m3 with one fp32 scale per 128 values, k^R left in bf16.
    mla_fp8 = (args.kv_lora_rank * FP8 + (args.kv_lora_rank // QUANT_BLOCK) * FP32
               + args.qk_rope_head_dim * BF16)
    # DeepGEMM's paged indexer cache: d_I e4m3 values and one fp32 scale per token.
    indexer = args.index_head_dim * FP8 + max(1, args.index_head_dim // QUANT_BLOCK) * FP32
    return {
        "MHA keys+values (bf16)": mha,
        "MLA latent c^KV + k^R (bf16)": mla_bf16,
        "MLA latent (FP8, FlashMLA format)": mla_fp8,
        "indexer key k^I (FP8 + scale)": indexer,
    }


def causal_pairs(length: int, topk: int | None = None) -> int:
    """Query-key pairs a causal prefill of `length` tokens scores: sum_t min(t + 1, k)."""
    if length < 0 or (topk is not None and topk <= 0):
        raise ValueError(f"need length >= 0 and topk > 0, got {length}, {topk}")
    if topk is None or topk >= length:
        return length * (length + 1) // 2
    return topk * (topk + 1) // 2 + (length - topk) * topk


def mla_attention_flops(args: ModelArgs, length: int, topk: int | None = None) -> int:
    """Core attention FLOPs of one MLA layer in MQA mode: per pair and head, a 576-dim score
    (q . [c^KV; k^R]) and a 512-dim weighted sum of c^KV. Dense when `topk` is None."""
    per_pair = 2 * args.n_heads * (args.latent_dim + args.kv_lora_rank)
    return per_pair * causal_pairs(length, topk)


def indexer_flops(args: ModelArgs, length: int) -> int:
    """Lightning-indexer FLOPs of a causal prefill: H_I dot products of d_I per pair (eq. 1)."""
    return 2 * args.index_n_heads * args.index_head_dim * causal_pairs(length)
