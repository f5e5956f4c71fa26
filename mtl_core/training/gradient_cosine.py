"""Which tasks pull the shared parameters the same way, measured while training.

The pairwise cosine similarity of task gradients on the shared parameters, measured every N steps and
averaged per epoch (positive: the tasks pull the backbone the same way; negative: conflicting gradients,
the situation PCGrad (Yu et al. 2020) and CAGrad (Liu et al. 2021) address), and per task what the
optimizer's step does for it. A measurement costs K extra backward passes through the network, on
measured steps only. The train stage writes the per-epoch matrices to `reports/task_gradient_cosine.json`;
the compare stage proposes task groups from them (evaluation/task_grouping.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_core.weighting.gradients import task_gradients, trainable


def cosine_matrix(grads: Tensor) -> np.ndarray:
    """K x K cosine similarities of the rows of G (K, D); a zero gradient gives 0 similarity."""
    g = grads.detach().double()
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).cpu().numpy()


def take_mean(total: np.ndarray, count: np.ndarray) -> np.ndarray | None:
    """The elementwise mean `total / count` (NaN where nothing was counted; None where nothing at all),
    then both reset to zero: an accumulated matrix's average over one epoch."""
    if not count.any():
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
    total[:] = 0
    count[:] = 0
    return mean


class GradientCosineTracker:
    """Per epoch, from the task gradients G (K, P) on the shared parameters of every N-th step:

    * the mean task-gradient cosine matrix; a pair of tasks is averaged over the measured batches where
      both are labelled (an unlabelled task's zero gradient is no evidence that it is unrelated); a
      pair never measured together is NaN;
    * per task, the gradient norm |g_t|, and what the optimizer's actual step d = theta' - theta (after
      the weighting method, clipping, Adam's scaling and the schedule) does for that task: its
      alignment cos(-d, g_t) and its *effective learning rate* -d.g_t / |g_t|^2, the plain-SGD step size
      that would lower task t's loss as much to first order. Under Adam one task's effective rate falls
      when other tasks' gradients dominate the shared second-moment estimate or point elsewhere, which
      is how one multi-task step can serve a task less than its single-task step does.
    """

    STATS = ("grad_norm", "effective_lr", "step_alignment")

    def __init__(self, task_names: Sequence[str], every: int) -> None:
        if every < 1:
            raise ValueError(f"measure every N >= 1 steps, got {every}")
        self.task_names = list(task_names)
        self.every = every
        k = len(task_names)
        self._sum = np.zeros((k, k))
        self._count = np.zeros((k, k))
        self._stat_sum = {name: np.zeros(k) for name in self.STATS}
        self._stat_count = np.zeros(k)
        self._pending: tuple[Tensor, Tensor, np.ndarray] | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(
        self, losses: dict[str, Tensor], shared_params: Sequence[Tensor], labelled: Tensor | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> np.ndarray:
        """Take the K task gradients on the shared parameters (graph kept for the real backward);
        `labelled` (K,) bool marks the tasks with a labelled sample in the batch (None: all). Call
        `after_step` once the optimizer has stepped to record what the step did per task."""
        params = trainable(shared_params)
        grads = task_gradients([losses[t] for t in self.task_names], params, retain_graph=True)
        if reduce is not None:  # distributed: the global batch's gradients (their mean over the ranks)
            grads = reduce(grads)
        matrix = cosine_matrix(grads)
        seen = np.ones(len(self.task_names), dtype=bool) if labelled is None else np.asarray(labelled, dtype=bool)
        both = np.outer(seen, seen)
        self._sum += np.where(both, matrix, 0.0)
        self._count += both
        before = torch.cat([p.detach().reshape(-1) for p in params]).clone() if params else torch.zeros(0)
        self._pending = (grads.detach(), before, seen)
        return matrix

    def after_step(self, shared_params: Sequence[Tensor]) -> None:
        """The per-task statistics of the step measured last (no-op if none is pending)."""
        if self._pending is None:
            return
        grads, before, seen = self._pending
        self._pending = None
        params = trainable(shared_params)
        if not params:
            return
        step = torch.cat([p.detach().reshape(-1) for p in params]) - before
        g = grads.double()
        d = step.double().to(g.device)
        norm = g.norm(dim=1)
        along = -(g @ d)  # first-order decrease of each task's loss
        stats = {
            "grad_norm": norm,
            "effective_lr": along / norm.pow(2).clamp_min(1e-30),
            "step_alignment": along / (norm * d.norm()).clamp_min(1e-30),
        }
        seen = seen & (norm.cpu().numpy() > 0)
        for name, values in stats.items():
            self._stat_sum[name] += np.where(seen, values.cpu().numpy(), 0.0)
        self._stat_count += seen

    def discard(self) -> None:
        """Forget the pending measurement (the step was skipped: nothing to relate it to)."""
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        """The epoch's running sums (float64 tensors), for a checkpoint in the middle of an epoch; taken
        between steps, when no measurement is pending."""
        return {
            "sum": torch.from_numpy(self._sum.copy()), "count": torch.from_numpy(self._count.copy()),
            "stat_sum": {n: torch.from_numpy(v.copy()) for n, v in self._stat_sum.items()},
            "stat_count": torch.from_numpy(self._stat_count.copy()),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum, self._count = state["sum"].numpy().copy(), state["count"].numpy().copy()
        self._stat_sum = {n: state["stat_sum"][n].numpy().copy() for n in self.STATS}
        self._stat_count = state["stat_count"].numpy().copy()
        self._pending = None

    def epoch_task_stats(self) -> dict[str, dict[str, float]]:
        """{task: {grad_norm, effective_lr, step_alignment}} averaged over the epoch's measured steps
        (NaN for a task never measured), then reset."""
        with np.errstate(invalid="ignore", divide="ignore"):
            means = {n: np.where(self._stat_count > 0, s / self._stat_count, np.nan) for n, s in self._stat_sum.items()}
        for s in self._stat_sum.values():
            s[:] = 0
        self._stat_count[:] = 0
        return {t: {n: float(means[n][k]) for n in self.STATS} for k, t in enumerate(self.task_names)}

    def epoch_average(self) -> np.ndarray | None:
        """The mean matrix since the last call (None if nothing was measured), then reset."""
        return take_mean(self._sum, self._count)
