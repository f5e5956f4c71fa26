"""Equal weighting: the plain multi-task baseline, L = (1/K) * sum_t L_t. One backward pass per step."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_core.weighting.base import LinearCombination, StepContext, register_weighting


@register_weighting("equal")
class EqualWeighting(LinearCombination):
    """Every task weighs 1/K (the uniform scalarisation every MTL survey uses as its baseline); in a
    batch where only K' tasks are labelled, each of them weighs 1/K'."""

    weights_sum = "one"

    def weights(self, losses: Tensor, ctx: StepContext) -> Tensor:
        return torch.full_like(losses, 1.0 / losses.numel())
