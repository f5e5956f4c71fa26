"""What the MLflow UI shows of the runs: the experiment's kind, description and saved *Results* view, and
each run's and model version's description with its per-task test table.

A mean over tasks hides a task the model does not learn, so the run's and the model version's
descriptions lead with the table of all tasks, each beside its majority-class rate (what always
answering the test split's most frequent class scores: an accuracy at or below it is chance); the same
table is logged with the run as an MLflow table, which the UI sorts.
"""

from __future__ import annotations

import json
import math
import posixpath
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# How the MLflow UI (3.x) shows the experiment. Its GenAI / "Model training" switch is a setting of each
# browser (default GenAI) that `?workflowType=machine_learning` in a URL overrides; MLflow UIs that pick
# the view from the experiment read the experiment-kind tag instead, so both are set (docs: MLflow).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" / "Model training" experiments
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"  # the chart view leads with it
# the default decision metric (compare.metrics[0], config.CompareConfig): a head that always answers its
# majority class scores chance on it, where its accuracy looks good
PRIMARY_METRIC = "test/mean/balanced_accuracy"
NOTE_TAG = "mlflow.note.content"  # the description of an experiment or a run (markdown)
# A saved view of the runs table is an experiment tag `mlflow.sharedViewState.<key>` (the UI's Views menu,
# and the URL `...#/experiments/<id>/runs?viewStateShareKey=<key>`): the runs table, by default, shows no
# metric column at all; this view shows the test accuracies and Δm, best run first.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RESULTS_VIEW = "mtl-results"
RESULTS_VIEW_NAME = "Results"
EXPERIMENT_NOTE = """Runs of the mtl-pipeline, named after what they trained:

* `mtl-<weighting>-<backbone>`: a multi-task model (`mtl-famo-resnet18`; the architecture is named when it is
  not hard sharing, `-groups` marks a model of task groups); its description has the per-task test table;
* `stl-<task>-<backbone>`: the single-task baseline of one task, for Δm (`compare/delta_m_pct/<metric>`).

The saved view *Results* (Views menu) shows, after the run's name, Δm (`delta_m`, in %, rounded) and the
mean test balanced accuracy (`mean_bal_acc`, rounded), then the mean accuracy, the balanced accuracy of
every task and Δm unrounded, best run first (balanced accuracy: a head that always answers the majority
class scores chance, 1/classes, however imbalanced the task). In a run's *Model metrics* tab the learning
curves (`by_epoch/...`) come first.
"""
# The headline numbers, rounded, under names short enough for a runs-table column header: the first
# columns of the *Results* view (the unrounded values stay in `compare/delta_m_pct/<metric>` and
# `test/mean/<metric>`). `delta_m` is named as in metrics.json (`dvc metrics show`, `dvc exp show`).
DELTA_M_METRIC = "delta_m"  # Δm in % on compare.metrics[0], 2 decimals (compare stage)
MEAN_BALANCED_ACCURACY_METRIC = "mean_bal_acc"  # the mean test balanced accuracy, 3 decimals (evaluate stage)
DELTA_M_DECIMALS, ACCURACY_DECIMALS = 2, 3


def results_view_state(tasks: list[str] | tuple[str, ...] = (), keep: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The runs table of the saved view *Results*: after the run's name (always the first column), Δm and
    the mean test balanced accuracy, rounded; then the mean accuracy, the per-task balanced accuracy, Δm on
    both metrics unrounded and the registered model as columns (then those of `keep` not among them),
    sorted by the mean test balanced accuracy, best first."""
    metrics = [
        DELTA_M_METRIC, MEAN_BALANCED_ACCURACY_METRIC, "test/mean/accuracy",
        *(f"test/{t}/balanced_accuracy" for t in tasks),
        "compare/delta_m_pct/balanced_accuracy", "compare/delta_m_pct/accuracy", PRIMARY_METRIC,
    ]  # fmt: skip
    ours = [f"metrics.`{m}`" for m in metrics] + ["attributes.`Models`", "attributes.`Dataset`"]
    columns = list(dict.fromkeys([*ours, *keep]))
    return {
        "orderByKey": f"metrics.`{PRIMARY_METRIC}`", "orderByAsc": False,
        "selectedColumns": columns, "columnOrder": columns,
    }  # fmt: skip


def results_view_tag(tasks: list[str] | tuple[str, ...] = (), keep: list[str] | tuple[str, ...] = ()) -> tuple[str, str]:
    """(tag key, value) of the saved view: the UI's envelope {name, createdAt, updatedAt, state}, whose
    `state` is the JSON of the view (the UI saves it compressed, and reads it either way)."""
    now_ms = int(time.time() * 1000)
    state = json.dumps(results_view_state(tasks, keep))
    value = {"name": RESULTS_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": state}
    return VIEW_TAG_PREFIX + RESULTS_VIEW, json.dumps(value)


def results_view_path(experiment_id: str) -> str:
    """The UI path (after the server's address) that opens the experiment's runs on the *Results* view,
    in the "Model training" mode whatever the browser had chosen."""
    return f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={RESULTS_VIEW}"


def ui_base_url(tracking_uri: str, ui_url: str) -> str:
    """Where the MLflow UI of `tracking_uri` is: the tracking server itself (http, https), else `ui_url`
    (mlflow.ui_url: where `mlflow ui` serves a local store)."""
    base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else ui_url
    return base.rstrip("/")


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def version_url(base: str, model_name: str, version: str) -> str:
    return f"{base}/#/models/{model_name}/versions/{version}"


def ui_experiment_tags() -> dict[str, str]:
    """The tags a new experiment gets: opens on training runs, leads with the mean test accuracy, says what
    its runs are, and has the *Results* view (without per-task columns until a model is evaluated)."""
    key, view = results_view_tag()
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, PRIMARY_METRIC_TAG: PRIMARY_METRIC, NOTE_TAG: EXPERIMENT_NOTE, key: view}


def publish_results_view(experiment_id: str, tasks: list[str]) -> None:
    """Give the *Results* view a test balanced-accuracy column for each of `tasks` (the evaluate stage knows them),
    keeping the columns it has (another project's tasks in the same experiment).

    A view saved from the UI (its state compressed, which this does not read) is the user's: left alone."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    key, _ = results_view_tag()
    current = client.get_experiment(experiment_id).tags.get(key)
    shown: list[str] = []
    if current is not None:
        try:
            shown = list(json.loads(json.loads(current)["state"])["selectedColumns"])
        except (ValueError, KeyError, TypeError):
            return
    wanted = results_view_state(tasks, keep=shown)["selectedColumns"]
    if wanted != shown:
        client.set_experiment_tag(experiment_id, key, results_view_tag(tasks, keep=shown)[1])


TABLE_FILE = "metrics/test_per_task.json"  # run artifact of mlflow.log_table
# the columns of the table (evaluation/metrics.py; auroc and average_precision: two-class tasks, else null)
TABLE_METRICS = (
    "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc", "average_precision",
)  # fmt: skip


def per_task_rows(per_task: Mapping[str, Mapping[str, float]], majority: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per task: its test metrics, labelled test images (`support`) and majority-class rate."""
    rows = []
    for task, values in per_task.items():
        row: dict[str, Any] = {"task": task}
        row.update({m: _number(values.get(m)) for m in TABLE_METRICS})
        row["support"] = int(values.get("support", 0))
        row["majority_rate"] = _number((majority or {}).get(task))
        rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def task_table_markdown(
    per_task: Mapping[str, Mapping[str, float]], mean: Mapping[str, float], majority: Mapping[str, float] | None = None
) -> str:
    """The markdown table: a row per task (accuracy, balanced accuracy, macro F1, AUROC of a two-class
    task, labelled test images, majority-class rate, a mark where the accuracy is no better than that
    rate), then the mean over tasks (AUROC: over the two-class tasks)."""
    lines = [
        "| task | accuracy | balanced acc. | macro F1 | AUROC | test images | majority class |",
        "|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for row in per_task_rows(per_task, majority):
        accuracy, chance, n = row["accuracy"], row["majority_rate"], row["support"]
        # compared as counts of test images, as the champion gate does: a float32 accuracy of 1/3 is above 1/3
        at_chance = accuracy is not None and chance is not None and n and round(accuracy * n) <= round(chance * n)
        mark = " (chance)" if at_chance else ""
        lines.append(
            f"| {row['task']} | {_cell(accuracy)}{mark} | {_cell(row['balanced_accuracy'])} | {_cell(row['f1_macro'])} "
            f"| {_cell(row['auroc'])} | {row['support']} | {_cell(chance)} |"
        )
    means = [_cell(_number(mean.get(m))) for m in ("accuracy", "balanced_accuracy", "f1_macro", "auroc")]
    lines.append(f"| **mean** | **{means[0]}** | **{means[1]}** | {means[2]} | {means[3]} | | |")
    return "\n".join(lines)


def run_description(
    name: str, what: str, per_task: Mapping[str, Mapping[str, float]], mean: Mapping[str, float],
    majority: Mapping[str, float] | None = None,
) -> str:
    """The run's description (`mlflow.note.content`): what it trained, then its per-task test table."""
    return (
        f"**{name}**: {what}\n\n"
        f"Test split, per task:\n\n{task_table_markdown(per_task, mean, majority)}\n\n"
        f"(Sortable: artifact `{TABLE_FILE}`; *(chance)*: no better than always answering the test split's "
        "most frequent class.)\n"
    )


def version_description(
    run_name: str, run_id: str, gate: str, per_task: Mapping[str, Mapping[str, float]], mean: Mapping[str, float],
    majority: Mapping[str, float] | None = None, comparison: Mapping[str, Any] | None = None,
) -> str:
    """The model version's description: its run, the champion gate's verdict, the per-task test table and,
    when the model was compared with single-task models (`comparison`: reports/comparison.json), Δm and
    the per-task comparison."""
    text = (
        f"Trained by run **{run_name}** (`{run_id}`). Champion gate: {gate}.\n\n"
        f"Test split, per task:\n\n{task_table_markdown(per_task, mean, majority)}\n"
    )
    if comparison and comparison.get("enabled"):
        text = with_section(text, COMPARISON_HEADING, comparison_markdown(comparison))
    return text


# ------------------------------------------------------------------------------ Δm and the comparison

COMPARISON_HEADING = "Multi-task against single-task"
VERDICT_KEY = "verdict"
"""Where the per-task significance verdict (`better`, `worse`, `no significant difference`) is read from
in reports/comparison.json: `verdicts.<task>.verdict` (the compare stage's paired bootstrap), else
`tasks.<task>.verdict` or `tasks.<task>.<primary metric>.verdict`. A report without one (compare.significance
off, an older report) gives the tables no significance column."""


def task_verdict(report: Mapping[str, Any], task: str) -> str | None:
    """The significance verdict of `task` in the comparison report (VERDICT_KEY), None when it has none."""
    entry = report.get("tasks", {}).get(task, {})
    verdict = (report.get("verdicts") or {}).get(task, {}).get(VERDICT_KEY) or entry.get(VERDICT_KEY)
    if verdict is None and isinstance(entry.get(report.get("primary_metric")), Mapping):
        verdict = entry[report["primary_metric"]].get(VERDICT_KEY)
    return str(verdict) if verdict is not None else None


def comparison_markdown(report: Mapping[str, Any]) -> str:
    """Δm and, per task, the multi-task and single-task test value of the primary metric and their relative
    difference (negative transfer marked), with a significance column when the report has verdicts."""
    primary = report["primary_metric"]
    delta = report["delta_m_pct"]
    tasks = {t: v[primary] for t, v in report["tasks"].items() if isinstance(v.get(primary), Mapping)}
    verdicts = {t: task_verdict(report, t) for t in tasks}
    significance = any(verdicts.values())
    columns = ["task", "multi-task", "single-task", "difference", "negative transfer"] + (["significance"] if significance else [])
    lines = [_row(columns), "|:--|--:|--:|--:|:--|" + (":--|" if significance else "")]
    for task, v in tasks.items():
        cells = [task, _cell(_number(v["mtl"])), _cell(_number(v["stl"])), _pct(v["relative_pct"]),
                 "yes" if task in report.get("negative_transfer", []) else ""]  # fmt: skip
        lines.append(_row(cells + ([verdicts[task] or ""] if significance else [])))
    lines.append(_row(["**Δm**", "", "", f"**{_pct(delta[primary])}**", ""] + ([""] if significance else [])))
    others = ", ".join(f"on {m}: {_pct(v)}" for m, v in delta.items() if m != primary)
    return (
        f"Test {primary}, each task's multi-task model against a single-task model trained for that task alone "
        f"(same backbone, budget and data); difference = (multi − single) / single × 100. **Δm = "
        f"{_pct(delta[primary])}** (the mean difference over tasks{'; ' + others if others else ''}).\n\n"
        + "\n".join(lines) + "\n"
    )


def _row(cells: list[str]) -> str:
    """A markdown table row; an empty cell is `| |`."""
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def _pct(value: Any) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:+.2f} %"


def with_section(text: str, heading: str, body: str | None) -> str:
    """`text` with its section `### <heading>` replaced by `body` (added at the end when it has none,
    removed when `body` is None); a section runs to the next `### ` heading or the end."""
    lines = text.rstrip("\n").split("\n")
    marker = f"### {heading}"
    if marker in lines:
        start = lines.index(marker)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("### ")), len(lines))
        lines = lines[:start] + lines[end:]
    kept = "\n".join(lines).rstrip("\n")
    if body is None:
        return kept + "\n"
    return f"{kept}\n\n{marker}\n\n{body.rstrip()}\n"




def log_table_replacing(frame: pd.DataFrame, artifact_file: str) -> None:
    """`mlflow.log_table` into the active run, replacing the table instead of appending to it when the run
    has it already (evaluate rerun in the same run: DVC reran the stage after a code change)."""
    import mlflow

    run_id = mlflow.active_run().info.run_id
    folder, name = posixpath.split(artifact_file)
    if not any(a.path == artifact_file for a in mlflow.MlflowClient().list_artifacts(run_id, folder or None)):
        mlflow.log_table(frame, artifact_file)
        return
    with tempfile.TemporaryDirectory(prefix="mtl-table-") as tmp:
        path = Path(tmp) / name
        frame.to_json(path, orient="split", index=False, date_format="iso")  # as log_table writes it
        mlflow.log_artifact(str(path), artifact_path=folder or None)
