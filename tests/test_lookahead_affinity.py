"""Lookahead affinity (mtl_core/training/lookahead_affinity.py) against a two-task case computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mtl_core.training.lookahead_affinity import LookaheadAffinityTracker


class Scalar(nn.Module):
    """One shared scalar θ; both tasks read θ·x; a BatchNorm1d whose running statistics must not move."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta))
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.bn(x)  # updates running statistics in training mode
        return {"a": self.theta * x, "b": self.theta * x}


def losses_of(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """L_a = (θx − 1)², L_b = (θx + 1)²: a step for a (θ up) raises b's loss, a step for b lowers a's."""
    return {"a": ((logits["a"] - 1) ** 2).mean(), "b": ((logits["b"] + 1) ** 2).mean()}


def test_the_two_task_case_computed_by_hand() -> None:
    """θ = 0.5, x = 1, η = 0.1: L_a = 0.25, L_b = 2.25, g_a = 2(θ−1) = −1, g_b = 2(θ+1) = 3.
    A step on a: θ' = 0.6, L_a' = 0.16, L_b' = 2.56; on b: θ' = 0.2, L_a' = 0.64, L_b' = 1.44.
    Z[s, t] = (1 − L_t'/L_t) / η."""
    model = Scalar(0.5).train()
    x = torch.ones(4, 1)
    losses = losses_of(model(x))
    bn_before = {n: b.clone() for n, b in model.named_buffers()}
    tracker = LookaheadAffinityTracker(["a", "b"], every=1)
    z = tracker.measure(model, losses_of, x, losses, [model.theta], {id(model.theta): 0.1})
    expected = np.array([[(1 - 0.16 / 0.25) / 0.1, (1 - 2.56 / 2.25) / 0.1], [(1 - 0.64 / 0.25) / 0.1, (1 - 1.44 / 2.25) / 0.1]])
    np.testing.assert_allclose(z, expected, rtol=1e-5)
    assert z[0, 1] < 0 and z[1, 0] < 0  # the two tasks pull θ apart: each step hurts the other task
    assert model.theta.item() == 0.5  # the real parameters are untouched
    assert all(torch.equal(bn_before[n], b) for n, b in model.named_buffers())  # BatchNorm statistics too
    losses["a"].backward()  # the step's own graph is still there for its backward
    assert model.theta.grad == pytest.approx(-1.0)


def test_epoch_average_counts_a_pair_only_where_both_tasks_are_labelled() -> None:
    model = Scalar(0.5).train()
    x = torch.ones(4, 1)
    tracker = LookaheadAffinityTracker(["a", "b"], every=1)
    first = tracker.measure(model, losses_of, x, losses_of(model(x)), [model.theta], {id(model.theta): 0.1})
    tracker.measure(model, losses_of, x, losses_of(model(x)), [model.theta], {id(model.theta): 0.1}, labelled=torch.tensor([True, False]))
    mean = tracker.epoch_average()
    assert mean[0, 0] == pytest.approx(first[0, 0])  # measured twice, the same value both times
    assert mean[0, 1] == pytest.approx(first[0, 1]) and mean[1, 1] == pytest.approx(first[1, 1])  # measured once
    assert tracker.epoch_average() is None  # reset after reading


def test_the_learning_rate_scales_the_step_and_the_division() -> None:
    """For small steps Z tends to g_s·g_t / L_t whatever η (first order): η = 1e-4 and 1e-3 agree."""
    model = Scalar(0.5).train()
    x = torch.ones(4, 1)
    z = [
        LookaheadAffinityTracker(["a", "b"], 1).measure(model, losses_of, x, losses_of(model(x)), [model.theta], {id(model.theta): eta})
        for eta in (1e-4, 1e-3)
    ]
    g_a, g_b, l_a, l_b = -1.0, 3.0, 0.25, 2.25
    first_order = np.array([[g_a * g_a / l_a, g_a * g_b / l_b], [g_b * g_a / l_a, g_b * g_b / l_b]])
    np.testing.assert_allclose(z[0], first_order, rtol=2e-3)
    np.testing.assert_allclose(z[1], first_order, rtol=2e-2)
