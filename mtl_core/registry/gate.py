"""The champion gate: the checks a model version must pass before alias `champion` may move to it.

The gate refuses a version (registered, alias left where it is) when any of these checks fails:

* `finite_weights`: a NaN or inf in any floating tensor of `models/model.safetensors` (a diverged
  training run can still evaluate to plausible-looking accuracies on argmax).
* `finite_metrics`: a NaN or inf anywhere in `reports/test_metrics.json`.
* `above_chance`: over the tasks, the model must answer more test images correctly than always
  answering each task's most frequent class of the *test* split would (its majority rate, from the
  test labels cache, over the labelled samples only): the summed correct answers against the summed
  majority counts, compared as counts, so the float32 accuracy of a constant predictor cannot land a
  rounding error above its own majority rate. The tasks on which the model is no better than chance
  are named in the log, the report (`tasks_at_chance`) and a version tag even when the model passes:
  the registered model is served for all of its tasks at once, and a mean hides a dead head. They do
  not refuse it, because a real multi-task model can be at chance on one hard task (the built-in data's
  `shape` after a short run) and still be the best model for the others; `register.min_mean_accuracy`
  is the stricter bar a project sets for itself. A task with no labelled test sample, or only one class
  in the test split (nothing can beat a majority rate of 1), carries no evidence and is not checked; a
  model with no checkable task is refused, since nothing shows it beats chance.
* `min_mean_accuracy`: the mean test accuracy must be at least `register.min_mean_accuracy`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from mtl_core.tasks import majority_counts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateResult:
    failures: list[str]  # names of the failed checks
    details: list[str]  # one human-readable line per failed check
    at_chance: list[str] = field(default_factory=list)  # tasks no better than chance (named, not refusing)

    @property
    def passed(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        return "; ".join(self.details)


def _non_finite_tensors(weights: Path) -> list[str]:
    bad = []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                bad.append(key)
    return bad


def _non_finite_numbers(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite_numbers(v, f"{prefix}{k}.")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _non_finite_numbers(v, f"{prefix}{i}.")]
    if isinstance(obj, float) and not math.isfinite(obj):
        return [prefix.rstrip(".")]
    return []


def champion_gate(weights: Path, metrics: dict[str, Any], test_labels: np.ndarray, tasks: list[str], min_mean_accuracy: float) -> GateResult:
    """The checks a version must pass before it may become champion (see the module docstring): its
    `weights` file, its test `metrics` (reports/test_metrics.json), the test split's labels (N, K) of
    `tasks`, and `register.min_mean_accuracy`."""
    failures: list[str] = []
    details: list[str] = []

    if bad := _non_finite_tensors(weights):
        failures.append("finite_weights")
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        details.append(f"non-finite weights (NaN/inf) in {shown}")

    if bad := _non_finite_numbers(metrics):
        failures.append("finite_metrics")
        details.append(f"non-finite test metrics: {', '.join(bad)}")

    per_task = metrics.get("tasks", {})
    at_chance: list[str] = []
    correct_sum = majority_sum = checked = 0
    for task, (majority, n) in majority_counts(test_labels, tasks).items():
        if n == 0 or majority == n:
            log.info(
                "register: task %s not checked against chance (%d labelled test images, %d of its majority class)",
                task, n, majority,
            )  # fmt: skip
            continue
        checked += 1
        accuracy = per_task.get(task, {}).get("accuracy")
        correct = round(accuracy * n) if isinstance(accuracy, int | float) and math.isfinite(accuracy) else 0
        correct_sum, majority_sum = correct_sum + correct, majority_sum + majority
        if correct <= majority:
            at_chance.append(f"{task} ({correct}/{n} = {correct / n:.3f} <= majority class {majority}/{n} = {majority / n:.3f})")
    if checked == 0:
        failures.append("above_chance")
        details.append("not better than chance: no task has test labels of more than one class to show it")
    elif correct_sum <= majority_sum:
        failures.append("above_chance")
        details.append(
            f"not better than chance: {correct_sum} correct test answers over the tasks, always answering each "
            f"task's majority class gives {majority_sum}"
        )
    if at_chance:
        log.warning("register: no better than chance on %s", ", ".join(at_chance))

    score = metrics.get("mean", {}).get("accuracy")
    minimum = min_mean_accuracy
    if isinstance(score, int | float) and math.isfinite(score) and score < minimum:  # else: finite_metrics
        failures.append("min_mean_accuracy")
        details.append(f"mean test accuracy {score:.4f} below register.min_mean_accuracy {minimum}")
    return GateResult(failures, details, at_chance)
