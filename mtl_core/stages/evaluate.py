"""Stage `evaluate`: test-split metrics per task and their mean, for DVC and for the model's MLflow run.

Writes `reports/test_metrics.json` (per task and mean over tasks; evaluation/metrics.py says which
metrics), `reports/predictions/<task>.csv` (actual/predicted), `reports/confusion/<task>.png` and
`reports/confusion_grid.png` (every task's matrix in one figure, the confusion plot of `dvc plots show`),
and logs `test/<task>/<metric>` into the MLflow run that trained the model, with the per-task table as a
sortable MLflow table and in the run's description, and a balanced-accuracy column per task in the
experiment's *Results* view.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from mtl_core.config import PipelineConfig
from mtl_core.evaluation.metrics import mean_over_tasks
from mtl_core.evaluation.scoring import make_test_loader, score
from mtl_core.evaluation.task_relations import error_correlation, error_correlation_gaps
from mtl_core.figures.confusion import plot_confusion, plot_confusion_grid
from mtl_core.figures.task_matrix import plot_task_matrix
from mtl_core.models.io import load_model
from mtl_core.paths import ProjectPaths
from mtl_core.runtime import select_device
from mtl_core.tasks import MISSING_LABEL, majority_rates
from mtl_core.tracking.runs import model_run
from mtl_core.tracking.views import (
    ACCURACY_DECIMALS, MEAN_BALANCED_ACCURACY_METRIC, NOTE_TAG, TABLE_FILE, log_table_replacing, per_task_rows,
    publish_results_view, results_view_path, run_description, ui_base_url,
)  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, dict[str, float]]
    mean: dict[str, float]


def run_evaluate(cfg: PipelineConfig, root: Path) -> EvaluateResult:
    paths = ProjectPaths(root)
    device = select_device(cfg.train.device)
    model, spec = load_model(paths.model_spec, paths.weights, device)
    per_task, confusions, probs, targets = score(model, make_test_loader(cfg, paths), device, cfg.train.amp)

    paths.predictions_dir.mkdir(parents=True, exist_ok=True)
    paths.confusion_dir.mkdir(parents=True, exist_ok=True)
    for k, task in enumerate(model.task_names):
        classes = np.asarray(spec["tasks"][task])
        labelled = targets[:, k] != MISSING_LABEL
        pd.DataFrame(
            {"actual": classes[targets[labelled, k]], "predicted": classes[probs[task][labelled].argmax(1)]}
        ).to_csv(paths.predictions_dir / f"{task}.csv", index=False)
        plot_confusion(confusions[task], list(classes), task, paths.confusion_dir / f"{task}.png")
    plot_confusion_grid(confusions, {t: spec["tasks"][t] for t in model.task_names}, paths.confusion_grid)

    errors = error_correlation(probs, targets, model.task_names)
    correlation = [[None if np.isnan(v) else v for v in row] for row in errors.tolist()]  # JSON has no NaN
    paths.error_correlation.write_text(json.dumps({"tasks": model.task_names, "correlation": correlation}, indent=2) + "\n")
    plot_task_matrix(
        errors, model.task_names, "correlation of per-sample test errors", paths.error_correlation.with_suffix(".png"),
        na_note=[
            "a correlation needs errors that vary, on test images labelled for both tasks",
            *error_correlation_gaps(probs, targets, model.task_names),
        ],
    )  # fmt: skip

    mean = mean_over_tasks(per_task)
    paths.test_metrics.write_text(json.dumps({"tasks": per_task, "mean": mean}, indent=2) + "\n")
    for task, values in per_task.items():
        log.info(
            "test %s (%d labelled samples): %s",
            task, values["support"], ", ".join(f"{m} {v:.3f}" for m, v in values.items() if m != "support"),
        )  # fmt: skip
    log.info("test mean over tasks: %s", ", ".join(f"{m} {v:.3f}" for m, v in mean.items()))

    majority = majority_rates(targets, model.task_names)
    with model_run(cfg, root) as run:
        flat = {f"test/{t}/{m}": float(v) for t, vs in per_task.items() for m, v in vs.items() if m != "support"}
        flat.update({f"test/mean/{m}": v for m, v in mean.items()})
        if "balanced_accuracy" in mean:  # the Results view's rounded headline column
            flat[MEAN_BALANCED_ACCURACY_METRIC] = round(float(mean["balanced_accuracy"]), ACCURACY_DECIMALS)
        mlflow.log_metrics(flat)
        log_table_replacing(pd.DataFrame(per_task_rows(per_task, majority)).round(4), TABLE_FILE)
        what = (
            f"multi-task model, weighting `{cfg.train.weighting}`, architecture `{spec['arch']}`, backbone "
            f"`{spec['backbone']}`, evaluated on {len(targets)} test images."
        )
        mlflow.set_tag(NOTE_TAG, run_description(run.info.run_name, what, per_task, mean, majority))
        publish_results_view(run.info.experiment_id, model.task_names)
        mlflow.log_artifact(str(paths.test_metrics), artifact_path="metrics")
        mlflow.log_artifacts(str(paths.confusion_dir), artifact_path="plots/confusion")
        mlflow.log_artifact(str(paths.confusion_grid), artifact_path="plots")
        mlflow.log_artifact(str(paths.error_correlation), artifact_path="task_relations")
        mlflow.log_artifact(str(paths.error_correlation.with_suffix(".png")), artifact_path="task_relations")
        mlflow.set_tag("mtl.evaluated", "true")
        base = ui_base_url(mlflow.get_tracking_uri(), cfg.mlflow.ui_url)
        log.info("MLflow UI (mlflow.ui_url): every run's results at %s%s", base, results_view_path(run.info.experiment_id))
    return EvaluateResult(per_task, mean)
