"""Exact per-example LoRA gradients from one batched forward/backward pass, with hooks.

peft's `lora_A` and `lora_B` are plain `nn.Linear` modules (the LoRA scaling is applied outside them),
so the generic rule for a linear layer y = x W^T suffices: with the input x (b, t, in) taken by a
forward hook and the gradient delta (b, t, out) of the output taken by a hook on that output tensor,
example b's weight gradient is sum_t delta[b, t] (outer) x[b, t], one einsum per module.

The loss differentiated is the SUM over examples of each example's mean token loss, so example b's
gradient is the gradient of its own loss alone, whatever else is in the batch and however it is padded
(padding positions have zero loss and so zero delta).

We differentiate with respect to the embedding output rather than the LoRA weights: autograd then
skips the batch-summed weight gradients it would otherwise also compute, and the per-example ones
come from the hooks. The LoRA weights need not require grad at all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from poise.errors import PoiseError
from poise.losses import model_losses

GradientSink = Callable[[str, torch.Tensor], None]
"""Receives (parameter name, per-example gradient (b, out, in)) as soon as backward has it."""


def lora_linear_modules(model: nn.Module, adapter: str = "default") -> dict[str, nn.Linear]:
    """LoRA weight name (as in `named_parameters()`) -> the `nn.Linear` holding it, in that order."""
    modules: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if name.endswith((f"lora_A.{adapter}", f"lora_B.{adapter}")) and isinstance(module, nn.Linear):
            if module.bias is not None:
                raise PoiseError(f"{name}: LoRA layers with a bias are not supported")
            modules[f"{name}.weight"] = module
    if not modules:
        raise PoiseError("the model has no LoRA layers (attach or load a peft LoRA adapter first)")
    order = [n for n, _ in model.named_parameters() if n in modules]
    return {n: modules[n] for n in order}


def per_example_linear_grad(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(b, t, in), (b, t, out) -> (b, out, in): each example's weight gradient of y = x W^T."""
    return torch.einsum("bto,bti->boi", delta, x)


@contextmanager
def capture_lora_gradients(model: nn.Module, sink: GradientSink, adapter: str = "default"):
    """Within the block, every backward pass sends each LoRA weight's per-example gradient to `sink`."""
    modules = lora_linear_modules(model, adapter)
    handles = []

    def forward_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x = inputs[0].detach()  # (b, t, in)

            def on_grad(delta: torch.Tensor) -> None:  # delta: (b, t, out)
                sink(name, per_example_linear_grad(x.float(), delta.float()))

            output.register_hook(on_grad)

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(forward_hook(name)))
    try:
        yield modules
    finally:
        for handle in handles:
            handle.remove()


def _embedding_output_requires_grad(model: nn.Module, keep: list) -> Any:
    """Make the input embeddings' output a leaf that requires grad (the tensor we differentiate for)."""
    embeddings = model.get_input_embeddings()

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.detach().requires_grad_(True)
        keep.append(output)
        return output

    return embeddings.register_forward_hook(hook)


def backward_per_example(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward the batch, backward the sum of per-example mean losses (hooks receive the gradients).

    Returns the per-example losses (b,). The model should be in eval mode (no dropout).
    """
    keep: list[torch.Tensor] = []
    handle = _embedding_output_requires_grad(model, keep)
    try:
        with torch.enable_grad():
            losses, _ = model_losses(model, batch)  # logits at target positions only
            # allow_unused: when model_losses had to rerun the forward, the first run's embeddings are unused
            grads = torch.autograd.grad(losses.sum(), keep, allow_unused=True)
            if all(g is None for g in grads):
                raise PoiseError("the loss does not depend on the input embeddings' output")
    finally:
        handle.remove()
    return losses.detach()
