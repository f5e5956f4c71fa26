"""Which tasks the model gets wrong on the same images: the correlation between tasks of per-sample test
errors (evaluate stage; `reports/task_error_correlation.json` and its heatmap)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtl_core.tasks import MISSING_LABEL


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
