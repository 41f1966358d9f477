"""The per-example loss that both training and gradient features differentiate.

Each example's loss is the mean cross-entropy over its own target tokens (labels != -100). Summing these
(features) makes example b's gradient independent of the rest of the batch and of padding; averaging them
over the effective batch (training) weights every example equally, whatever its length.

`model_losses` computes the vocabulary projection only where it is needed: a pre-hook on the model's
output embedding (the LM head) hands it the final hidden states at the target positions alone, (1, n, h)
instead of (b, t, h), so the (b, t, V) logits, usually the largest tensor of a forward pass, are never
built. Whatever the model's forward does after the head (logit soft-capping, scaling) is elementwise and
so applies to the gathered rows unchanged. The hook sits on the head module itself, so it works through
peft, DDP and FSDP wrappers; a model whose forward does not call its head that way gets the full logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, t) labels -> rows (n,), positions (n,), targets (n,), counts (b,): the n (example, position) pairs
    whose next token is a target, row-major, and each example's number of targets."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100  # (b, t-1)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise PoiseError("an example in the batch has no target token (it should have been excluded)")
    rows, positions = mask.nonzero(as_tuple=True)
    return rows, positions, shift_labels[rows, positions], counts


def _output_head(model: nn.Module) -> nn.Module | None:
    inner = model
    for _ in range(4):  # DDP / FSDP / accelerate wrappers keep the model in `.module`
        getter = getattr(inner, "get_output_embeddings", None)
        if callable(getter):
            try:
                return getter()
            except (AttributeError, NotImplementedError):
                return None
        if not hasattr(inner, "module"):
            return None
        inner = inner.module
    return None


@contextmanager
def _head_sees(head: nn.Module | None, rows: torch.Tensor, positions: torch.Tensor) -> Iterator[dict[str, bool]]:
    """Within the block, `head` receives (1, n, h): the hidden states at (rows, positions) only."""
    seen = {"gathered": False}
    if head is None:
        yield seen
        return

    def gather(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.dim() != 3 or seen["gathered"]:
            return args
        seen["gathered"] = True
        return (hidden[rows, positions].unsqueeze(0), *args[1:])  # (1, n, h)

    handle = head.register_forward_pre_hook(gather)
    try:
        yield seen
    finally:
        handle.remove()


def model_losses(model: nn.Module, batch: dict[str, torch.Tensor], head: nn.Module | None = None,
                 **forward: Any) -> tuple[torch.Tensor, Any]:
    """Forward `batch` and return ((b,) per-example mean losses, the model output), computing the logits at
    target positions only (see the module docstring). `head` is the output embedding when the caller has it
    unwrapped; extra keyword arguments go to the forward."""
    labels = batch["labels"]
    rows, positions, targets, counts = target_positions(labels)
    head = head if head is not None else _output_head(model)
    with _head_sees(head, rows, positions) as seen:
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False, **forward)
    logits = output.logits
    if not seen["gathered"] or logits.shape[:2] != (1, rows.numel()):
        return per_example_losses(logits, labels), output  # the head was not called as expected: full logits
    token_loss = nn.functional.cross_entropy(logits[0].float(), targets, reduction="none")  # (n,)
    sums = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=token_loss.device).index_add_(0, rows,
                                                                                                     token_loss)
    return sums / counts, output
