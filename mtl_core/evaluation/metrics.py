"""Per-task classification metrics (torchmetrics) over samples that have a label for the task."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from mtl_core.tasks import MISSING_LABEL

METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def task_metrics(probs: np.ndarray, targets: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy, macro precision/recall/F1 and the confusion matrix (rows: true, cols: predicted)."""
    n = probs.shape[1]
    p, y = torch.from_numpy(probs), torch.from_numpy(targets).long()
    kw = {"num_classes": n, "ignore_index": MISSING_LABEL}
    metrics = {
        "accuracy": MulticlassAccuracy(average="micro", **kw),
        "precision_macro": MulticlassPrecision(average="macro", **kw),
        "recall_macro": MulticlassRecall(average="macro", **kw),
        "f1_macro": MulticlassF1Score(average="macro", **kw),
    }
    values = {name: float(m(p, y)) for name, m in metrics.items()}
    confusion = MulticlassConfusionMatrix(**kw)(p, y).numpy()
    return values, confusion


def mean_over_tasks(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    return {m: float(np.mean([v[m] for v in per_task.values()])) for m in METRICS}
