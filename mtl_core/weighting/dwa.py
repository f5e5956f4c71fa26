"""Dynamic weight average. Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
CVPR 2019."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_core.weighting.base import LinearCombination, StepContext, register_weighting


def dwa_weights(previous: Tensor, before_previous: Tensor, temperature: float = 2.0) -> Tensor:
    """w = K softmax(r / T) with r_t = L_t(e-1) / L_t(e-2) (per-epoch mean losses)."""
    ratio = previous.double() / before_previous.double().clamp(min=1e-12)
    return previous.numel() * torch.softmax(ratio / temperature, dim=0)


@register_weighting("dwa")
class DynamicWeightAverage(LinearCombination):
    """DWA (Liu, Johns & Davison, 2019): w_t(e) = K exp(r_t / T) / sum_k exp(r_k / T), with
    r_t = L_t(e-1) / L_t(e-2) the ratio of the task's mean training losses of the last two epochs
    (a task whose loss falls slowly gets more weight). Weights sum to K; all are 1 until two epochs
    have been reported through `on_epoch_end` (i.e. during the first two epochs).

    Missing labels: a task with no labelled sample in an epoch (mean loss NaN) is skipped for that
    epoch, its ratio coming from its last two epochs with a loss; in a batch where a task is unlabelled
    the labelled tasks' weights are renormalised to sum K' (the method on those tasks alone).

    Options: `temperature` (T > 0, default 2.0).
    Cost per step: one backward pass, no extra memory; needs the trainer's `on_epoch_end` calls.
    """

    weights_sum = "num_tasks"

    def __init__(self, task_names: Sequence[str], *, temperature: float = 2.0, **options: Any) -> None:
        super().__init__(task_names, **options)
        if temperature <= 0:
            raise ValueError(f"dwa option temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        # per task, its last two finite epoch losses: row 1 the latest, row 0 the one before (NaN: none yet)
        self.history = torch.full((2, self.num_tasks), float("nan"), dtype=torch.float64)

    def on_epoch_end(self, epoch: int, mean_losses: dict[str, float]) -> None:
        missing = [t for t in self.task_names if t not in mean_losses]
        if missing:
            raise ValueError(f"dwa.on_epoch_end: no mean loss for tasks {missing}")
        latest = torch.tensor([float(mean_losses[t]) for t in self.task_names], dtype=torch.float64)
        seen = torch.isfinite(latest)  # a task without a labelled sample this epoch keeps its history
        self.history[0, seen] = self.history[1, seen]
        self.history[1, seen] = latest[seen]

    def current_weights(self) -> Tensor:
        if not bool(torch.isfinite(self.history).all()):  # some task has fewer than two epochs with a loss
            return torch.ones(self.num_tasks, dtype=torch.float64)
        return dwa_weights(self.history[1], self.history[0], self.temperature)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": self.history.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = state["history"].clone().to(torch.float64)

    def weights(self, losses: Tensor, ctx: StepContext) -> Tensor:
        return self.current_weights().to(device=losses.device, dtype=losses.dtype)
