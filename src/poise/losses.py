"""The per-example loss that both training and gradient features differentiate.

Each example's loss is the mean cross-entropy over its own target tokens (labels != -100). Summing these
(features) makes example b's gradient independent of the rest of the batch and of padding; averaging them
over the effective batch (training) weights every example equally, whatever its length.
"""

from __future__ import annotations

import torch
from torch import nn

from poise.errors import PoiseError


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(b, t, V), (b, t) -> (b,): mean cross-entropy over each example's target tokens (labels != -100)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)  # (b, t-1)
    counts = (shift_labels != -100).sum(dim=1)  # (b,)
    if bool((counts == 0).any()):
        raise PoiseError("an example in the batch has no target token (it should have been excluded)")
    return token_loss.sum(dim=1) / counts
