"""The tasks of a model: names and class names, in the label-index order its heads use."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MISSING_LABEL = -1
"""Label index of a sample that has no label for a task: it adds no loss and no metric for that task."""


@dataclass(frozen=True)
class TaskSpec:
    """Task names and their class names, in the label-index order the model's heads use."""

    classes: dict[str, list[str]]

    @property
    def names(self) -> list[str]:
        return list(self.classes)

    @property
    def num_classes(self) -> dict[str, int]:
        return {t: len(c) for t, c in self.classes.items()}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"tasks": self.classes}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TaskSpec:
        return cls(json.loads(path.read_text())["tasks"])


def majority_counts(labels: np.ndarray, task_names: list[str]) -> dict[str, tuple[int, int]]:
    """Per task (column k of `labels`, (N, K) label indices): (how many labelled samples its most
    frequent class has, how many samples are labelled). Always answering that class is right that often:
    an accuracy at or below it is chance (the champion gate, the per-task tables)."""
    out = {}
    for k, task in enumerate(task_names):
        y = labels[:, k]
        y = y[y != MISSING_LABEL]
        out[task] = (int(np.bincount(y).max()) if y.size else 0, int(y.size))
    return out


def majority_rates(labels: np.ndarray, task_names: list[str]) -> dict[str, float]:
    """Per task, the accuracy of always answering its most frequent class (NaN: no labelled sample)."""
    return {t: (m / n if n else float("nan")) for t, (m, n) in majority_counts(labels, task_names).items()}
