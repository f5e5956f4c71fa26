"""The training curves figure (`reports/training_curves.png`): small multiples, one panel per task.

Lines of 40 tasks in one panel under one legend read as nothing, so each task gets a small panel of its
own: its accuracy (left axis, 0-1) and loss (right axis), train dashed and validation solid, all in the
task's colour, so a task's gap between the two (over-fitting) reads at a glance. The panels share the
epoch axis; the grid grows by rows and the figure's width stays fixed (README: Reports for many tasks).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

SPLIT_STYLES = {"train": "--", "val": "-"}
MAX_COLUMNS = 6
PANEL_INCHES = (2.3, 1.9)  # width, height of one task's panel
LOSS_ALPHA = 0.45  # the loss lines are the lighter pair of a panel


def grid_shape(n_tasks: int, max_columns: int = MAX_COLUMNS) -> tuple[int, int]:
    """(rows, columns) of the panel grid: at most `max_columns` wide, as square as that allows."""
    if n_tasks < 1:
        raise ValueError("a training curves figure needs at least one task")
    columns = min(max_columns, math.ceil(math.sqrt(n_tasks)))
    return math.ceil(n_tasks / columns), columns


def training_curves_figure(history: pd.DataFrame, tasks: list[str], title: str | None = None) -> Figure:
    """One panel per task from `history`'s `<split>/<task>/<loss|accuracy>` columns against its `epoch`
    (the train stage's `train_history.csv`)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    rows, columns = grid_shape(len(tasks))
    width, height = PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows + 0.7
    fig = Figure(figsize=(width, height))
    # fixed margins in inches, not constrained layout: the panels are all alike, and constrained layout
    # takes tens of seconds over the 80 axes (with their loss twins) of 40 tasks
    fig.subplots_adjust(left=0.35 / width, right=1 - 0.35 / width, bottom=0.45 / height, top=1 - 0.6 / height,
                        wspace=0.45, hspace=0.45)  # fmt: skip
    axes = fig.subplots(rows, columns, sharex=True, squeeze=False).ravel()
    epochs = history["epoch"]
    for i, (task, ax) in enumerate(zip(tasks, axes, strict=False)):
        colour = f"C{i % 10}"  # matplotlib's default cycle, fixed to the task
        loss_ax = ax.twinx()
        for split, style in SPLIT_STYLES.items():
            ax.plot(epochs, history[f"{split}/{task}/accuracy"], style, color=colour, label=f"{task} ({split})")
            loss_ax.plot(epochs, history[f"{split}/{task}/loss"], style, color=colour, alpha=LOSS_ALPHA, lw=1,
                         label=f"{task} loss ({split})")  # fmt: skip
        ax.set_title(task, fontsize=8, color=colour)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
        loss_ax.tick_params(labelsize=6, colors="0.45")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    style_handles = [Line2D([], [], color="0.2", ls=s, label=split) for split, s in SPLIT_STYLES.items()]
    style_handles.append(Line2D([], [], color="0.2", alpha=LOSS_ALPHA, lw=1, label="loss (right axis)"))
    fig.legend(handles=style_handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title or "accuracy (left) and loss (right) per task, by epoch", fontsize=9, y=1 - 0.12 / height, va="top")
    return fig


def plot_training_curves(history: pd.DataFrame, tasks: list[str], out: Path) -> None:
    """`training_curves_figure`, saved as a PNG (what `train` writes to reports/training_curves.png)."""
    training_curves_figure(history, tasks).savefig(out, dpi=100)
