"""The tasks of a model: names and class names, in the label-index order its heads use."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
