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
    tasks = [t for g in groups for t in g]
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


def markdown(table: dict[str, dict[str, Any]], tasks: Sequence[str], metric: str) -> str:
    cols = ["solution", "networks", *tasks, "Δm %", "train s", "parameters"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for name, row in table.items():
        cells = [name.replace("_", "-"), str(len(row["groups"])), *[f"{row[metric][t]:.3f}" for t in tasks],
                 f"{row['delta_m_pct']:+.2f}", f"{row['train_seconds']:.0f}", f"{row['parameters'] / 1e6:.2f} M"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
