"""Homoscedastic-uncertainty weighting. Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty
to Weigh Losses for Scene Geometry and Semantics", CVPR 2018."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_core.weighting.base import LinearCombination, StepContext, register_weighting


@register_weighting("uncertainty")
class UncertaintyWeighting(LinearCombination):
    """Uncertainty weighting (Kendall et al., 2018), CLASSIFICATION form of the paper (eq. 10):
    L = sum_t (1 / sigma_t^2) L_t + log sigma_t, learned through s_t = log sigma_t^2, i.e.

        L = sum_t exp(-s_t) L_t + s_t / 2,   dL/ds_t = -exp(-s_t) L_t + 1/2,

    so at the optimum exp(-s_t) = 1 / (2 L_t). (The regression form would be exp(-s_t) L_t / 2 + s_t / 2.)
    Reported weights: exp(-s_t). The s_t are `parameters()` for the trainer's optimizer.

    Options: `init` (float, initial s_t, default 0.0).
    Cost per step: one backward pass; K extra parameters.
    """

    def __init__(self, task_names: Sequence[str], *, init: float = 0.0, **options: Any) -> None:
        super().__init__(task_names, **options)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init)))

    def parameters(self) -> list[nn.Parameter]:
        return [self.log_vars]

    def weights(self, losses: Tensor, ctx: StepContext) -> Tensor:
        return torch.exp(-self.log_vars).to(losses.dtype)

    def regulariser(self, weights: Tensor, losses: Tensor, labelled: Tensor) -> Tensor:
        """sum_t s_t / 2 over the labelled tasks: an unlabelled task's s_t gets no gradient."""
        return torch.where(labelled, self.log_vars, torch.zeros_like(self.log_vars)).sum() / 2
