"""Multi-task vs single-task: per-task relative difference and the overall gain Δm.

Δm (Maninis, Radosavovic & Kokkinos 2019; Vandenhende et al. 2021) is the mean over tasks of the
relative difference of the multi-task metric to the single-task baseline, in percent:

    Δm = (1/K) Σ_t (M_mtl,t − M_stl,t) / M_stl,t × 100

with every metric higher-is-better here. A task whose relative difference is below zero suffers
negative transfer: the shared network does worse on it than a network trained for it alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def relative_difference(mtl: float, stl: float) -> float:
    """(mtl − stl) / stl × 100; NaN when the baseline is 0 (no relative change is defined)."""
    return (mtl - stl) / stl * 100.0 if stl != 0 else math.nan


def compare_tasks(
    mtl: dict[str, dict[str, float]], stl: dict[str, dict[str, float]], metrics: Sequence[str]
) -> dict[str, Any]:
    """The comparison table: per task and metric, both values and their relative difference; Δm per
    metric; the tasks with negative transfer on the first (primary) metric.

    A metric only some tasks have (`auroc`, `average_precision`: two-class tasks, evaluation/metrics.py)
    is compared, and its Δm averaged, over the tasks that have it on both sides; the other tasks have no
    entry for it (and, for the primary metric, no negative-transfer verdict)."""
    missing = sorted(set(mtl) ^ set(stl))
    if missing:
        raise ValueError(f"multi-task and single-task results cover different tasks: {', '.join(missing)}")
    tasks: dict[str, dict[str, dict[str, float]]] = {}
    for t in mtl:
        tasks[t] = {
            m: {"mtl": mtl[t][m], "stl": stl[t][m], "relative_pct": relative_difference(mtl[t][m], stl[t][m])}
            for m in metrics if m in mtl[t] and m in stl[t]
        }
    delta_m = {}
    for m in metrics:
        having = [t for t in tasks if m in tasks[t]]
        if not having:
            raise ValueError(
                f"compare.metrics names {m!r}, which none of the tasks has on both the multi-task and the "
                "single-task side (auroc and average_precision: two-class tasks with both classes in the "
                "test labels only)"
            )
        delta_m[m] = sum(tasks[t][m]["relative_pct"] for t in having) / len(having)
    primary = metrics[0]
    negative = [t for t in tasks if primary in tasks[t] and tasks[t][primary]["relative_pct"] < 0]
    return {"primary_metric": primary, "tasks": tasks, "delta_m_pct": delta_m, "negative_transfer": negative}


def flat_metrics(mtl: dict[str, Any], metrics: Sequence[str], table: dict[str, Any] | None = None) -> dict[str, float]:
    """The headline numbers, one flat level: the columns of `dvc metrics show` and `dvc exp show`.

    For each of `metrics` (compare.metrics, the first one primary), the multi-task model's mean over
    tasks on the test split, `mean_mtl_<metric>`; with the comparison `table`, also `delta_m` (Δm in %
    on the primary metric), `delta_m_<other metric>` and `negative_transfer_tasks` (how many). Means
    only, no per-task figure: with tens of tasks one column per task makes a table no terminal shows;
    the per-task values are in reports/test_metrics.json and reports/comparison.json.

    `mtl` is the evaluate stage's report: `{"tasks": {task: {metric: value}}, "mean": {metric: value}}`."""
    primary = metrics[0]
    flat: dict[str, float] = {}
    if table is not None:
        flat["delta_m"] = table["delta_m_pct"][primary]
        flat.update({f"delta_m_{m}": v for m, v in table["delta_m_pct"].items() if m != primary})
        flat["negative_transfer_tasks"] = len(table["negative_transfer"])
    flat.update({f"mean_mtl_{m}": mtl["mean"][m] for m in metrics if m in mtl["mean"]})
    return flat


def comparison_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (one per task) for a Markdown / MLflow table."""
    m = table["primary_metric"]
    return [
        {
            "task": t,
            f"mtl_{m}": round(v[m]["mtl"], 4),
            f"stl_{m}": round(v[m]["stl"], 4),
            "relative_pct": round(v[m]["relative_pct"], 2),
            **({"verdict": table["verdicts"][t]["verdict"]} if "verdicts" in table else {}),
            "negative_transfer": t in table["negative_transfer"],
        }
        for t, v in table["tasks"].items() if m in v
    ]  # fmt: skip
