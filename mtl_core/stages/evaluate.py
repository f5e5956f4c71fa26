"""Stage `evaluate`: test-split metrics per task and their mean, for DVC and for the model's MLflow run.

Writes `reports/test_metrics.json` (per task and mean over tasks; evaluation/metrics.py says which
metrics), `reports/predictions/<task>.csv` (actual/predicted), `reports/confusion/<task>.png` and
`reports/confusion_grid.png` (every task's matrix in one figure, the confusion plot of `dvc plots show`),
and logs `test/<task>/<metric>` into the MLflow run that trained the model, with the per-task table as a
sortable MLflow table and in the run's description, and a balanced-accuracy column per task in the
experiment's *Results* view.

What each task gets wrong, with the images (evaluation/image_reports.py): `reports/errors/<task>.png`
(the most confident wrong answers and the least confident right ones; `index.md` orders the tasks by
error rate), `reports/calibration.{json,png}` (expected calibration error and reliability diagrams,
raw and temperature-scaled with the temperatures the train stage fitted; ECE in test_metrics.json),
`reports/label_issues/<task>.{csv,png}` (validation and test images whose label the model contradicts
with confidence) and `reports/gradcam.png` (where each task head looks).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from mtl_core.config import PipelineConfig
from mtl_core.evaluation.metrics import mean_over_tasks
from mtl_core.evaluation.scoring import make_test_loader, score, write_test_predictions
from mtl_core.evaluation.gradcam import grad_cam
from mtl_core.evaluation.image_reports import (
    calibrated_probabilities, calibration_report, error_gallery, label_issue_report, save_calibration_figure, save_gradcam, write_error_index,
)  # fmt: skip
from mtl_core.evaluation.task_relations import error_correlation, error_correlation_gaps
from mtl_core.figures.gallery import save_tile_grid
from mtl_core.inference import predict_loader
from mtl_core.figures.confusion import plot_confusion, plot_confusion_grid
from mtl_core.figures.task_matrix import plot_task_matrix
from mtl_core.models.io import load_model, temperatures
from mtl_core.paths import ProjectPaths
from mtl_core.runtime import select_device
from mtl_core.tasks import MISSING_LABEL, majority_rates
from mtl_core.tracking.runs import model_run
from mtl_core.tracking.views import (
    ACCURACY_DECIMALS, MEAN_BALANCED_ACCURACY_METRIC, NOTE_TAG, TABLE_FILE, log_table_replacing, per_task_rows,
    publish_results_view, results_view_path, run_description, ui_base_url,
)  # fmt: skip

log = logging.getLogger(__name__)


def _error_galleries(cfg: PipelineConfig, paths: ProjectPaths, spec: dict, images: np.ndarray, probs: dict, targets: np.ndarray) -> list[dict]:
    folder = paths.errors_dir
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    reports = [
        error_gallery(t, images, probs[t], targets[:, k], spec["tasks"][t], cfg.evaluate.gallery_tiles, folder / t)
        for k, t in enumerate(spec["tasks"])
    ]  # fmt: skip
    return write_error_index(folder, reports)


def _calibration(paths: ProjectPaths, spec: dict, probs: dict, targets: np.ndarray) -> dict:
    report = calibration_report(probs, targets, list(spec["tasks"]), temperatures(spec))
    paths.calibration.write_text(json.dumps({"temperatures_from": spec.get("calibration", {}).get("fitted_on", "none (a model "
                                            "trained before calibration: T = 1)"), "tasks": report}, indent=2) + "\n")  # fmt: skip
    save_calibration_figure(report, paths.calibration.with_suffix(".png"))
    return report


def _label_issues(
    cfg: PipelineConfig, paths: ProjectPaths, model, spec: dict, device, test_images: np.ndarray, test_probs: dict, test_targets: np.ndarray,
) -> list[dict]:  # fmt: skip
    """Per task, the validation and test images whose label the model contradicts with confidence
    (the model was trained on neither: out-of-sample predictions)."""
    val_probs, val_targets = predict_loader(model, make_test_loader(cfg, paths, spec=spec, split="val"), device, cfg.train.amp)
    val_probs = calibrated_probabilities(val_probs, temperatures(spec))
    manifest = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
    rows = {s: manifest[manifest["split"] == s].reset_index(drop=True) for s in ("val", "test")}
    val_images = np.load(paths.images_cache("val"), mmap_mode="r")
    folder = paths.label_issues_dir
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out = []
    for k, task in enumerate(spec["tasks"]):
        splits = [
            ("val", val_probs[task], val_targets[:, k], val_images, rows["val"]),
            ("test", test_probs[task], test_targets[:, k], test_images, rows["test"]),
        ]
        out.append(label_issue_report(task, splits, spec["tasks"][task], cfg.evaluate.label_issue_tiles, folder / task))
    (folder / "index.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _gradcam(cfg: PipelineConfig, paths: ProjectPaths, model, spec: dict, images: np.ndarray) -> None:
    """Grad-CAM of every task head on the first `evaluate.gradcam_images` test images (CNN backbones)."""
    n = min(cfg.evaluate.gradcam_images, len(images))
    dataset = make_test_loader(cfg, paths, spec=spec).dataset
    batch = torch.stack([dataset[i][0] for i in range(n)]).cpu() if n else None
    cams, captions = {}, {}
    why = "evaluate.gradcam_images: 0" if n == 0 else None
    for task in spec["tasks"] if n else []:
        found = grad_cam(model.cpu(), batch, task)
        if found is None:
            why = f"backbone {spec['backbone']} has no convolution to explain"
            log.info("Grad-CAM: %s; skipped", why)
            break
        cams[task], predicted = found
        captions[task] = [str(spec["tasks"][task][c]) for c in predicted]
    report = {"images": list(range(n)), "answers": captions} if why is None else {"images": [], "skipped": why}
    paths.gradcam.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    if why is None:
        save_gradcam(np.asarray(images[:n]), cams, captions, paths.gradcam)
    else:  # still a file: it is a declared DVC plot
        save_tile_grid([("Grad-CAM", np.zeros((0, 1, 1, 3), np.uint8), [])], "Grad-CAM not drawn", paths.gradcam, empty_note=why)


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, dict[str, float]]
    mean: dict[str, float]


def run_evaluate(cfg: PipelineConfig, root: Path) -> EvaluateResult:
    start = time.perf_counter()
    paths = ProjectPaths(root)
    device = select_device(cfg.train.device)
    model, spec = load_model(paths.model_spec, paths.weights, device)
    per_task, confusions, probs, targets = score(model, make_test_loader(cfg, paths, spec=spec), device, cfg.train.amp)

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
    write_test_predictions(paths.test_predictions, probs)

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

    images = np.load(paths.images_cache("test"), mmap_mode="r")
    reports_start = time.perf_counter()
    calibrated = calibrated_probabilities(probs, temperatures(spec))  # what the registered model answers
    _error_galleries(cfg, paths, spec, images, calibrated, targets)
    calibration = _calibration(paths, spec, probs, targets)
    _label_issues(cfg, paths, model, spec, device, images, calibrated, targets)
    _gradcam(cfg, paths, model, spec, images)
    image_seconds = time.perf_counter() - reports_start

    mean = mean_over_tasks(per_task)
    ece = {t: {"temperature": c["temperature"], "ece_raw": c["raw"]["ece"], "ece_calibrated": c["calibrated"]["ece"]} for t, c in calibration.items()}
    paths.test_metrics.write_text(json.dumps({"tasks": per_task, "mean": mean, "calibration": ece}, indent=2) + "\n")
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
        flat.update({f"calibration/{t}/{k}": v for t, c in ece.items() for k, v in c.items() if np.isfinite(v)})
        if "balanced_accuracy" in mean:  # the Results view's rounded headline column
            flat[MEAN_BALANCED_ACCURACY_METRIC] = round(float(mean["balanced_accuracy"]), ACCURACY_DECIMALS)
        mlflow.log_metrics(flat)
        log_table_replacing(pd.DataFrame(per_task_rows(per_task, majority)).round(4), TABLE_FILE)
        what = (
            f"multi-task model, weighting `{cfg.train.weighting}`, architecture `{spec['arch']}`, backbone "
            f"`{spec['backbone']}`, evaluated on {len(targets)} test images."
        )
        calibrated = "; ".join(
            f"{t} {c['ece_raw']:.3f} → {c['ece_calibrated']:.3f} (T {c['temperature']:.2f})" for t, c in ece.items()
        )  # fmt: skip
        note = run_description(run.info.run_name, what, per_task, mean, majority)
        note += f"\nExpected calibration error on the test split, raw → temperature-scaled: {calibrated}.\n"
        mlflow.set_tag(NOTE_TAG, note)
        publish_results_view(run.info.experiment_id, model.task_names)
        mlflow.log_artifact(str(paths.test_metrics), artifact_path="metrics")
        mlflow.log_artifacts(str(paths.confusion_dir), artifact_path="plots/confusion")
        mlflow.log_artifact(str(paths.confusion_grid), artifact_path="plots")
        mlflow.log_artifact(str(paths.error_correlation), artifact_path="task_relations")
        mlflow.log_artifact(str(paths.error_correlation.with_suffix(".png")), artifact_path="task_relations")
        mlflow.log_artifacts(str(paths.errors_dir), artifact_path="errors")
        for index in (paths.errors_dir.with_suffix(".json"), paths.errors_dir.with_suffix(".md")):
            mlflow.log_artifact(str(index), artifact_path="errors")
        mlflow.log_artifacts(str(paths.label_issues_dir), artifact_path="label_issues")
        for figure in (paths.calibration, paths.calibration.with_suffix(".png"), paths.gradcam, paths.gradcam.with_suffix(".json")):
            if figure.is_file():
                mlflow.log_artifact(str(figure), artifact_path="images")
        mlflow.set_tag("mtl.evaluated", "true")
        base = ui_base_url(mlflow.get_tracking_uri(), cfg.mlflow.ui_url)
        log.info("MLflow UI (mlflow.ui_url): every run's results at %s%s", base, results_view_path(run.info.experiment_id))
    log.info(
        "evaluate: %.1f s, of which %.1f s for the image reports (errors, calibration, label problems, Grad-CAM)",
        time.perf_counter() - start, image_seconds,
    )  # fmt: skip
    return EvaluateResult(per_task, mean)
