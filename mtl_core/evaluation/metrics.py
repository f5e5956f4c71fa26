"""Per-task classification metrics (torchmetrics) over samples that have a label for the task.

With many binary, imbalanced tasks, accuracy rewards a head that always answers the majority class
(99 % accuracy on a 1 %-positive attribute). Two kinds of metric here cannot be won that way:

* `balanced_accuracy`: the mean over the classes *present in the labelled targets* of the recall of
  each (a class no test image has says nothing about the model and is left out, as scikit-learn's
  `balanced_accuracy_score` does). Always answering one class scores 1/C, chance, whatever the class
  frequencies; it is defined for every task.
* `auroc` and `average_precision`, for two-class tasks only: ranking metrics of the predicted
  probability of class 1 (the second class of the task; torchmetrics BinaryAUROC and
  BinaryAveragePrecision). A constant score has AUROC 0.5 and an average precision of the positive
  rate. They are absent (not NaN) for a task with more than two classes and for a two-class task whose
  labelled targets hold only one class, where they are undefined; the mean over tasks of each metric
  is over the tasks that have it, and absent when none has. Absent rather than NaN: reports stay valid
  JSON and the register stage's finite-metrics check keeps its meaning.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mtl_core.tasks import MISSING_LABEL

METRICS = (
    "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc", "average_precision",
)  # fmt: skip
BINARY_METRICS = ("auroc", "average_precision")  # two-class tasks with both classes labelled only


def task_metrics(probs: np.ndarray, targets: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """The metrics of METRICS that the task has (see the module docstring) and the confusion matrix
    (rows: true, cols: predicted), over the samples whose target is not MISSING_LABEL."""
    import torch  # torchmetrics (and torchvision through it) costs seconds: only where metrics are computed
    from torchmetrics.classification import (
        BinaryAUROC,
        BinaryAveragePrecision,
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

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
    labelled = targets[targets != MISSING_LABEL].astype(np.int64)
    present = np.bincount(labelled, minlength=n) > 0
    recall = MulticlassRecall(average="none", **kw)(p, y).numpy()
    values["balanced_accuracy"] = float(recall[present].mean()) if present.any() else 0.0
    if n == 2 and present.all():
        positive = p[:, 1].float()
        values["auroc"] = float(BinaryAUROC(ignore_index=MISSING_LABEL)(positive, y))
        values["average_precision"] = float(BinaryAveragePrecision(ignore_index=MISSING_LABEL)(positive, y))
    confusion = MulticlassConfusionMatrix(**kw)(p, y).numpy()
    return {m: values[m] for m in METRICS if m in values}, confusion


def mean_over_tasks(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per metric, the mean over the tasks that have it (all tasks but for BINARY_METRICS); a metric no
    task has is left out."""
    means = {}
    for m in METRICS:
        values = [v[m] for v in per_task.values() if m in v]
        if values:
            means[m] = float(np.mean(values))
    return means
