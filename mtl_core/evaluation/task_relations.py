"""Which tasks help or fight each other.

* During training: the pairwise cosine similarity of task gradients on the shared parameters, measured
  every N steps and averaged per epoch (positive: the tasks pull the backbone the same way; negative:
  conflicting gradients, the situation PCGrad (Yu et al. 2020) and CAGrad (Liu et al. 2021) address).
  A measurement costs K extra backward passes through the network, on measured steps only.
* After training: the correlation between tasks of per-sample errors on the test split (do the same
  images fool both tasks?).

The heatmaps order the tasks by hierarchical clustering of the matrix drawn (`cluster_order`), so tasks
that go together show as blocks, and stay readable at tens of tasks (no cell numbers, a capped size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mtl_core.tasks import MISSING_LABEL
from mtl_core.weighting.gradients import task_gradients, trainable

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def cosine_matrix(grads: Tensor) -> np.ndarray:
    """K x K cosine similarities of the rows of G (K, D); a zero gradient gives 0 similarity."""
    g = grads.detach().double()
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).cpu().numpy()


class GradientCosineTracker:
    """Per epoch, from the task gradients G (K, P) on the shared parameters of every N-th step:

    * the mean task-gradient cosine matrix; a pair of tasks is averaged over the measured batches where
      both are labelled (an unlabelled task's zero gradient is no evidence that it is unrelated); a
      pair never measured together is NaN;
    * per task, the gradient norm |g_t|, and what the optimizer's actual step d = theta' - theta (after
      the weighting method, clipping, Adam's scaling and the schedule) does for that task: its
      alignment cos(-d, g_t) and its *effective learning rate* -d.g_t / |g_t|^2, the plain-SGD step size
      that would lower task t's loss as much to first order. Under Adam one task's effective rate falls
      when other tasks' gradients dominate the shared second-moment estimate or point elsewhere, which
      is how one multi-task step can serve a task less than its single-task step does.
    """

    STATS = ("grad_norm", "effective_lr", "step_alignment")

    def __init__(self, task_names: Sequence[str], every: int) -> None:
        if every < 1:
            raise ValueError(f"measure every N >= 1 steps, got {every}")
        self.task_names = list(task_names)
        self.every = every
        k = len(task_names)
        self._sum = np.zeros((k, k))
        self._count = np.zeros((k, k))
        self._stat_sum = {name: np.zeros(k) for name in self.STATS}
        self._stat_count = np.zeros(k)
        self._pending: tuple[Tensor, Tensor, np.ndarray] | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(
        self, losses: dict[str, Tensor], shared_params: Sequence[Tensor], labelled: Tensor | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> np.ndarray:
        """Take the K task gradients on the shared parameters (graph kept for the real backward);
        `labelled` (K,) bool marks the tasks with a labelled sample in the batch (None: all). Call
        `after_step` once the optimizer has stepped to record what the step did per task."""
        params = trainable(shared_params)
        grads = task_gradients([losses[t] for t in self.task_names], params, retain_graph=True)
        if reduce is not None:  # distributed: the global batch's gradients (their mean over the ranks)
            grads = reduce(grads)
        matrix = cosine_matrix(grads)
        seen = np.ones(len(self.task_names), dtype=bool) if labelled is None else np.asarray(labelled, dtype=bool)
        both = np.outer(seen, seen)
        self._sum += np.where(both, matrix, 0.0)
        self._count += both
        before = torch.cat([p.detach().reshape(-1) for p in params]).clone() if params else torch.zeros(0)
        self._pending = (grads.detach(), before, seen)
        return matrix

    def after_step(self, shared_params: Sequence[Tensor]) -> None:
        """The per-task statistics of the step measured last (no-op if none is pending)."""
        if self._pending is None:
            return
        grads, before, seen = self._pending
        self._pending = None
        params = trainable(shared_params)
        if not params:
            return
        step = torch.cat([p.detach().reshape(-1) for p in params]) - before
        g = grads.double()
        d = step.double().to(g.device)
        norm = g.norm(dim=1)
        along = -(g @ d)  # first-order decrease of each task's loss
        stats = {
            "grad_norm": norm,
            "effective_lr": along / norm.pow(2).clamp_min(1e-30),
            "step_alignment": along / (norm * d.norm()).clamp_min(1e-30),
        }
        seen = seen & (norm.cpu().numpy() > 0)
        for name, values in stats.items():
            self._stat_sum[name] += np.where(seen, values.cpu().numpy(), 0.0)
        self._stat_count += seen

    def discard(self) -> None:
        """Forget the pending measurement (the step was skipped: nothing to relate it to)."""
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        """The epoch's running sums (float64 tensors), for a checkpoint in the middle of an epoch; taken
        between steps, when no measurement is pending."""
        return {
            "sum": torch.from_numpy(self._sum.copy()), "count": torch.from_numpy(self._count.copy()),
            "stat_sum": {n: torch.from_numpy(v.copy()) for n, v in self._stat_sum.items()},
            "stat_count": torch.from_numpy(self._stat_count.copy()),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum, self._count = state["sum"].numpy().copy(), state["count"].numpy().copy()
        self._stat_sum = {n: state["stat_sum"][n].numpy().copy() for n in self.STATS}
        self._stat_count = state["stat_count"].numpy().copy()
        self._pending = None

    def epoch_task_stats(self) -> dict[str, dict[str, float]]:
        """{task: {grad_norm, effective_lr, step_alignment}} averaged over the epoch's measured steps
        (NaN for a task never measured), then reset."""
        with np.errstate(invalid="ignore", divide="ignore"):
            means = {n: np.where(self._stat_count > 0, s / self._stat_count, np.nan) for n, s in self._stat_sum.items()}
        for s in self._stat_sum.values():
            s[:] = 0
        self._stat_count[:] = 0
        return {t: {n: float(means[n][k]) for n in self.STATS} for k, t in enumerate(self.task_names)}

    def epoch_average(self) -> np.ndarray | None:
        """The mean matrix since the last call (None if nothing was measured), then reset."""
        if not self._count.any():
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self._count > 0, self._sum / self._count, np.nan)
        self._sum[:] = 0
        self._count[:] = 0
        return mean


def error_correlation(probs: dict[str, np.ndarray], targets: np.ndarray, task_names: Sequence[str]) -> np.ndarray:
    """Pearson correlation of per-sample error indicators between tasks (samples labelled for both).

    NaN where a pair has fewer than two shared samples or one task's errors do not vary.
    """
    k = len(task_names)
    errors = np.stack([probs[t].argmax(1) != targets[:, i] for i, t in enumerate(task_names)], 1).astype(float)
    labelled = targets != MISSING_LABEL
    out = np.full((k, k), np.nan)
    for i in range(k):
        for j in range(k):
            both = labelled[:, i] & labelled[:, j]
            a, b = errors[both, i], errors[both, j]
            if both.sum() >= 2 and a.std() > 0 and b.std() > 0:
                out[i, j] = float(np.corrcoef(a, b)[0, 1])
    return out


def error_correlation_gaps(probs: dict[str, np.ndarray], targets: np.ndarray, task_names: Sequence[str]) -> list[str]:
    """Why cells of `error_correlation` are n/a, one line per cause: a task whose test errors do not vary
    (every answer right, or every one wrong: a constant has no correlation), or a pair of tasks with fewer
    than two test images labelled for both."""
    labelled = targets != MISSING_LABEL
    lines: list[str] = []
    for i, t in enumerate(task_names):
        n = int(labelled[:, i].sum())
        wrong = int((probs[t].argmax(1) != targets[:, i])[labelled[:, i]].sum()) if n else 0
        if n < 2:
            lines.append(f"{t}: {n} labelled test image{'s' if n != 1 else ''}")
        elif wrong == 0:
            lines.append(f"{t}: no error on its {n} test images")
        elif wrong == n:
            lines.append(f"{t}: every one of its {n} test images wrong")
    for i in range(len(task_names)):
        for j in range(i + 1, len(task_names)):
            both = int((labelled[:, i] & labelled[:, j]).sum())
            if 2 > both and labelled[:, i].sum() >= 2 and labelled[:, j].sum() >= 2:
                lines.append(f"{task_names[i]} & {task_names[j]}: {both} test image(s) labelled for both")
    return lines


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
    cluster: bool = True,
) -> Figure:
    """Heatmap of a K x K task matrix in [-1, 1], the tasks in `cluster_order` (related tasks as blocks;
    `cluster=False`: as given). A NaN cell is grey and reads "n/a", and the figure says why below the
    matrix: `na_note` (a line, or one line per cause), else that the pair has no value.

    Readable at K = 40: the matrix side is capped at MAX_MATRIX_INCHES, labels shrink with the cells, and
    above ANNOTATE_MAX_TASKS tasks the cells carry no numbers."""
    import matplotlib
    from matplotlib.figure import Figure

    k = len(task_names)
    order = cluster_order(matrix) if cluster else np.arange(k)
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
    im = ax.imshow(matrix, cmap=cmap, vmin=-1, vmax=1)
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
    matrix: np.ndarray, task_names: Sequence[str], title: str, out: Path, na_note: str | Sequence[str] | None = None
) -> None:
    """`task_matrix_figure`, saved as a PNG."""
    task_matrix_figure(matrix, task_names, title, na_note).savefig(out, dpi=100)
