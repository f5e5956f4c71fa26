"""Fixed (hand-tuned) loss weights: L = sum_t w_t L_t with w from the options."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_core.weighting.base import LinearCombination, StepContext, register_weighting


@register_weighting("fixed")
class FixedWeighting(LinearCombination):
    """Static weighted sum of the task losses, the classical hand-tuned scalarisation (no paper of its
    own; e.g. the static baselines of Kendall, Gal & Cipolla, 2018).

    Options: `weights` (required mapping task -> finite float >= 0, one entry per task, e.g.
    `{shape: 1.0, color: 0.5}`; missing or unknown task names raise ValueError naming them).
    Cost per step: one backward pass, no extra memory.
    """

    def __init__(
        self, task_names: Sequence[str], *, weights: Mapping[str, float] | None = None, **options: Any
    ) -> None:
        super().__init__(task_names, **options)
        if not isinstance(weights, Mapping):
            raise ValueError(f"weighting 'fixed' needs option weights: {{task: weight}} for {self.task_names}")
        missing = [t for t in self.task_names if t not in weights]
        unknown = [t for t in weights if t not in self.task_names]
        if missing or unknown:
            raise ValueError(
                f"fixed weights must name exactly the tasks {self.task_names}; "
                f"missing: {missing}, unknown: {unknown}"
            )
        values = [float(weights[t]) for t in self.task_names]
        bad = [t for t, v in zip(self.task_names, values) if not math.isfinite(v) or v < 0]
        if bad:
            raise ValueError(f"fixed weights must be finite and >= 0; bad for: {bad}")
        self.fixed = torch.tensor(values)

    def weights(self, losses: Tensor, ctx: StepContext) -> Tensor:
        return self.fixed.to(device=losses.device, dtype=losses.dtype)
