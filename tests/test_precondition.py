"""The Adam map of training gradients (poise.features.precondition, docs/design.md §2.3)."""

from __future__ import annotations

import math

import pytest
import torch

from poise.errors import PoiseError
from poise.features import adam_direction


def test_less_formula_matches_hand_computation() -> None:
    grad = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, -1e-3]])
    exp_avg = torch.tensor([0.1, 0.2, -0.3])
    exp_avg_sq = torch.tensor([0.01, 0.04, 0.0])
    expected = []
    for row in grad.tolist():
        out = []
        for g, m, v in zip(row, exp_avg.tolist(), exp_avg_sq.tolist(), strict=True):
            m_new = 0.9 * m + 0.1 * g
            v_new = 0.999 * v + 0.001 * g * g
            out.append(m_new / math.sqrt(v_new + 1e-8))
        expected.append(out)
    got = adam_direction(grad, exp_avg, exp_avg_sq)
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_less_puts_eps_inside_the_root_without_bias_correction() -> None:
    # A tiny gradient on fresh moments: v' = 1e-13, so where eps sits decides everything.
    grad = torch.tensor([[1e-5]], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    less = adam_direction(grad, zero, zero).item()
    assert less == pytest.approx(1e-6 / math.sqrt(1e-13 + 1e-8), rel=1e-12)  # ~0.01
    assert less != pytest.approx(1e-6 / (math.sqrt(1e-13) + 1e-8), rel=0.5)  # eps outside: ~3.07
    # The textbook formula at step 0 bias-corrects to m_hat = g, v_hat = g^2: ~ sign(g).
    textbook = adam_direction(grad, zero, zero, mode="textbook", step=0).item()
    assert textbook == pytest.approx(1e-5 / (1e-5 + 1e-8), rel=1e-9)


@pytest.mark.parametrize("step", [0, 1, 7])
def test_textbook_mode_equals_one_torch_adam_step(step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    n, lr, betas, eps = 50, 1e-3, (0.85, 0.99), 1e-8
    theta = torch.randn(n, generator=gen, dtype=torch.float64)
    exp_avg = torch.randn(n, generator=gen, dtype=torch.float64) * 0.01
    exp_avg_sq = torch.rand(n, generator=gen, dtype=torch.float64) * 1e-4
    grads = torch.randn(3, n, generator=gen, dtype=torch.float64) * 0.1  # (b, n)

    direction = adam_direction(grads, exp_avg, exp_avg_sq, beta1=betas[0], beta2=betas[1], eps=eps,
                               mode="textbook", step=step)  # (b, n)
    for row in range(3):  # each example as if it were the next step alone
        param = torch.nn.Parameter(theta.clone())
        optimizer = torch.optim.Adam([param], lr=lr, betas=betas, eps=eps, foreach=False)
        optimizer.state[param] = {
            "step": torch.tensor(float(step)),  # steps already taken
            "exp_avg": exp_avg.clone(),
            "exp_avg_sq": exp_avg_sq.clone(),
        }
        param.grad = grads[row].clone()
        optimizer.step()
        update = param.detach() - theta  # = -lr * direction
        torch.testing.assert_close(-update / lr, direction[row], rtol=1e-8, atol=1e-10)
    synonym = adam_direction(grads, exp_avg, exp_avg_sq, beta1=betas[0], beta2=betas[1], eps=eps, mode="adam",
                             step=step)
    assert torch.equal(synonym, direction)


def test_moments_broadcast_over_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(5, 20, generator=gen)
    exp_avg, exp_avg_sq = torch.randn(20, generator=gen), torch.rand(20, generator=gen)
    batch = adam_direction(grads, exp_avg, exp_avg_sq)
    for row in range(5):
        assert torch.equal(batch[row : row + 1], adam_direction(grads[row : row + 1], exp_avg, exp_avg_sq))


def test_half_precision_inputs_are_computed_in_float32() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = (torch.randn(2, 30, generator=gen) * 1e-3).bfloat16()
    exp_avg = (torch.randn(30, generator=gen) * 1e-4).bfloat16()
    exp_avg_sq = (torch.rand(30, generator=gen) * 1e-8).bfloat16()
    got = adam_direction(grads, exp_avg, exp_avg_sq)
    assert got.dtype == torch.float32
    assert torch.equal(got, adam_direction(grads.float(), exp_avg.float(), exp_avg_sq.float()))
    assert torch.isfinite(got).all()


def test_shape_mismatches_raise_poise_error_naming_the_culprit() -> None:
    grad = torch.zeros(2, 4)
    with pytest.raises(PoiseError, match=r"exp_avg has shape \(5,\) but the gradient has 4 columns"):
        adam_direction(grad, torch.zeros(5), torch.zeros(4))
    with pytest.raises(PoiseError, match=r"exp_avg_sq has shape \(1, 4\)"):
        adam_direction(grad, torch.zeros(4), torch.zeros(1, 4))
    with pytest.raises(PoiseError, match="grad must be 2-D"):
        adam_direction(torch.zeros(4), torch.zeros(4), torch.zeros(4))
    with pytest.raises(PoiseError, match="needs step"):
        adam_direction(grad, torch.zeros(4), torch.zeros(4), mode="textbook")
    with pytest.raises(PoiseError, match="unknown mode"):
        adam_direction(grad, torch.zeros(4), torch.zeros(4), mode="sgd")  # type: ignore[arg-type]
