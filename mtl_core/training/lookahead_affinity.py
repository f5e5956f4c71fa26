"""Lookahead inter-task affinity (TAG: Fifty, Amid, Zhao, Yu, Anil & Finn 2021, "Efficiently Identifying
Task Groupings for Multi-Task Learning", NeurIPS), measured while training.

On a measured step, for every task s: take a step of the shared parameters on task s's loss alone,
θ_s' = θ_s − η ∇_{θ_s} L_s, and on the SAME batch compare every task t's loss after that step with its
loss before it:

    Z[s, t] = (1 − L_t(θ_s', θ_t) / L_t(θ_s, θ_t)) / η

positive when a step for s lowers t's loss (s helps t), negative when it raises it. Averaged over the
measured steps of an epoch (per pair, over the steps where both tasks are labelled), Z is the affinity
onto t from s that evaluation/task_grouping.py turns into groups.

As in the authors' code (google-research `tag/`: the CelebA notebook's `train_step` and the Taskonomy
`lookahead`), the lookahead step uses the learning rate of the run (η: here each shared parameter's
own group's current rate, `train.backbone_lr_scale` included; Z is divided by the backbone group's), the
forward pass after it runs in training mode on the batch's own statistics, and the measurement divides
by η so that steps of a one-cycle schedule are comparable. Where the authors step with their optimizer's
momentum update, this is the plain gradient step of the paper's definition (the optimizer here is AdamW,
whose per-parameter scaling is a property of the run's history, not of the task). BatchNorm's running
statistics are not moved by the lookahead passes (they run on copies of the buffers), and nothing of
the real step changes: the measurement only reads the graph the step's backward uses.

Cost per measured step: K backward passes to the shared parameters (the task gradients) and K forward
passes of the whole network. One process only (`fit` refuses it under DDP).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from mtl_core.training.gradient_cosine import take_mean
from mtl_core.weighting.gradients import task_gradients, trainable


class LookaheadAffinityTracker:
    """Per epoch, the mean lookahead affinity matrix Z (K x K; row: the task stepped on, column: the task
    whose loss changes); a pair never measured with both tasks labelled is NaN."""

    def __init__(self, task_names: Sequence[str], every: int) -> None:
        if every < 1:
            raise ValueError(f"measure every N >= 1 steps, got {every}")
        self.task_names = list(task_names)
        self.every = every
        k = len(task_names)
        self._sum = np.zeros((k, k))
        self._count = np.zeros((k, k))

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(
        self, model: torch.nn.Module, loss: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]], x: Tensor,
        losses: Mapping[str, Tensor], shared_params: Sequence[Tensor], lr: Mapping[int, float], labelled: Tensor | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Z of this batch: `loss(logits)` gives the task losses of the batch `x` (the step's own loss
        function, targets and weights), `losses` the step's losses (graph kept for its backward), `lr`
        each shared parameter's learning rate by `id`; `labelled` (K,) bool marks the tasks with a
        labelled sample in the batch (None: all)."""
        params = trainable(shared_params)
        k = len(self.task_names)
        z = np.full((k, k), np.nan)
        if not params:
            return z
        names = {id(p): n for n, p in model.named_parameters()}
        grads = task_gradients([losses[t] for t in self.task_names], params, retain_graph=True)
        before = torch.stack([losses[t].detach().double() for t in self.task_names])
        seen = np.ones(k, dtype=bool) if labelled is None else np.asarray(labelled, dtype=bool)
        eta = float(lr[id(params[0])])
        for s in range(k):
            if not seen[s]:
                continue
            stepped, offset = {}, 0
            for p in params:
                n = p.numel()
                stepped[names[id(p)]] = p.detach() - lr[id(p)] * grads[s, offset : offset + n].view_as(p).to(p.dtype)
                offset += n
            buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # BN statistics stay as they are
            with torch.no_grad():
                after = loss(functional_call(model, {**stepped, **buffers}, (x,), strict=False))
            after_t = torch.stack([after[t].detach().double() for t in self.task_names])
            with np.errstate(invalid="ignore", divide="ignore"):
                z[s] = ((1.0 - after_t / before).cpu().numpy()) / eta
        both = np.outer(seen, seen) & (before.cpu().numpy() > 0)[None, :]
        self._sum += np.where(both, np.nan_to_num(z), 0.0)
        self._count += both
        return np.where(both, z, np.nan)

    def epoch_average(self) -> np.ndarray | None:
        """The mean matrix since the last call (None if nothing was measured), then reset."""
        return take_mean(self._sum, self._count)

    def state_dict(self) -> dict[str, Any]:
        return {"sum": torch.from_numpy(self._sum.copy()), "count": torch.from_numpy(self._count.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum, self._count = state["sum"].numpy().copy(), state["count"].numpy().copy()
