"""Random loss weighting. Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A
Litmus Test for Multi-Task Learning", TMLR 2022."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_core.weighting.base import LinearCombination, StepContext, register_weighting


@register_weighting("rlw")
class RandomLossWeighting(LinearCombination):
    """RLW (Lin et al., 2022): every step draws fresh weights w = softmax(z), z ~ N(0, I_K), from a
    private seeded generator (reproducible, independent of the global torch RNG). Weights sum to 1.

    Options: `seed` (int, default 0).
    Cost per step: one backward pass, no extra memory.
    """

    def __init__(self, task_names: Sequence[str], *, seed: int = 0, **options: Any) -> None:
        super().__init__(task_names, **options)
        self.generator = torch.Generator().manual_seed(int(seed))

    def sample(self) -> Tensor:
        return torch.softmax(torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64), 0)

    def weights(self, losses: Tensor, ctx: StepContext) -> Tensor:
        return self.sample().to(device=losses.device, dtype=losses.dtype)
