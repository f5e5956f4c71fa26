"""What each task gets wrong, shown with the images: the error gallery, the suspected label problems,
calibration before and after temperature scaling, and Grad-CAM per task head. Each report is computed
from plain arrays (the test images from the preprocessed cache, probabilities, labels) and written as a
figure plus the JSON or CSV it is drawn from, so that a test can read back what a figure shows."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtl_core.calibration import log_probabilities, reliability, softmax
from mtl_core.evaluation.label_issues import find_label_issues
from mtl_core.figures.gallery import cam_grid_figure, reliability_figure, save_tile_grid
from mtl_core.tasks import MISSING_LABEL

log = logging.getLogger(__name__)


def _caption(classes: Sequence[str], true: int, predicted: int, p: float) -> str:
    return f"true {classes[true]}\npred {classes[predicted]} {p:.2f}"


def error_gallery(
    task: str, images: np.ndarray, probs: np.ndarray, targets: np.ndarray, classes: Sequence[str], tiles: int, out: Path
) -> dict[str, Any]:
    """reports/errors/<task>.png (and the record it is drawn from, returned): the `tiles` wrong answers given with the highest confidence and
    the `tiles` right answers given with the lowest, on the labelled test images (`probs`: the calibrated
    probabilities, what the registered model answers)."""
    labelled = np.flatnonzero(targets != MISSING_LABEL)
    predicted, confidence = probs.argmax(1), probs.max(1)
    wrong = labelled[predicted[labelled] != targets[labelled]]
    right = labelled[predicted[labelled] == targets[labelled]]
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:tiles]
    unsure = right[np.argsort(confidence[right], kind="stable")][:tiles]
    record = lambda i: {"index": int(i), "true": classes[targets[i]], "predicted": classes[predicted[i]],  # noqa: E731
                        "probability": float(confidence[i])}  # fmt: skip
    report = {
        "task": task, "test_images": int(len(labelled)), "errors": int(len(labelled) - (predicted[labelled] == targets[labelled]).sum()),
        "error_rate": float((predicted[labelled] != targets[labelled]).mean()) if len(labelled) else float("nan"),
        "confident_wrong": [record(i) for i in wrong], "unsure_right": [record(i) for i in unsure],
    }  # fmt: skip
    sections = [
        ("wrong, most confident", images[wrong], [_caption(classes, targets[i], predicted[i], confidence[i]) for i in wrong]),
        ("right, least confident", images[unsure], [_caption(classes, targets[i], predicted[i], confidence[i]) for i in unsure]),
    ]
    rate = f"{report['errors']} of {report['test_images']} test images wrong" if len(labelled) else "no labelled test image"
    save_tile_grid(sections, f"{task}: {rate}", out.with_suffix(".png"), empty_note="none")
    return report


def write_error_index(folder: Path, reports: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """reports/errors.json (every task's tiles, and the index) and reports/errors.md: the tasks by error
    rate, highest first (a task without a labelled test image last), each with its figure in
    reports/errors/ (a folder of images only: `dvc plots show` draws each)."""
    rows = sorted(
        ({"task": r["task"], "error_rate": r["error_rate"], "errors": r["errors"], "test_images": r["test_images"],
          "figure": f"{folder.name}/{r['task']}.png"} for r in reports),
        key=lambda r: (not np.isfinite(r["error_rate"]), -np.nan_to_num(r["error_rate"])),
    )  # fmt: skip
    report = {"index": rows, "tasks": {r["task"]: r for r in reports}}
    folder.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| task | error rate | wrong / test images | gallery |", "|:--|--:|--:|:--|"]
    lines += [f"| {r['task']} | {r['error_rate']:.3f} | {r['errors']} / {r['test_images']} | [{r['figure']}]({r['figure']}) |" for r in rows]
    folder.with_suffix(".md").write_text("Test errors per task, highest error rate first.\n\n" + "\n".join(lines) + "\n")
    return rows


def calibrated_probabilities(probs: Mapping[str, np.ndarray], temperatures: Mapping[str, float]) -> dict[str, np.ndarray]:
    """The softmax of the logits divided by each task's temperature, from the raw probabilities."""
    return {t: softmax(log_probabilities(p), float(temperatures.get(t, 1.0))) for t, p in probs.items()}


def calibration_report(
    raw_probs: Mapping[str, np.ndarray], targets: np.ndarray, tasks: Sequence[str], temperatures: Mapping[str, float],
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per task, on the labelled test images: the reliability table and ECE of the raw probabilities and
    of the calibrated ones (softmax of the logits divided by the task's temperature)."""
    out = {}
    for k, task in enumerate(tasks):
        labelled = targets[:, k] != MISSING_LABEL
        y = targets[labelled, k]
        raw = raw_probs[task][labelled]
        calibrated = softmax(log_probabilities(raw), float(temperatures.get(task, 1.0)))
        out[task] = {
            "temperature": float(temperatures.get(task, 1.0)), "binning": "15 equal-width confidence bins",
            "raw": reliability(raw, y).as_dict(), "calibrated": reliability(calibrated, y).as_dict(),
        }  # fmt: skip
    return out


def save_calibration_figure(report: Mapping[str, Mapping[str, Any]], out: Path) -> None:
    reliability_figure(report, "reliability on the test split: raw and temperature-scaled").savefig(out, dpi=100)


ISSUE_COLUMNS = ["row", "path", "split", "given", "suggested", "probability", "given_probability"]


def label_issue_report(
    task: str, splits: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]], classes: Sequence[str],
    tiles: int, out: Path, where: str = "validation and test splits",
) -> dict[str, Any]:  # fmt: skip
    """reports/label_issues/<task>.csv and .png: the images of the given splits whose label the model
    contradicts with confidence (evaluation/label_issues.py), the search run per split on its labelled
    images; each split as (name, probabilities, labels, images, its manifest rows)."""
    rows: list[dict[str, Any]] = []
    thumbs: list[np.ndarray] = []
    captions: list[str] = []
    notes = {}
    for name, probs, labels, images, manifest in splits:
        labelled = np.flatnonzero(labels != MISSING_LABEL)
        try:
            issues = find_label_issues(probs[labelled], labels[labelled])
        except ValueError as err:
            notes[name] = str(err)
            log.info("label problems of %s in %s: %s", task, name, err)
            continue
        for issue in issues:
            i = labelled[issue.index]
            rows.append({
                "row": manifest.iloc[i]["row"], "path": manifest.iloc[i]["path"], "split": name, "given": classes[issue.given],
                "suggested": classes[issue.suggested], "probability": round(issue.probability, 4),
                "given_probability": round(issue.given_probability, 4),
            })  # fmt: skip
            thumbs.append(images[i])
            captions.append(f"given {classes[issue.given]}\nlikely {classes[issue.suggested]} {issue.probability:.2f}")
    frame = pd.DataFrame(rows, columns=ISSUE_COLUMNS).sort_values("probability", ascending=False, kind="stable")
    frame.to_csv(out.with_suffix(".csv"), index=False)
    order = list(frame.index[:tiles])
    shown = np.stack([thumbs[i] for i in order]) if order else np.zeros((0, 1, 1, 3), np.uint8)
    empty = "; ".join(f"{s}: {n}" for s, n in notes.items()) or "no label the model contradicts with confidence"
    save_tile_grid(
        [(f"suspected label problems ({len(frame)}), most confident first", shown, [captions[i] for i in order])],
        f"{task}: labels the model contradicts ({where})", out.with_suffix(".png"), empty_note=empty,
    )  # fmt: skip
    return {"task": task, "suspects": int(len(frame)), "not_searched": notes}


def save_gradcam(images: np.ndarray, cams: Mapping[str, np.ndarray], captions: Mapping[str, Sequence[str]], out: Path) -> None:
    cam_grid_figure(images, cams, captions, "Grad-CAM of each task head (red: what its answer rests on)").savefig(out, dpi=100)
