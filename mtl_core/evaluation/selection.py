"""Which solution to register: one network, one per task group, or one per task, by a stated policy.

Every solution the compare stage measured (evaluation/solutions.py: all-in-one, grouped, single-task)
is judged task by task against the single-task models with a paired test (evaluation/significance.py):
a task is *worse* only when the interval of its difference lies below 0. `compare.select` then picks:

* `trained`: the train stage's model, whatever the comparison says;
* `fewest_networks`: the solution with the fewest networks in which no task is significantly worse
  than its single-task model by more than `max_task_loss_points` (points of the metric x 100); a tie
  goes to the higher Δm;
* `best_delta_m`: among the solutions that meet the same condition, the highest Δm (a tie: fewer
  networks).

The single-task solution meets the condition by definition (it is the reference), so with it among the
candidates some solution always does; without it, when none does, the closest is chosen (the smallest
excess loss) and the reason names the task that missed and by how much.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtl_core.evaluation.significance import METRICS, NO_DIFFERENCE, WORSE, mcnemar_exact, paired_bootstrap
from mtl_core.tasks import MISSING_LABEL


def verdict_metric(primary: str) -> str:
    """The metric the verdicts are computed on: the primary one where a bootstrap can compute it from the
    predicted classes (accuracy, balanced accuracy), else balanced accuracy."""
    return primary if primary in METRICS else "balanced_accuracy"


def task_verdicts(
    targets: np.ndarray, tasks: Sequence[str], predicted: np.ndarray, reference: np.ndarray, metric: str,
    resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per task (column k of the (N, K) arrays), `predicted` against `reference` on the test images
    labelled for it: the paired bootstrap difference of `metric` with its verdict, and McNemar's exact
    test of the accuracies."""
    out = {}
    for k, task in enumerate(tasks):
        labelled = targets[:, k] != MISSING_LABEL
        y, a, b = targets[labelled, k], predicted[labelled, k], reference[labelled, k]
        diff = paired_bootstrap(metric, y, a, b, resamples, confidence, seed + k).as_dict()
        out[task] = {**diff, "mcnemar": mcnemar_exact(y, a, b), "test_images": int(labelled.sum())}
    return out


def _loss_points(v: Mapping[str, Any]) -> float:
    """How many points (x 100) a task loses against its single-task model where the loss is significant; 0 else."""
    return -100.0 * float(v["difference"]) if v["verdict"] == WORSE else 0.0


def _describe(name: str, row: Mapping[str, Any]) -> str:
    return f"{name.replace('_', '-')} ({len(row['groups'])} network{'s' if len(row['groups']) != 1 else ''}, Δm {row['delta_m_pct']:+.2f} %)"


def _misses(row: Mapping[str, Any], limit: float) -> list[tuple[str, float, Mapping[str, Any]]]:
    """(task, points lost beyond `limit`, verdict) for each task significantly worse by more than `limit`."""
    out = []
    for task, v in row["verdicts"].items():
        lost = _loss_points(v)
        if v["verdict"] == WORSE and lost > limit:
            out.append((task, lost - limit, v))
    return sorted(out, key=lambda m: -m[1])


def _miss_text(task: str, v: Mapping[str, Any], limit: float) -> str:
    return (
        f"{task} significantly worse than its single-task model by {-100 * v['difference']:.1f} points "
        f"({100 * v['confidence']:.0f} % interval {100 * v['low']:+.1f} to {100 * v['high']:+.1f}; allowed {limit:g})"
    )


def select_solution(
    table: Mapping[str, Mapping[str, Any]], rule: str, max_task_loss_points: float, candidates: Sequence[str], trained: str,
) -> dict[str, Any]:  # fmt: skip
    """The chosen solution and why. `table`: solution -> row with `groups`, `delta_m_pct` and `verdicts`
    (task -> difference, interval, verdict against single-task); `trained`: the train stage's solution."""
    rows = {name: row for name, row in table.items() if name in candidates}
    if rule == "trained" or not rows:
        why = "compare.select.rule: trained" if rule == "trained" else "none of compare.select.candidates was measured"
        return {"solution": trained, "rule": rule, "met": True, "reason": f"{_describe(trained, table[trained])}: {why}"}
    ok = {n: r for n, r in rows.items() if not _misses(r, max_task_loss_points)}
    refused = [
        f"{_describe(n, r)} not: " + "; ".join(_miss_text(t, v, max_task_loss_points) for t, _, v in _misses(r, max_task_loss_points))
        for n, r in rows.items() if n not in ok
    ]  # fmt: skip
    if ok:
        key = (lambda n: (len(ok[n]["groups"]), -ok[n]["delta_m_pct"])) if rule == "fewest_networks" else (
            lambda n: (-ok[n]["delta_m_pct"], len(ok[n]["groups"])))  # fmt: skip
        chosen = min(ok, key=key)
        condition = f"no task significantly worse than its single-task model by more than {max_task_loss_points:g} points"
        how = "the fewest networks" if rule == "fewest_networks" else "the highest Δm"
        reason = f"{_describe(chosen, ok[chosen])}: {how} with {condition}"
        return {"solution": chosen, "rule": rule, "met": True, "reason": "; ".join([reason, *refused])}
    closest = min(rows, key=lambda n: (_misses(rows[n], max_task_loss_points)[0][1], len(rows[n]["groups"])))
    task, excess, v = _misses(rows[closest], max_task_loss_points)[0]
    reason = (
        f"no candidate meets compare.select (no task significantly worse by more than {max_task_loss_points:g} points); "
        f"the closest is {_describe(closest, rows[closest])}, where task {task} misses by {excess:.1f} points: "
        + _miss_text(task, v, max_task_loss_points)
    )
    return {"solution": closest, "rule": rule, "met": False, "missed": {"task": task, "points": excess}, "reason": reason}


def reference_verdicts(tasks: Sequence[str], metrics: Mapping[str, Mapping[str, float]], metric: str) -> dict[str, dict[str, Any]]:
    """The single-task solution against itself: no difference on any task."""
    return {
        t: {"metric": metric, "a": metrics[t].get(metric), "b": metrics[t].get(metric), "difference": 0.0, "low": 0.0,
            "high": 0.0, "verdict": NO_DIFFERENCE}
        for t in tasks
    }  # fmt: skip
