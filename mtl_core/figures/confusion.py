"""Confusion matrices as figures: one PNG per task, and all tasks in one grid (`reports/confusion_grid.png`).

Forty tasks give forty confusion plots, one below the other in `dvc plots show`; the grid puts every
task's matrix side by side as small multiples, so the one that never predicts its rare class stands out.
Each cell is coloured by its share of the true class (the row), not by its count: on an imbalanced task
counts colour only the majority row, while the row share shows the recall of every class (the diagonal of
a head that always answers the majority class reads 1 and 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mtl_core.figures.curves import grid_shape

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GRID_COLUMNS = 8
PANEL_INCHES = (1.55, 2.8)  # one task's panel: the smallest (many tasks) and the largest (a few)
GRID_WIDTH_INCHES = 11.0  # the panels share about this width, within PANEL_INCHES
ANNOTATE_MAX_CLASSES = 4  # a panel with more classes shows colours only
CLASS_NAME_CHARS = 14  # a longer class name is cut, with "…" (bottom_left and bottom_right stay apart)


def row_shares(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the share of the true class predicted as each class); 0 for an empty row."""
    m = np.asarray(matrix, dtype=float)
    totals = m.sum(axis=1, keepdims=True)
    return np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)


def confusion_figure(matrix: np.ndarray, classes: Sequence[str], task: str) -> Figure:
    """One task's confusion matrix (rows: true, columns: predicted), counts in the cells."""
    from matplotlib.figure import Figure

    size = max(4.0, 0.6 * len(classes) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
        xlabel="predicted", ylabel="true", title=f"{task}: confusion matrix (test)",
    )  # fmt: skip
    for label in ax.get_xticklabels():
        label.set(rotation=45, ha="right")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > threshold else "black")
    fig.tight_layout()
    return fig


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], task: str, out: Path) -> None:
    confusion_figure(matrix, classes, task).savefig(out, dpi=100)


def _short(name: object) -> str:
    text = str(name)
    return text if len(text) <= CLASS_NAME_CHARS else text[: CLASS_NAME_CHARS - 1] + "…"


def confusion_grid_figure(confusions: Mapping[str, np.ndarray], classes: Mapping[str, Sequence[str]]) -> Figure:
    """Small multiples, one panel per task (at most GRID_COLUMNS a row): the task's matrix coloured by row
    share, each cell with its count; the classes label each panel's rows and columns (cut after
    CLASS_NAME_CHARS characters). Panels are as large as about GRID_WIDTH_INCHES allows, so a few tasks get
    readable panels and forty still fit one figure."""
    from matplotlib.figure import Figure

    tasks = list(confusions)
    rows, columns = grid_shape(len(tasks), GRID_COLUMNS)
    panel = min(PANEL_INCHES[1], max(PANEL_INCHES[0], GRID_WIDTH_INCHES / columns))
    small = panel < 2
    fig = Figure(figsize=(panel * columns + 0.6, panel * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    tick, cell = (5, 6) if small else (7, 8)
    for task, ax in zip(tasks, axes, strict=False):
        matrix = np.asarray(confusions[task])
        names = [_short(c) for c in classes[task]]
        shares = row_shares(matrix)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(task, fontsize=tick + 2)
        ax.set_xticks(range(len(names)), names, fontsize=tick, rotation=40, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(names)), names, fontsize=tick)
        ax.tick_params(length=0, pad=1)
        if len(names) <= ANNOTATE_MAX_CLASSES:
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=cell, color="white" if shares[i, j] > 0.5 else "black")
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    fig.suptitle(
        "confusion per task (test split)\nrows: true class, columns: predicted; colour: share of the true class",
        fontsize=tick + 2,
    )
    return fig


def plot_confusion_grid(confusions: Mapping[str, np.ndarray], classes: Mapping[str, Sequence[str]], out: Path) -> None:
    """`confusion_grid_figure`, saved as a PNG."""
    confusion_grid_figure(confusions, classes).savefig(out, dpi=110)
