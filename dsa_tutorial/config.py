"""Model dimensions: DeepSeek-V3.2-Exp (the 671B configuration) and a tiny one for a laptop CPU.

Field names follow the official inference code's `ModelArgs`; the paper's symbols are beside them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["ModelArgs", "check_args"]


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 7168  # d, hidden size
    n_heads: int = 128  # n_h, attention heads
    q_lora_rank: int = 1536  # d_c', query latent
    kv_lora_rank: int = 512  # d_c, KV latent c^KV
    qk_nope_head_dim: int = 128  # d_h, per-head key/query dims without position
    qk_rope_head_dim: int = 64  # d_h^R, rotary dims (k^R is shared by all heads)
    v_head_dim: int = 128  # d_v
    index_n_heads: int = 64  # H_I, indexer heads
    index_head_dim: int = 128  # d_I, indexer head dim
    index_topk: int = 2048  # k, tokens selected per query
    max_seq_len: int = 163840  # positions the rotary tables cover
    original_seq_len: int = 4096  # YaRN: the pre-extension context
    rope_theta: float = 10000.0
    rope_factor: float = 40.0  # YaRN scaling factor
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("dim", "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "index_n_heads", "index_head_dim", "index_topk", "max_seq_len",
                     "original_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.index_head_dim & (self.index_head_dim - 1):
            raise ValueError(f"index_head_dim must be a power of two (Hadamard), got {self.index_head_dim}")
        if self.qk_rope_head_dim > self.index_head_dim:
            raise ValueError("the indexer rotates its first qk_rope_head_dim dims: need qk_rope_head_dim <= index_head_dim")

    @classmethod
    def tiny(cls, **overrides) -> "ModelArgs":
        """Same structure, small numbers: a forward pass takes milliseconds on a CPU."""
        small = dict(dim=64, n_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                     qk_rope_head_dim=8, v_head_dim=16, index_n_heads=4, index_head_dim=16, index_topk=8,
                     max_seq_len=256, original_seq_len=64, rope_factor=4.0)
        return replace(cls(**small), **overrides)

    @property
    def qk_head_dim(self) -> int:
        """d_h + d_h^R: the length of one head's query and key."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """d_c + d_h^R: what MQA mode attends over, per token (576 for V3.2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """(d_h + d_h^R)^-0.5, times mscale^2 when YaRN extends the context."""
        scale = self.qk_head_dim ** -0.5
        if self.max_seq_len > self.original_seq_len:
            mscale = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= mscale * mscale
        return scale


def check_args(args) -> ModelArgs:
    """`args` must be a ModelArgs (every module that takes model dimensions checks this one way)."""
    if not isinstance(args, ModelArgs):
        raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")
    return args
