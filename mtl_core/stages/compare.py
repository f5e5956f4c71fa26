"""Stage `compare`: per task, multi-task vs single-task metric, their relative difference and Δm.

Reads the test metrics of the multi-task model and of the single-task baselines, writes
`reports/comparison.json` (the full table, per task) and `metrics.json` (flat: the means over tasks,
Δm and the negative-transfer count; the one DVC metrics file, the columns of `dvc metrics show` and
`dvc exp show`), and logs the table, Δm and the negative-transfer flags into
the multi-task model's MLflow run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from mtl_core.config import PipelineConfig
from mtl_core.evaluation.comparison import compare_tasks, comparison_rows, flat_metrics
from mtl_core.evaluation.solutions import markdown, solutions_table
from mtl_core.evaluation.task_grouping import format_groups, mean_gradient_cosine, propose_grouping
from mtl_core.paths import ProjectPaths
from mtl_core.tracking.runs import model_run
from mtl_core.tracking.views import COMPARISON_HEADING, DELTA_M_DECIMALS, DELTA_M_METRIC, NOTE_TAG, comparison_markdown, with_section

log = logging.getLogger(__name__)


def comparison_metrics_path(paths: ProjectPaths) -> Path:
    """The flat metrics file of the compare stage, the project's one `metrics:` file in dvc.yaml. Outside the git-ignored
    `reports/`: DVC commits an experiment's `cache: false` metrics with git, and skips ignored files, so
    only a file git can track has its values in `dvc exp show`."""
    return paths.root / "metrics.json"


def _solutions(paths: ProjectPaths, test_metrics: dict[str, Any], baselines: dict[str, Any]) -> dict[str, tuple]:
    """(groups, per-task test metrics, cost) of the trained model, of the single-task models and, for a
    grouped model, of its all-in-one reference (stage all_in_one)."""
    tasks = list(baselines["tasks"])
    train = json.loads(paths.train_metrics.read_text())
    cost = {"train_seconds": train["train_seconds"], "parameters": train["parameters"]}
    out: dict[str, tuple] = {"single_task": ([[t] for t in tasks], baselines["tasks"], baselines["cost"])}
    groups = train.get("task_groups")
    if groups:
        out["grouped"] = (groups, test_metrics["tasks"], cost)
        reference = json.loads(paths.all_in_one_metrics.read_text()) if paths.all_in_one_metrics.is_file() else {}
        if reference.get("enabled"):
            out["all_in_one"] = ([tasks], reference["tasks"], reference["cost"])
    else:
        out["all_in_one"] = ([tasks], test_metrics["tasks"], cost)
    return out


def suggest_grouping(paths: ProjectPaths) -> dict[str, Any] | None:
    """The grouping the train stage's task-gradient cosines suggest (task_grouping.propose_grouping);
    None when they were not measured."""
    measured = mean_gradient_cosine(paths.gradient_cosine)
    if measured is None:
        return None
    tasks, affinity = measured
    return {**propose_grouping(affinity, tasks).as_dict(), "affinity": "mean task-gradient cosine over epochs"}


def run_compare(cfg: PipelineConfig, root: Path) -> dict[str, Any]:
    paths = ProjectPaths(root)
    baselines = json.loads(paths.single_task_metrics.read_text())
    test_metrics = json.loads(paths.test_metrics.read_text())
    primary = cfg.compare.metrics[0]
    if not baselines.get("enabled"):
        report: dict[str, Any] = {"enabled": False, "reason": baselines.get("reason", "no single-task baselines")}
        paths.comparison.write_text(json.dumps(report, indent=2) + "\n")
        flat = flat_metrics(test_metrics, list(cfg.compare.metrics))
        comparison_metrics_path(paths).write_text(json.dumps(flat, indent=2) + "\n")
        return report

    mtl = test_metrics["tasks"]
    table = compare_tasks(
        {t: mtl[t] for t in baselines["tasks"]}, baselines["tasks"], list(cfg.compare.metrics)
    )
    solutions = solutions_table(_solutions(paths, test_metrics, baselines), baselines["tasks"], primary)
    suggestion = suggest_grouping(paths) if table["negative_transfer"] else None
    report = {"enabled": True, **table, "solutions": solutions, "suggested_task_groups": suggestion}
    paths.comparison.write_text(json.dumps(report, indent=2) + "\n")
    flat = flat_metrics(test_metrics, list(cfg.compare.metrics), table)
    comparison_metrics_path(paths).write_text(json.dumps(flat, indent=2) + "\n")
    rows = comparison_rows(table)
    for m, value in table["delta_m_pct"].items():
        log.info("Δm (%s) = %+.2f %%", m, value)
    for t in table["negative_transfer"]:
        log.warning("negative transfer on task %r: multi-task %s below its single-task baseline", t, table["primary_metric"])
    solutions_md = markdown(solutions, list(baselines["tasks"]), primary)
    log.info("solutions (%s on the test split, Δm against single-task):\n%s", primary, solutions_md)
    if suggestion is not None:
        if len(suggestion["groups"]) > 1:
            log.warning(
                "negative transfer on %s: the task-gradient affinities measured in training suggest "
                "model.task_groups: %s (affinity score %.3f against %.3f all-in-one)",
                ", ".join(table["negative_transfer"]), format_groups(suggestion["groups"]), suggestion["score"],
                suggestion["all_in_one_score"],
            )  # fmt: skip
        else:
            log.info("the task-gradient affinities measured in training do not suggest splitting the tasks")

    with model_run(cfg, root) as run:
        metrics = {f"compare/delta_m_pct/{m}": v for m, v in table["delta_m_pct"].items()}
        metrics[DELTA_M_METRIC] = round(table["delta_m_pct"][primary], DELTA_M_DECIMALS)  # the Results view's column
        metrics.update(
            {f"compare/{t}/{m}/relative_pct": v[m]["relative_pct"] for t, v in table["tasks"].items() for m in v}
        )
        mlflow.log_metrics(metrics)
        mlflow.log_table(pd.DataFrame(rows), artifact_file="compare/comparison_table.json")
        mlflow.log_artifact(str(paths.comparison), artifact_path="compare")
        mlflow.set_tag("mtl.negative_transfer", ",".join(table["negative_transfer"]) or "none")
        mlflow.log_text(solutions_md + "\n", "compare/solutions.md")
        for name, row in solutions.items():
            mlflow.log_metrics({f"compare/{name}/delta_m_pct": row["delta_m_pct"], f"compare/{name}/train_seconds": row["train_seconds"],
                                f"compare/{name}/parameters": row["parameters"]})  # fmt: skip
        if suggestion is not None:
            mlflow.set_tag("mtl.suggested_task_groups", format_groups(suggestion["groups"]))
        # the run's description (evaluate's per-task test table) gets Δm and the per-task comparison
        note = mlflow.MlflowClient().get_run(run.info.run_id).data.tags.get(NOTE_TAG, "")
        mlflow.set_tag(NOTE_TAG, with_section(note, COMPARISON_HEADING, comparison_markdown(report)))
    return report
