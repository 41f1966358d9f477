"""The per-example loss that both training and gradient features differentiate.

Each example's loss is the mean cross-entropy over its own target tokens (labels != -100). Summing these
(features) makes example b's gradient independent of the rest of the batch and of padding; averaging them
over the effective batch (training) weights every example equally, whatever its length.

`model_losses` computes the vocabulary projection only where it is needed: a pre-hook on the model's
output embedding (the LM head) hands it the final hidden states at the target positions alone, (1, n, h)
instead of (b, t, h), so the (b, t, V) logits, usually the largest tensor of a forward pass, are never
built. The hook sits on the head module itself, so it works through peft, DDP and FSDP wrappers.

When the gathered path is used, and why it gives the full-logit numbers:

- the model (or a `.module` it wraps) has `get_output_embeddings()`, and within the forward that module's
  first call with a 3-D input gets exactly (b, t, h) for the (b, t) batch: the final hidden states, one
  row per input position. The hidden states are computed by the same operations as before (the decoder
  body does not see the hook), so they are bit for bit the same; only the head and the cross-entropy run
  on n rows instead of b*t, in float32 as before;
- the logits the forward returns have shape (1, n, V'). What a causal LM's forward does after its head is
  per position: in transformers 5.25 (every `*ForCausalLM`/conditional-generation forward surveyed) it is
  nothing, or logit soft-capping `c * tanh(z / c)` (Gemma 2/3, `final_logit_softcapping`), a constant
  scale (Cohere `logit_scale`, Granite `logits_scaling`, `output_multiplier`), a slice or mask of the
  vocabulary axis, or a bias per vocabulary entry. Each maps a position's logits to that position's
  logits, so it commutes with picking positions and applies to the gathered rows exactly.

Otherwise the loss is computed from the full logits, as `per_example_losses` always did: slower, never
different. No head found, the head never called, or called first with another shape (a model that
prepends virtual tokens): the hook leaves the input alone. Gathered logits of another shape come back (the
forward reshaped them): the forward is run once more without the hook.
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
def _head_sees(head: nn.Module | None, rows: torch.Tensor, positions: torch.Tensor,
               shape: tuple[int, int]) -> Iterator[dict[str, bool]]:
    """Within the block, `head` receives (1, n, h): the hidden states at (rows, positions) only, if its first
    3-D input is (b, t, h) with (b, t) = `shape` (the batch); any other first input leaves it alone."""
    seen = {"called": False, "gathered": False}
    if head is None:
        yield seen
        return

    def gather(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or seen["called"]:
            return args
        seen["called"] = True
        if tuple(hidden.shape[:2]) != shape:
            return args  # not one row per input position: the full logits
        seen["gathered"] = True
        return (hidden[rows, positions].unsqueeze(0), *args[1:])  # (1, n, h)

    handle = head.register_forward_pre_hook(gather)
    try:
        yield seen
    finally:
        handle.remove()


#: What `model_losses` reports as its `path`: the logits at target positions only, or one of the fallbacks.
GATHERED = "target positions"
FULL_NO_HEAD = "full logits (no output head found, or not called with the batch's hidden states)"
FULL_RESHAPED = "full logits (the forward changed the gathered logits' shape; run again without the hook)"


def model_losses(model: nn.Module, batch: dict[str, torch.Tensor], head: nn.Module | None = None,
                 path: dict[str, str] | None = None, **forward: Any) -> tuple[torch.Tensor, Any]:
    """Forward `batch` and return ((b,) per-example mean losses, the model output), computing the logits at
    target positions only (see the module docstring). `head` is the output embedding when the caller has it
    unwrapped; `path`, when given, receives "logits": GATHERED or the fallback taken; extra keyword arguments go
    to the forward."""
    path = {} if path is None else path
    labels = batch["labels"]
    rows, positions, targets, counts = target_positions(labels)
    head = head if head is not None else _output_head(model)

    def run() -> Any:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], use_cache=False, **forward)

    with _head_sees(head, rows, positions, tuple(labels.shape)) as seen:
        output = run()
    if seen["gathered"] and tuple(output.logits.shape[:2]) == (1, rows.numel()):
        path["logits"] = GATHERED
        token_loss = nn.functional.cross_entropy(output.logits[0].float(), targets, reduction="none")  # (n,)
        sums = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=token_loss.device)
        return sums.index_add_(0, rows, token_loss) / counts, output
    path["logits"] = FULL_RESHAPED if seen["gathered"] else FULL_NO_HEAD
    if seen["gathered"]:
        del output
        output = run()  # the forward changed the gathered logits' shape: again without the hook, full logits
    return per_example_losses(output.logits, labels), output  # the head was not called as expected: full logits
