"""Heatmaps of K x K task matrices (task-gradient cosines, error correlations), readable at tens of tasks.

The tasks are ordered by hierarchical clustering of the matrix drawn (`cluster_order`), so tasks that go
together show as blocks; above ANNOTATE_MAX_TASKS tasks the cells carry no numbers and the figure's size
is capped.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


ANNOTATE_MAX_TASKS = 12  # above, the cells carry no numbers (unreadable): the colour bar reads them
CELL_INCHES = 1.1  # a cell's side for few tasks
MAX_MATRIX_INCHES = 12.0  # the matrix side at most: K = 40 gets 0.3-inch cells, not a 46-inch figure


def cluster_order(matrix: np.ndarray) -> np.ndarray:
    """The order of the tasks that puts related ones side by side: the leaves of an average-linkage
    hierarchical clustering (scipy) of the distances 1 - affinity, with the leaves optimally ordered
    (neighbouring leaves as similar as possible), so related tasks show as blocks on the diagonal.

    `matrix` is a K x K affinity in [-1, 1] (gradient cosine, error correlation); it is symmetrised, and
    a NaN pair (never measured) counts as unrelated (affinity 0). Fewer than three tasks, or nothing
    measured: the given order."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    a = np.asarray(matrix, dtype=float)
    k = a.shape[0]
    if k < 3 or np.isnan(a[~np.eye(k, dtype=bool)]).all():
        return np.arange(k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pairs: mean of nothing
        sym = np.nanmean(np.stack([a, a.T]), axis=0)
    distance = np.clip(1.0 - np.nan_to_num(sym, nan=0.0), 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average", optimal_ordering=True)
    return leaves_list(tree)


def task_matrix_figure(
    matrix: np.ndarray, task_names: Sequence[str], title: str, na_note: str | Sequence[str] | None = None,
    cluster: bool = True, scale: float = 1.0,
) -> Figure:
    """Heatmap of a K x K task matrix in [-1, 1], the tasks in `cluster_order` (related tasks as blocks;
    `cluster=False`: as given). A NaN cell is grey and reads "n/a", and the figure says why below the
    matrix: `na_note` (a line, or one line per cause), else that the pair has no value.

    Readable at K = 40: the matrix side is capped at MAX_MATRIX_INCHES, labels shrink with the cells, and
    above ANNOTATE_MAX_TASKS tasks the cells carry no numbers. `scale`: the colour range is ±scale (an
    affinity that is not a cosine or a correlation, e.g. the lookahead affinity, has its own)."""
    import matplotlib
    from matplotlib.figure import Figure

    k = len(task_names)
    order = cluster_order(np.asarray(matrix, dtype=float) / scale) if cluster else np.arange(k)
    matrix = np.asarray(matrix, dtype=float)[np.ix_(order, order)]
    names = [task_names[i] for i in order]
    annotate = k <= ANNOTATE_MAX_TASKS
    cell = min(CELL_INCHES, MAX_MATRIX_INCHES / max(k, 1))
    label_size = 8 if annotate else max(5.0, min(8.0, 72 * cell * 0.5))
    notes: list[str] = []
    if np.isnan(matrix).any():
        given = [na_note] if isinstance(na_note, str) else list(na_note or [])
        why = given[0] if given else "no value for this pair of tasks"
        notes = [("n/a: " if annotate else "grey, n/a: ") + why, *given[1:]]
    if cluster and k >= 3:
        notes.append("tasks ordered by hierarchical clustering of this matrix (related tasks side by side)")
    notes = notes[:12] + ([f"... and {len(notes) - 12} more"] if len(notes) > 12 else [])
    note_height = 0.15 * len(notes) + 0.1 if notes else 0.0  # inches below the axes for the notes
    label_room = 0.07 * label_size / 8 * max(len(n) for n in names) if names else 0.0  # the tick labels
    height = cell * k + 1.0 + label_room + note_height
    fig = Figure(figsize=(max(cell * k + 1.5 + label_room, 5.5 if notes else 0.0), height))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.85")  # n/a in grey: white is a correlation of 0
    im = ax.imshow(matrix, cmap=cmap, vmin=-scale, vmax=scale)
    ax.set(xticks=range(k), yticks=range(k))
    ax.set_xticklabels(names, fontsize=label_size, rotation=45 if annotate else 90, ha="right" if annotate else "center")
    ax.set_yticklabels(names, fontsize=label_size)
    ax.set_title(title, fontsize=10)
    if annotate:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if notes:
        fig.text(0.02, 0.05 / height, "\n".join(notes), ha="left", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, note_height / height, 1, 1))
    return fig


def plot_task_matrix(
    matrix: np.ndarray, task_names: Sequence[str], title: str, out: Path, na_note: str | Sequence[str] | None = None,
    scale: float = 1.0,
) -> None:
    """`task_matrix_figure`, saved as a PNG."""
    task_matrix_figure(matrix, task_names, title, na_note, scale=scale).savefig(out, dpi=100)


def symmetric_scale(matrix: np.ndarray) -> float:
    """A colour range for an affinity of its own units: the largest absolute finite value off the
    diagonal (1.0 when there is none)."""
    a = np.asarray(matrix, dtype=float)
    off = np.abs(a[~np.eye(a.shape[0], dtype=bool)])
    off = off[np.isfinite(off)]
    return float(off.max()) if off.size and off.max() > 0 else 1.0
