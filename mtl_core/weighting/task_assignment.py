"""Learned softmax task assignment with an entropy regulariser."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_core.weighting.base import LinearCombination, StepContext, register_weighting


def entropy(weights: Tensor) -> Tensor:
    return -(weights * weights.clamp(min=1e-12).log()).sum()


@register_weighting("task_assignment")
class TaskAssignment(LinearCombination):
    """Task weights w = softmax(theta) over learned logits theta (init 0: equal weights 1/K), learned
    jointly with the network by gradient descent on one objective

        J = sum_t w_t L_t - lambda * H(w),   H(w) = -sum_t w_t log w_t.

    There is no single reference paper: it is the naive "learn the weights by descent" baseline
    (cf. the trivial solution discussed by Kendall, Gal & Cipolla, 2018), made non-degenerate. Without
    the entropy term, descent on sum_t w_t L_t drives w onto the task with the smallest loss (w -> e_t).
    We chose the entropy regulariser over the log-loss form: for fixed losses the theta-part of J is
    minimised by the Gibbs distribution w* = softmax(-L / lambda), so lambda is a temperature -- large
    lambda -> equal weights, small lambda -> collapse onto the easiest task. The default lambda = 1.0
    (rather than 0.1) keeps w* moderate for classification losses of order 1 (losses 0.5 vs 1.5 give
    weights 0.73 / 0.27; with 0.1 it would be 0.99995 / 0.00005, i.e. the collapse).
    The logits are `parameters()` for the trainer's optimizer. Reported weights: w (sum to 1).

    Options: `entropy` (lambda >= 0, default 1.0).
    Cost per step: one backward pass; K extra parameters.
    """

    weights_sum = "one"  # a batch with unlabelled tasks: the softmax over the labelled tasks' logits

    def __init__(self, task_names: Sequence[str], *, entropy: float = 1.0, **options: Any) -> None:
        super().__init__(task_names, **options)
        if entropy < 0:
            raise ValueError(f"task_assignment option entropy must be >= 0, got {entropy}")
        self.entropy = float(entropy)
        self.logits = nn.Parameter(torch.zeros(self.num_tasks))

    def parameters(self) -> list[nn.Parameter]:
        return [self.logits]

    def weights(self, losses: Tensor, ctx: StepContext) -> Tensor:
        return torch.softmax(self.logits, dim=0).to(losses.dtype)

    def regulariser(self, weights: Tensor, losses: Tensor, labelled: Tensor) -> Tensor:
        return -self.entropy * entropy(weights)
