"""What one epoch has done so far: steps, images, seconds and the running per-task sums.

An object of its own (`EpochProgress`), so that a checkpoint taken in the middle of an epoch can hold it
and a resumed run continue the epoch's statistics where the killed one stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mtl_core.runtime import Distributed
from mtl_core.tasks import MISSING_LABEL


class EpochStats:
    """Running per-task loss (per labelled sample), accuracy and method weight over one training epoch.

    The sums stay on the training device: nothing here waits for the GPU; `summary()` (once per epoch)
    and `mean_loss()` (once per logging interval) are the only host syncs."""

    def __init__(self, tasks: list[str], device: torch.device) -> None:
        self.tasks = tasks
        k = len(tasks)
        self.loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.correct = torch.zeros(k, dtype=torch.int64, device=device)
        self.count = torch.zeros(k, dtype=torch.int64, device=device)
        self.weight_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.steps = 0

    def update(
        self, losses: dict[str, torch.Tensor], logits: dict[str, torch.Tensor], y: torch.Tensor, weights: torch.Tensor
    ) -> None:
        labelled = y != MISSING_LABEL  # (N, K)
        n = labelled.sum(0)
        loss = torch.stack([losses[t].detach().double() for t in self.tasks])
        pred = torch.stack([logits[t].detach().argmax(1) for t in self.tasks], dim=1)
        self.loss_sum += loss * n
        self.correct += ((pred == y) & labelled).sum(0)
        self.count += n
        self.weight_sum += weights.to(self.weight_sum.device, torch.float64)
        self.steps += 1

    def mean_loss(self) -> float:
        """Mean over tasks of the per-sample training loss so far (a host sync: call it rarely)."""
        per_task = self.loss_sum / self.count.clamp(min=1)
        return float(per_task[self.count > 0].mean()) if bool((self.count > 0).any()) else float("nan")

    def summary(self) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """({task: {loss, accuracy}}, {task: mean method weight per step}); NaN for a task never labelled."""
        loss, correct, count = self.loss_sum.cpu(), self.correct.cpu(), self.count.cpu()
        weights = (self.weight_sum / max(self.steps, 1)).cpu()
        stats = {
            t: {
                "loss": float(loss[k] / count[k]) if count[k] else float("nan"),
                "accuracy": float(correct[k] / count[k]) if count[k] else float("nan"),
            }
            for k, t in enumerate(self.tasks)
        }
        return stats, {t: float(weights[k]) for k, t in enumerate(self.tasks)}

    _SUMS = ("loss_sum", "correct", "count", "weight_sum")
    _RANK_SUMS = ("loss_sum", "correct", "count")  # per-rank sums; the method weights are the same on every rank

    def reduced(self, dist: Distributed) -> EpochStats:
        """The global batch's sums over all ranks (a collective: every rank calls it at the same step)."""
        if not dist.enabled:
            return self
        out = EpochStats(self.tasks, self.loss_sum.device)
        out.steps, out.weight_sum = self.steps, self.weight_sum.clone()
        for name in self._RANK_SUMS:
            setattr(out, name, dist.sum(getattr(self, name)))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, **{name: getattr(self, name).cpu().clone() for name in self._SUMS}}

    def load_state_dict(self, state: dict[str, Any], sums: bool = True) -> None:
        """`sums=False`: the steps only, the per-rank sums left at zero (a distributed resume gives rank 0
        the checkpoint's global sums, the other ranks start theirs at zero)."""
        self.steps = int(state["steps"])
        for name in self._SUMS:
            if sums or name not in self._RANK_SUMS:
                getattr(self, name).copy_(state[name])


@dataclass
class EpochProgress:
    """How far one epoch has come: what a mid-epoch checkpoint must hold to continue it exactly."""

    stats: EpochStats
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    skipped: int = 0  # batches dropped for a non-finite loss or gradient (on_nonfinite: skip)
    skipped_at: list[str] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "stats": self.stats.state_dict(), "steps": self.steps, "images": self.images,
            "seconds": self.seconds, "skipped": self.skipped, "skipped_at": list(self.skipped_at),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], sums: bool = True) -> None:
        self.stats.load_state_dict(state["stats"], sums)
        self.steps, self.seconds = int(state["steps"]), float(state["seconds"])
        self.images = int(state["images"]) if sums else 0
        self.skipped, self.skipped_at = int(state["skipped"]), list(state["skipped_at"])

    def reduced(self, dist: Distributed) -> EpochProgress:
        """This epoch so far over all ranks: summed statistics and images (seconds: this rank's)."""
        if not dist.enabled:
            return self
        images = int(dist.sum(torch.tensor([self.images], dtype=torch.int64)).item())
        return EpochProgress(self.stats.reduced(dist), self.steps, images, self.seconds, self.skipped, list(self.skipped_at))
