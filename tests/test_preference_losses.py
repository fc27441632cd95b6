"""Preference losses against values computed by hand from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from orchard.methods.preference_losses import dpo_loss, ipo_loss, orpo_loss, simpo_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_matches_the_formula_with_and_without_label_smoothing():
    # h = (chosen - ref_chosen) - (rejected - ref_rejected) = 1 - (-1) = 2, so β h = 0.2.
    args = [torch.tensor([v]) for v in (-10.0, -14.0, -11.0, -13.0)]
    assert dpo_loss(*args, beta=0.1).item() == pytest.approx(-log_sigmoid(0.2), abs=1e-6)
    smoothed = -(0.9 * log_sigmoid(0.2) + 0.1 * log_sigmoid(-0.2))
    assert dpo_loss(*args, beta=0.1, label_smoothing=0.1).item() == pytest.approx(smoothed, abs=1e-6)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([-10.0], requires_grad=True)
    rejected = torch.tensor([-14.0], requires_grad=True)
    dpo_loss(chosen, rejected, torch.tensor([-11.0]), torch.tensor([-13.0]), beta=0.5).sum().backward()
    # d/d chosen of -log σ(β h) = -β (1 - σ(β h)) with β h = 1.
    expected = -0.5 * (1 - 1 / (1 + math.exp(-1.0)))
    assert chosen.grad.item() == pytest.approx(expected, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(-expected, abs=1e-6)


def test_ipo_matches_the_formula():
    args = [torch.tensor([v]) for v in (-10.0, -14.0, -11.0, -13.0)]
    assert ipo_loss(*args, beta=0.25).item() == pytest.approx((2.0 - 2.0) ** 2, abs=1e-6)
    assert ipo_loss(*args, beta=0.1).item() == pytest.approx((2.0 - 5.0) ** 2, abs=1e-5)


def test_simpo_matches_the_formula():
    loss = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(-log_sigmoid(2.0 * 0.5 - 0.5), abs=1e-6)


def test_orpo_matches_the_formula():
    chosen_mean, rejected_mean, nll = -0.5, -1.2, 0.5
    odds = lambda lp: math.log(math.exp(lp) / (1 - math.exp(lp)))  # noqa: E731
    expected = nll - 0.1 * log_sigmoid(odds(chosen_mean) - odds(rejected_mean))
    loss = orpo_loss(torch.tensor([chosen_mean]), torch.tensor([rejected_mean]), torch.tensor([nll]), weight=0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
