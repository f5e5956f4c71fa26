"""The ways to serve K tasks, side by side: all-in-one, grouped (`model.task_groups`), one per task.

For each solution: its groups, its test metric per task, Δm against the single-task models
(mtl_core/evaluation/comparison.py; 0 for the single-task solution itself), and what it cost to train:
training seconds and parameters (summed over its networks). A Markdown rendering goes into the
compare stage's log and MLflow run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtl_core.evaluation.comparison import relative_difference

SOLUTION_ORDER = ("all_in_one", "grouped", "single_task")


def solution_row(
    groups: Sequence[Sequence[str]],
    metrics: dict[str, dict[str, float]],
    single_task: dict[str, dict[str, float]],
    metric: str,
    cost: dict[str, float],
) -> dict[str, Any]:
    # a metric only two-class tasks have (auroc, average_precision) is compared over those tasks
    tasks = [t for g in groups for t in g if metric in metrics[t] and metric in single_task[t]]
    rel = [relative_difference(metrics[t][metric], single_task[t][metric]) for t in tasks]
    return {
        "groups": [list(g) for g in groups],
        metric: {t: metrics[t][metric] for t in tasks},
        "delta_m_pct": sum(rel) / len(rel),
        "train_seconds": float(cost["train_seconds"]),
        "parameters": int(cost["parameters"]),
    }


def solutions_table(
    solutions: dict[str, tuple[Sequence[Sequence[str]], dict[str, dict[str, float]], dict[str, float]]],
    single_task: dict[str, dict[str, float]],
    metric: str,
) -> dict[str, dict[str, Any]]:
    """`solutions`: name -> (groups, per-task test metrics, cost); rows in SOLUTION_ORDER."""
    return {
        name: solution_row(solutions[name][0], solutions[name][1], single_task, metric, solutions[name][2])
        for name in SOLUTION_ORDER if name in solutions
    }  # fmt: skip


MAX_TASK_COLUMNS = 8  # beyond, the table turns: a row per task, a column per solution


def markdown(table: dict[str, dict[str, Any]], tasks: Sequence[str], metric: str) -> str:
    """The solutions side by side: a row per solution and a column per task, or, for more than
    MAX_TASK_COLUMNS tasks (no log or UI shows forty columns), a row per task and a column per solution,
    the totals last. A task without `metric` reads n/a."""
    value = lambda row, t: f"{row[metric][t]:.3f}" if t in row[metric] else "n/a"  # noqa: E731
    names = [name.replace("_", "-") for name in table]
    if len(tasks) > MAX_TASK_COLUMNS:
        lines = ["| " + " | ".join(["task", *names]) + " |", "|" + " --- |" * (len(names) + 1)]
        lines += ["| " + " | ".join([t, *[value(row, t) for row in table.values()]]) + " |" for t in tasks]
        for label, cell in (
            ("networks", lambda r: str(len(r["groups"]))), ("Δm %", lambda r: f"{r['delta_m_pct']:+.2f}"),
            ("significantly worse", lambda r: str(len(r.get("worse_tasks", [])))),
            ("train s", lambda r: f"{r['train_seconds']:.0f}"), ("parameters", lambda r: f"{r['parameters'] / 1e6:.2f} M"),
        ):  # fmt: skip
            lines.append("| " + " | ".join([f"**{label}**", *[cell(r) for r in table.values()]]) + " |")
        return "\n".join(lines)
    judged = any("worse_tasks" in row for row in table.values())
    cols = ["solution", "networks", *tasks, "Δm %", *(["significantly worse"] if judged else []), "train s", "parameters"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for name, row in zip(names, table.values()):
        worse = [", ".join(row.get("worse_tasks", [])) or "none"] if judged else []
        cells = [name, str(len(row["groups"])), *[value(row, t) for t in tasks], f"{row['delta_m_pct']:+.2f}", *worse,
                 f"{row['train_seconds']:.0f}", f"{row['parameters'] / 1e6:.2f} M"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
