"""Per-task classification losses: missing labels, per-sample weights, class weights, label smoothing.

A sample whose label for task t is MISSING_LABEL contributes no loss (and so exactly zero gradient) to
task t, and still trains every other task. The trainer calls one object, `TaskLoss`, built from the
`train` config and the training labels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtl_core.config import TrainConfig
from mtl_core.tasks import MISSING_LABEL, TaskSpec

log = logging.getLogger(__name__)


def weighted_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    sample_weights: Tensor | None = None,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
    denominator: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of one task, a weighted mean over the samples labelled for it.

    With L = {i : y_i != MISSING_LABEL}, sample weights s_i (1 if None), class weights c_k (1 if None),
    C classes, p_i = softmax(logits_i) and smoothing eps:

        r_i  = c_{y_i} * (1 - eps) * (-log p_{i,y_i})  +  (eps / C) * sum_k c_k * (-log p_{i,k})
               (F.cross_entropy(weight=c, label_smoothing=eps, reduction="none"))
        loss = sum_{i in L} s_i * r_i  /  sum_{i in L} s_i * c_{y_i}

    So without class weights loss = sum_L s_i l_i / sum_L s_i (l_i the, possibly smoothed, cross-entropy);
    with s = 1 it equals F.cross_entropy(weight=c, label_smoothing=eps) over L (PyTorch's "mean" divides
    by the sum of the targets' class weights); with both = 1 it is the plain mean over L.

    A sample outside L, or with s_i = 0, gets exactly zero gradient. When the denominator is 0 (no
    labelled sample in the batch, or all their weights are 0) the loss is 0, still part of the graph.
    Computed in float32 (logits may come from bf16 autocast).

    `denominator` replaces sum_{i in L} s_i c_{y_i}: a distributed rank passes the global batch's
    denominator / world size, so that the mean of the ranks' losses (and DDP's mean of their gradients)
    is exactly the loss of the global batch, however its labelled samples fall on the ranks.
    """
    logits = logits.float()
    labelled = targets != MISSING_LABEL
    s = labelled.float() if sample_weights is None else torch.where(labelled, sample_weights.float(), 0.0)
    if class_weights is not None:
        class_weights = class_weights.to(device=logits.device, dtype=torch.float32)
    r = F.cross_entropy(
        logits, targets, weight=class_weights, ignore_index=MISSING_LABEL, label_smoothing=label_smoothing, reduction="none"
    )  # 0 where the label is missing
    numerator = (s * r).sum()
    if denominator is None:
        denominator = loss_denominator(targets, sample_weights, class_weights)
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), numerator * 0.0)


def stacked_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    sample_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
    denominators: Tensor | None = None,
) -> Tensor:
    """`weighted_cross_entropy` (no class weights) of J tasks with the same class count at once:
    logits (N, J, C), targets (N, J) -> (J,) losses, one cross-entropy call for all of them. Task j's
    value is exactly `weighted_cross_entropy(logits[:, j], targets[:, j], sample_weights,
    label_smoothing=label_smoothing, denominator=denominators[j])` (the same formula; only the order
    of the float sums may differ)."""
    logits = logits.float()
    labelled = targets != MISSING_LABEL
    s = labelled.float() if sample_weights is None else torch.where(labelled, sample_weights.float()[:, None], 0.0)
    r = F.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=MISSING_LABEL, label_smoothing=label_smoothing, reduction="none"
    )  # (N, J), 0 where the label is missing
    numerator = (s * r).sum(0)
    denominator = s.sum(0) if denominators is None else denominators.to(numerator.dtype)
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), numerator * 0.0)


def loss_denominator(targets: Tensor, sample_weights: Tensor | None = None, class_weights: Tensor | None = None) -> Tensor:
    """sum over the labelled samples of s_i * c_{y_i}: what `weighted_cross_entropy` divides by."""
    labelled = targets != MISSING_LABEL
    s = labelled.float() if sample_weights is None else torch.where(labelled, sample_weights.float(), 0.0)
    if class_weights is None:
        return s.sum()
    return (s * class_weights.to(device=s.device, dtype=torch.float32)[targets.clamp_min(0)]).sum()


def masked_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled samples; 0 (still in the graph) when none is labelled."""
    return weighted_cross_entropy(logits, targets)


def task_losses(logits: dict[str, Tensor], targets: Tensor, task_names: list[str]) -> dict[str, Tensor]:
    """{task: loss} for stacked targets (N, K) in `task_names` order (no sample/class weights, no smoothing)."""
    return {t: masked_cross_entropy(logits[t], targets[:, k]) for k, t in enumerate(task_names)}


def inverse_frequency_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """w_c = N / (C * n_c) over the labelled entries of `labels` (N of them, n_c of class c, C classes).

    Over the labelled samples the weights average to 1 (sum_c n_c w_c = N). A class with no sample
    (n_c = 0) gets 1.0: it is never a target, so its weight only enters the label-smoothing term.
    """
    labels = np.asarray(labels)
    labels = labels[labels != MISSING_LABEL]
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.ones(num_classes, dtype=np.float64)
    present = counts > 0
    weights[present] = len(labels) / (num_classes * counts[present])
    return weights


def given_class_weights(given: Mapping[str, Mapping[str, float]], tasks: TaskSpec) -> dict[str, np.ndarray]:
    """{task: weights in class-index order} from {task: {class name: weight}}; unlisted classes weigh 1.0."""
    out: dict[str, np.ndarray] = {}
    for task, per_class in given.items():
        if task not in tasks.classes:
            raise ValueError(f"train.class_weights: unknown task {task!r}; tasks: {', '.join(tasks.names)}")
        classes = tasks.classes[task]
        unknown = [c for c in per_class if c not in classes]
        if unknown:
            raise ValueError(
                f"train.class_weights.{task}: unknown class(es) {', '.join(map(repr, unknown))}; "
                f"classes of {task!r}: {', '.join(classes)}"
            )
        out[task] = np.array([float(per_class.get(c, 1.0)) for c in classes], dtype=np.float64)
    return out


class TaskLoss:
    """The per-task loss the trainer calls: `loss(logits, targets, weights) -> {task: scalar}`.

    Each task's loss is `weighted_cross_entropy` (see there for the exact formula) with that task's class
    weights (None: all 1) and the shared label smoothing.
    """

    def __init__(
        self,
        task_names: list[str],
        class_weights: Mapping[str, np.ndarray | Tensor | None] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.task_names = list(task_names)
        self.label_smoothing = float(label_smoothing)
        self.class_weights: dict[str, Tensor | None] = {
            t: None if (class_weights or {}).get(t) is None else torch.as_tensor(class_weights[t], dtype=torch.float32)
            for t in self.task_names
        }
        self._index: dict[tuple[tuple[int, ...], str], Tensor] = {}

    @classmethod
    def from_config(cls, train_cfg: TrainConfig, tasks: TaskSpec, train_labels: np.ndarray) -> TaskLoss:
        """From `train.class_weights` / `train.label_smoothing` and the training labels (N, K), -1 = missing."""
        spec = train_cfg.class_weights
        if spec == "none":
            weights: dict[str, np.ndarray] = {}
        elif spec == "inverse_frequency":
            weights = {
                t: inverse_frequency_weights(train_labels[:, k], n) for k, (t, n) in enumerate(tasks.num_classes.items())
            }
        else:
            weights = given_class_weights(spec, tasks)
        for t, w in weights.items():
            log.info("class weights %s: %s", t, ", ".join(f"{c} {v:.3g}" for c, v in zip(tasks.classes[t], w)))
        return cls(tasks.names, weights, train_cfg.label_smoothing)

    def _columns(self, columns: list[int], device: torch.device) -> Tensor:
        """`columns` as an index tensor on `device`, made once (no host-to-device copy per step)."""
        key = (tuple(columns), str(device))
        if key not in self._index:
            self._index[key] = torch.tensor(columns, device=device)
        return self._index[key]

    def to(self, device: torch.device | str) -> TaskLoss:
        self.class_weights = {t: None if w is None else w.to(device) for t, w in self.class_weights.items()}
        return self

    def denominators(self, targets: Tensor, weights: Tensor | None = None) -> Tensor:
        """(K,) float32: each task's loss denominator over this batch (see `loss_denominator`)."""
        return torch.stack([
            loss_denominator(targets[:, k], weights, self.class_weights[t]) for k, t in enumerate(self.task_names)
        ])  # fmt: skip

    def __call__(
        self, logits: Mapping[str, Tensor], targets: Tensor, weights: Tensor | None = None, denominators: Tensor | None = None
    ) -> dict[str, Tensor]:
        """{task: loss} for logits per task, stacked targets (N, K) in task order and sample weights (N,);
        `denominators` (K,): given instead of this batch's own (distributed training).

        Tasks without class weights that have the same number of classes are computed together
        (`stacked_cross_entropy`: one cross-entropy call for all of them, the same per-task values), so
        that forty binary tasks cost a few kernels, not forty rounds of them; the others one by one."""
        out: dict[str, Tensor] = {}
        together: dict[int, list[int]] = {}
        for k, t in enumerate(self.task_names):
            if self.class_weights[t] is None:
                together.setdefault(logits[t].shape[-1], []).append(k)
        alone = [k for k, t in enumerate(self.task_names) if self.class_weights[t] is not None]
        for columns in together.values():
            if len(columns) == 1:
                alone += columns
                continue
            names = [self.task_names[k] for k in columns]
            index = self._columns(columns, targets.device)
            losses = stacked_cross_entropy(
                torch.stack([logits[t] for t in names], dim=1), targets.index_select(1, index), weights,
                self.label_smoothing, None if denominators is None else denominators[index],
            )  # fmt: skip
            out.update(zip(names, losses.unbind()))
        for k in alone:
            t = self.task_names[k]
            out[t] = weighted_cross_entropy(
                logits[t], targets[:, k], weights, self.class_weights[t], self.label_smoothing,
                None if denominators is None else denominators[k],
            )  # fmt: skip
        return {t: out[t] for t in self.task_names}
