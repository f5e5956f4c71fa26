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

    In a batch where only K' tasks are labelled, K' normals are drawn for them (the step the method
    would take on those tasks alone); the generator is part of `state_dict()`.

    Options: `seed` (int, default 0).
    Cost per step: one backward pass, no extra memory.
    """

    weights_sum = "one"

    def __init__(self, task_names: Sequence[str], *, seed: int = 0, **options: Any) -> None:
        super().__init__(task_names, **options)
        self.generator = torch.Generator().manual_seed(int(seed))

    def sample(self, labelled: Tensor | None = None) -> Tensor:
        """softmax(z), z ~ N(0, I) over the labelled tasks (all if None), 0 for the others."""
        if labelled is None or bool(labelled.all()):
            return torch.softmax(torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64), 0)
        w = torch.zeros(self.num_tasks, dtype=torch.float64)
        z = torch.randn(int(labelled.sum()), generator=self.generator, dtype=torch.float64)
        w[labelled] = torch.softmax(z, 0)
        return w

    def weights(self, losses: Tensor, ctx: StepContext) -> Tensor:
        return self.sample(self.labelled_mask(ctx)).to(device=losses.device, dtype=losses.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
