"""The causal leak of top-k without re-masking, reproduced on purpose.

A sparse attention mask built from the top-k indices alone leaks. In a causal prefill, row t has
only t + 1 visible tokens; when t + 1 < k, torch.topk still returns k indices, filling the rest
with masked (-inf) positions, i.e. future tokens, and nothing removes them again. Which future
tokens depends on how torch.topk breaks ties among the -inf scores (on this CPU build: mostly
positions in the second half of the row).

The task that shows it: `RepeatedSequence`, n random tokens followed by the same n tokens. In the
first half the next token is unpredictable (accuracy 1/V at best, causally); in the second half it
is a copy from n - 1 positions back. A model that can see the future can "predict" the first half.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..checks import check_tensor

__all__ = ["RepeatedSequence", "half_accuracies"]


@dataclass(frozen=True)
class RepeatedSequence:
    """x_1 .. x_n x_1 .. x_n with x_i uniform over `vocab` tokens; every next token is scored."""

    vocab: int = 16

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def sample(self, batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """tokens [B, T] (T even), targets [B, T] (the next token) and loss_mask [B, T] (all but the last)."""
        if batch <= 0 or length < 4 or length % 2:
            raise ValueError(f"need batch > 0 and an even length >= 4, got {batch}, {length}")
        half = torch.randint(self.vocab, (batch, length // 2), generator=generator)
        tokens = torch.cat([half, half], dim=1)
        targets = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[:, -1] = False
        return tokens, targets, mask

    def batches(self, batch: int, length: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch, length, generator)


def half_accuracies(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Next-token accuracy over the first half (positions 0 .. n-2: causally unpredictable) and the
    second (n-1 .. 2n-2: copies). logits [B, T, V], targets [B, T]."""
    check_tensor(logits, "logits", shape=("B", "T", "V"))
    check_tensor(targets, "targets", shape=tuple(logits.shape[:2]), dtype=torch.int64)
    n = logits.shape[1] // 2
    correct = (logits.argmax(-1) == targets).double()  # [B, T]
    return dict(first_half=correct[:, : n - 1].mean().item(), second_half=correct[:, n - 1: -1].mean().item(),
                all=correct[:, :-1].mean().item())
