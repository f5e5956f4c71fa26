"""Stage `compare`: per task, multi-task vs single-task metric, their relative difference and Δm, whether
each difference is significant, and which solution to register.

Reads the test metrics and per-image test predictions of the multi-task model, of the single-task
baselines and, for a grouped model, of its all-in-one reference; tests every task's difference to its
single-task model for significance (a paired bootstrap over the test images: evaluation/significance.py)
for each solution; picks the solution the `compare.select` policy names (evaluation/selection.py),
which the register stage registers. Writes `reports/comparison.json` (the full table per task, the
solutions, the selection) and `metrics.json` (flat: the means over tasks, Δm and the negative-transfer
count; the one DVC metrics file, the columns of `dvc metrics show` and `dvc exp show`), and logs them
into the multi-task model's MLflow run. A task shows negative transfer when it is significantly worse
than its single-task model, not when its difference is merely below zero.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from mtl_core.config import PipelineConfig
from mtl_core.evaluation.comparison import compare_tasks, comparison_rows, flat_metrics
from mtl_core.evaluation.selection import reference_verdicts, select_solution, task_verdicts, verdict_metric
from mtl_core.evaluation.significance import WORSE
from mtl_core.evaluation.solutions import markdown, solutions_table
from mtl_core.evaluation.task_grouping import format_groups, mean_gradient_cosine, propose_grouping
from mtl_core.paths import TEST_PREDICTIONS_FILE, ProjectPaths
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


def _read_predictions(path: Path, tasks: list[str]) -> np.ndarray:
    frame = pd.read_csv(path)
    missing = [t for t in tasks if t not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no test predictions of task(s) {', '.join(missing)}; rerun the stage that wrote it")
    return frame[tasks].to_numpy(dtype=np.int64)


def _solution_predictions(paths: ProjectPaths, tasks: list[str], names: list[str], grouped: bool) -> dict[str, np.ndarray]:
    """(N, K) predicted classes of every test image, per solution: the trained model's (evaluate), the
    all-in-one reference's (all_in_one) and the single-task models' side by side (baselines)."""
    trained = _read_predictions(paths.test_predictions, tasks)
    out = {"single_task": np.stack([_read_predictions(paths.single_task_dir / t / TEST_PREDICTIONS_FILE, [t])[:, 0] for t in tasks], 1)}
    if grouped:
        out["grouped"] = trained
        if "all_in_one" in names:
            out["all_in_one"] = _read_predictions(paths.all_in_one_dir / TEST_PREDICTIONS_FILE, tasks)
    else:
        out["all_in_one"] = trained
    return out


def judge_solutions(
    cfg: PipelineConfig, paths: ProjectPaths, solutions: dict[str, dict[str, Any]], tasks: list[str], single: dict[str, Any],
) -> str:  # fmt: skip
    """Give every solution row its per-task verdicts against the single-task models; return the metric."""
    metric = verdict_metric(cfg.compare.metrics[0])
    sig = cfg.compare.significance
    targets = np.load(paths.labels_cache("test"))
    predictions = _solution_predictions(paths, tasks, list(solutions), "grouped" in solutions)
    for name, row in solutions.items():
        if name == "single_task":
            row["verdicts"] = reference_verdicts(tasks, single, metric)
        else:
            row["verdicts"] = task_verdicts(targets, tasks, predictions[name], predictions["single_task"], metric, sig.resamples, sig.confidence, sig.seed)
        row["worse_tasks"] = [t for t, v in row["verdicts"].items() if v["verdict"] == WORSE]
    return metric


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
    tasks = list(baselines["tasks"])
    table = compare_tasks({t: mtl[t] for t in tasks}, baselines["tasks"], list(cfg.compare.metrics))
    solutions = solutions_table(_solutions(paths, test_metrics, baselines), baselines["tasks"], primary)
    metric = judge_solutions(cfg, paths, solutions, tasks, baselines["tasks"])
    trained = "grouped" if "grouped" in solutions else "all_in_one"
    # the trained model's verdicts: negative transfer is a significant loss, not a sign
    table["verdicts"] = solutions[trained]["verdicts"]
    table["lower_than_single_task"] = table["negative_transfer"]
    table["negative_transfer"] = solutions[trained]["worse_tasks"]
    table["verdict_metric"] = metric
    select = cfg.compare.select
    selection = select_solution(solutions, select.rule, select.max_task_loss_points, select.candidates, trained)
    selection.update({"groups": solutions[selection["solution"]]["groups"], "trained": trained, "verdict_metric": metric})
    suggestion = suggest_grouping(paths) if table["negative_transfer"] else None
    report = {"enabled": True, **table, "solutions": solutions, "selection": selection, "suggested_task_groups": suggestion}
    paths.comparison.write_text(json.dumps(report, indent=2) + "\n")
    flat = flat_metrics(test_metrics, list(cfg.compare.metrics), table)
    comparison_metrics_path(paths).write_text(json.dumps(flat, indent=2) + "\n")
    rows = comparison_rows(table)
    for m, value in table["delta_m_pct"].items():
        log.info("Δm (%s) = %+.2f %%", m, value)
    for t in table["negative_transfer"]:
        v = table["verdicts"][t]
        log.warning(
            "negative transfer on task %r: multi-task %s significantly below its single-task baseline (%+.1f points, "
            "%.0f %% interval %+.1f to %+.1f)", t, metric, 100 * v["difference"], 100 * v["confidence"], 100 * v["low"], 100 * v["high"],
        )  # fmt: skip
    log.info("selection (compare.select.rule %s): %s", selection["rule"], selection["reason"])
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

    with model_run(cfg, root, "compare") as run:
        metrics = {f"compare/delta_m_pct/{m}": v for m, v in table["delta_m_pct"].items()}
        metrics[DELTA_M_METRIC] = round(table["delta_m_pct"][primary], DELTA_M_DECIMALS)  # the Results view's column
        metrics.update(
            {f"compare/{t}/{m}/relative_pct": v[m]["relative_pct"] for t, v in table["tasks"].items() for m in v}
        )
        mlflow.log_metrics(metrics)
        mlflow.log_table(pd.DataFrame(rows), artifact_file="compare/comparison_table.json")
        mlflow.log_artifact(str(paths.comparison), artifact_path="compare")
        mlflow.set_tag("mtl.negative_transfer", ",".join(table["negative_transfer"]) or "none")
        mlflow.set_tags({"mtl.selected_solution": selection["solution"], "mtl.selection_reason": selection["reason"][:5000]})
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
