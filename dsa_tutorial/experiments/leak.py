"""The causal leak of top-k without re-masking, reproduced on purpose.

A sparse attention mask built from the top-k indices alone leaks. In a causal prefill, row t has
only t + 1 visible tokens; when t + 1 < k, torch.topk still returns k indices, filling the rest
with masked (-inf) positions, i.e. future tokens, and nothing removes them again. Which future
tokens depends on how torch.topk breaks ties among the -inf scores (on this CPU build: mostly
positions in the second half of the row).

The task that shows it: `RepeatedSequence`, n random tokens followed by the same n tokens. In the
first half the next token is unpredictable (accuracy 1/V at best, causally); in the second half it
is a copy from n - 1 positions back. A model that can see the future can "predict" the first half.

The schedule control. The dense model is trained by `train.pretrain_dense` (AdamW, learning rate
decayed to 0 along a cosine), the DSA models by `train.sparse_training` (AdamW at a constant
learning rate). A gap between them may come from sparsity or from the schedule, so `runs.leak`
adds a fourth arm, dense attention trained by `sparse_training` itself with k = T (every visible
token selected: dense attention, see `train.TinyLM`): same initial weights, same batches, same
optimiser, same constant learning rate and clipping as the DSA arms; only the attention mask
differs. `record_lr` logs the learning rate each optimiser step actually used, so the JSON shows
the schedules rather than claiming them.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..checks import check_tensor

__all__ = ["RepeatedSequence", "half_accuracies", "record_lr", "weights_digest"]


@dataclass(frozen=True)
class RepeatedSequence:
    """x_1 .. x_n x_1 .. x_n with x_i uniform over `vocab` tokens; every next token is scored.

    `device`: where `sample` and `batches` put their tensors (drawn on the CPU with a CPU generator,
    so the data are the same on every device)."""

    vocab: int = 16
    device: str = field(default="cpu", compare=False)

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
        return tokens.to(self.device), targets.to(self.device), mask.to(self.device)

    def batches(self, batch: int, length: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch, length, generator)


def half_accuracies(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Next-token accuracy over the first half (positions 0 .. n-2: causally unpredictable) and the
    second (n-1 .. 2n-2: copies). logits [B, T, V], targets [B, T]."""
    check_tensor(logits, "logits", shape=("B", "T", "V"))
    check_tensor(targets, "targets", shape=tuple(logits.shape[:2]), dtype=torch.int64, device=logits.device)
    n = logits.shape[1] // 2
    correct = (logits.argmax(-1) == targets).double()  # [B, T]
    return dict(first_half=correct[:, : n - 1].mean().item(), second_half=correct[:, n - 1: -1].mean().item(),
                all=correct[:, :-1].mean().item())


@contextmanager
def record_lr():
    """Within the block, every optimiser step appends the learning rates of its parameter groups
    (as the step uses them, after any scheduler) to the yielded list: [[lr of group 0, ...], ...]."""
    steps: list[list[float]] = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: steps.append([float(group["lr"]) for group in optimizer.param_groups]))
    try:
        yield steps
    finally:
        handle.remove()


def weights_digest(model: torch.nn.Module) -> str:
    """A fingerprint of the model's parameters, names and float64 values (equal: the same weights)."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode() + p.detach().cpu().double().numpy().tobytes())
    return digest.hexdigest()[:16]
