"""The Adam map: turn a training example's gradient into the direction Adam would move along.

LESS scores a training example by the update it would cause, not by its raw gradient: with the
warmup checkpoint's stored moments m (`exp_avg`) and v (`exp_avg_sq`), one more Adam step on the
example alone would move the parameters along Γ (docs/design.md §2.3). Two formulas are offered:

- ``"less"`` (default; what LESS's code computes): m' = β1·m + (1−β1)·g, v' = β2·v + (1−β2)·g²,
  Γ = m' / sqrt(v' + ε) — ε *inside* the root and no bias correction.
- ``"textbook"`` (``"adam"`` is accepted as a synonym): the update of `torch.optim.Adam` /
  Kingma & Ba, with t = step + 1: m̂ = m'/(1−β1^t), v̂ = v'/(1−β2^t), Γ = m̂ / (sqrt(v̂) + ε), so that
  one optimizer step with learning rate lr changes the parameters by −lr·Γ.

The map is elementwise, so it must be applied to the full-dimensional gradient *before* projecting.
Everything is computed in float32 or wider: bf16/fp16 inputs are upcast, because v' + ε underflows in
half precision (ε = 1e-8 is below fp16's smallest normal and loses most digits in bf16).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from poise.checkpoint import ADAM_BETAS, ADAM_EPS
from poise.errors import PoiseError
from poise.options import AdamFormula

__all__ = ["adam_direction"]


def adam_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    beta1: float = ADAM_BETAS[0],
    beta2: float = ADAM_BETAS[1],
    eps: float = ADAM_EPS,
    mode: AdamFormula | Literal["adam"] = "less",
    step: int | None = None,
) -> Tensor:
    """The Adam direction Γ of every row of `grad` (b, n), from the moments `exp_avg`, `exp_avg_sq` (n,).

    The moments are broadcast over the batch: each example is mapped as if it were the only one in the
    next step. `step` is the number of optimizer steps already taken (torch's ``state["step"]``); it is
    required by the bias-corrected ``"textbook"`` formula and ignored by ``"less"``. The result is
    (b, n) in the promoted dtype of the inputs, at least float32, on `grad`'s device.
    """
    if mode == "adam":
        mode = "textbook"
    if mode not in ("less", "textbook"):
        raise PoiseError(f"adam_direction: unknown mode {mode!r}; choose 'less' or 'textbook'")
    if grad.dim() != 2:
        raise PoiseError(f"adam_direction: grad must be 2-D (batch, n), got shape {tuple(grad.shape)}")
    n = grad.shape[1]
    for label, moment in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if moment.dim() != 1 or moment.shape[0] != n:
            raise PoiseError(
                f"adam_direction: {label} has shape {tuple(moment.shape)} but the gradient has {n} columns "
                f"(grad shape {tuple(grad.shape)}); expected ({n},)"
            )
    for label, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise PoiseError(f"adam_direction: {label} must be in [0, 1), got {value}")
    if eps < 0:
        raise PoiseError(f"adam_direction: eps must be >= 0, got {eps}")
    if mode == "textbook":
        if step is None:
            raise PoiseError("adam_direction: the textbook (bias-corrected) formula needs step, the number of "
                             "optimizer steps already taken")
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise PoiseError(f"adam_direction: step must be a non-negative integer, got {step!r}")

    dtype = torch.promote_types(torch.promote_types(grad.dtype, exp_avg.dtype), exp_avg_sq.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    g = grad.to(dtype)  # (b, n)
    m = exp_avg.to(device=grad.device, dtype=dtype)  # (n,)
    v = exp_avg_sq.to(device=grad.device, dtype=dtype)  # (n,)

    m_new = beta1 * m + (1.0 - beta1) * g  # (b, n)
    v_new = beta2 * v + (1.0 - beta2) * g.square()  # (b, n)
    if mode == "less":
        return m_new / torch.sqrt(v_new + eps)
    t = int(step) + 1
    m_hat = m_new / (1.0 - beta1**t)  # (b, n)
    v_hat = v_new / (1.0 - beta2**t)  # (b, n)
    return m_hat / (torch.sqrt(v_hat) + eps)
