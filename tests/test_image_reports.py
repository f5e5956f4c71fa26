"""What each task gets wrong, with the images: calibration (ECE, temperature scaling, calibrated serving),
suspected label problems (confident learning, `mtl audit-labels`), the error gallery and Grad-CAM, each
checked against hand-computed cases and read back from the files the figures are drawn from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from mtl_core.calibration import expected_calibration_error, fit_temperature, nll, reliability, softmax
from mtl_core.config import load_config
from mtl_core.evaluation.gradcam import grad_cam
from mtl_core.evaluation.label_issues import class_thresholds, find_label_issues
from mtl_core.models import MultiTaskModel
from mtl_core.paths import ProjectPaths
from mtl_core.registry.predictor import MultiTaskPredictor
from mtl_core.tasks import MISSING_LABEL
from mtl_core.tracking.runs import read_run_info
from mtl_core.tracking.store import tracking_uri

TASKS = ["shape", "color", "size", "position"]


# --------------------------------------------------------------------------------- calibration


def test_ece_of_a_hand_computed_case() -> None:
    """Four images, 15 equal-width bins: confidences 0.9, 0.9 (one right) fall in bin (0.8667, 0.9333]:
    |0.5 - 0.9| = 0.4 on 2 of 4 images; 0.6 (right) and 0.55 (wrong) in (0.5333, 0.6] and (0.5333, 0.6]:
    |0.5 - 0.575| = 0.075 on 2 of 4. ECE = 0.5 * 0.4 + 0.5 * 0.075 = 0.2375."""
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.55, 0.45]])
    targets = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probs, targets) == pytest.approx(0.2375)
    table = reliability(probs, targets)
    assert table.count.sum() == 4 and table.count[13] == 2 and table.count[8] == 2


def test_temperature_scaling_recovers_a_known_miscalibration() -> None:
    """Labels drawn from softmax(z); the model reports 3z (over-confident): the fitted temperature is 3
    (to sampling noise), the NLL falls to that of the true z, and no argmax changes."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, size=(20000, 4))
    y = np.array([rng.choice(4, p=p) for p in softmax(z)])
    t = fit_temperature(3 * z, y)
    assert t == pytest.approx(3.0, rel=0.05)
    assert nll(3 * z, y, t) == pytest.approx(nll(z, y), rel=0.01) and nll(3 * z, y, t) < nll(3 * z, y)
    assert (softmax(3 * z, t).argmax(1) == (3 * z).argmax(1)).all()
    assert expected_calibration_error(softmax(3 * z, t), y) < 0.5 * expected_calibration_error(softmax(3 * z), y)
    assert fit_temperature(np.zeros((0, 4)), np.zeros(0, int)) == 1.0  # nothing labelled: no temperature


# --------------------------------------------------------------------------------- label problems


def test_confident_learning_by_hand() -> None:
    """Thresholds: class 0's mean p_0 over its images (0.9, 0.8, 0.1) = 0.6; class 1's mean p_1 over
    (0.7, 0.8) = 0.75. Image 2, labelled 0, has p_1 = 0.9 >= 0.75: suspect, suggested 1. Image 3, labelled
    1, has p_0 = 0.3 < 0.6 and p_1 = 0.7 < 0.75: no confident class, not counted."""
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7], [0.2, 0.8]])
    given = np.array([0, 0, 0, 1, 1])
    np.testing.assert_allclose(class_thresholds(probs, given), [0.6, 0.75])
    (issue,) = find_label_issues(probs, given)
    assert (issue.index, issue.given, issue.suggested) == (2, 0, 1) and issue.probability == pytest.approx(0.9)
    with pytest.raises(ValueError, match="1 class"):
        find_label_issues(probs[:3], np.zeros(3, int))


# --------------------------------------------------------------------------------- Grad-CAM


class BrightnessModel(MultiTaskModel):
    """One 1x1 conv summing the channels, then the mean: task `bright` answers class 1 for bright images."""

    def __init__(self) -> None:
        super().__init__({"bright": 2})
        self.backbone = nn.Sequential(nn.Conv2d(3, 1, 1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.backbone[0].weight.fill_(1.0)
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.head.bias.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def decode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"bright": self.head(z)}

    def task_parameters(self, task: str):
        return self.head.parameters()


def test_grad_cam_points_at_what_the_answer_rests_on() -> None:
    x = torch.zeros(2, 3, 16, 16)
    x[0, :, :4, :4] = 1.0  # image 0 bright in the top-left corner only
    x[1, :, 12:, 8:] = 1.0  # image 1 in a bottom strip
    cams, predicted = grad_cam(BrightnessModel(), x, "bright")
    assert predicted.tolist() == [1, 1] and cams.shape == (2, 16, 16) and cams.max() == pytest.approx(1.0)
    assert np.unravel_index(cams[0].argmax(), (16, 16))[0] < 4 and cams[0][8:, 8:].max() < 0.2
    assert cams[1][12:, 8:].mean() > 5 * cams[1][:8].mean()
    vit_like = BrightnessModel()
    vit_like.backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 1))  # no convolution
    assert grad_cam(vit_like, x, "bright") is None


# --------------------------------------------------------------------------------- the stages


def test_the_evaluate_stage_writes_what_the_figures_show(trained_project: Path) -> None:
    paths = ProjectPaths(trained_project)
    cfg = load_config(trained_project / "params.yaml")
    spec = json.loads(paths.model_spec.read_text())
    assert set(spec["temperatures"]) == set(TASKS) and spec["calibration"]["fitted_on"] == "val"
    predicted = pd.read_csv(paths.test_predictions)
    targets = np.load(paths.labels_cache("test"))
    errors = json.loads(paths.errors_dir.with_suffix(".json").read_text())
    rates = [row["error_rate"] for row in errors["index"]]
    assert rates == sorted(rates, reverse=True)  # the index: highest error rate first
    for k, task in enumerate(TASKS):
        assert (paths.errors_dir / f"{task}.png").stat().st_size > 5000
        r = errors["tasks"][task]
        classes = spec["tasks"][task]
        labelled = targets[:, k] != MISSING_LABEL
        assert r["errors"] == int((predicted[task].to_numpy()[labelled] != targets[labelled, k]).sum())
        wrong, unsure = r["confident_wrong"], r["unsure_right"]
        assert len(wrong) == min(cfg.evaluate.gallery_tiles, r["errors"]) and len(unsure) <= cfg.evaluate.gallery_tiles
        assert all(w["true"] != w["predicted"] for w in wrong) and all(u["true"] == u["predicted"] for u in unsure)
        assert [w["probability"] for w in wrong] == sorted((w["probability"] for w in wrong), reverse=True)
        for w in wrong:  # a tile's labels are the test image's
            assert w["true"] == classes[targets[w["index"], k]] and w["predicted"] == classes[predicted[task][w["index"]]]
        # label problems: every suspect is a val or test row of the manifest, with its given label
        issues = pd.read_csv(paths.label_issues_dir / f"{task}.csv", dtype=str, keep_default_na=False)
        manifest = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False).set_index("row")
        for row in issues.itertuples():
            assert manifest.loc[row.row, "split"] == row.split and manifest.loc[row.row, task] == row.given
            assert manifest.loc[row.row, "path"] == row.path and row.given != row.suggested
    metrics = json.loads(paths.test_metrics.read_text())["calibration"]
    calibration = json.loads(paths.calibration.read_text())["tasks"]
    for task in TASKS:
        assert metrics[task]["temperature"] == pytest.approx(spec["temperatures"][task])
        assert metrics[task]["ece_calibrated"] == pytest.approx(calibration[task]["calibrated"]["ece"])
    gradcam = json.loads(paths.gradcam.with_suffix(".json").read_text())
    assert gradcam["images"] == list(range(cfg.evaluate.gradcam_images)) and set(gradcam["answers"]) == set(TASKS)
    run = read_run_info(paths)["run_id"]
    client = MlflowClient(tracking_uri(cfg, trained_project))
    logged = {a.path for a in client.list_artifacts(run, "errors")}
    assert {f"errors/{t}.png" for t in TASKS} <= logged and "errors/errors.md" in logged
    assert "Expected calibration error on the test split" in client.get_run(run).data.tags["mlflow.note.content"]


def test_served_probabilities_are_calibrated_and_the_raw_ones_stay_available(trained_project: Path, tmp_path: Path) -> None:
    paths = ProjectPaths(trained_project)
    images = np.load(paths.images_cache("test"))[:5]
    calibrated = MultiTaskPredictor(paths.model_spec, paths.weights).probabilities(images)
    raw = MultiTaskPredictor(paths.model_spec, paths.weights, raw=True).probabilities(images)
    temperatures = json.loads(paths.model_spec.read_text())["temperatures"]
    for task in TASKS:
        np.testing.assert_allclose(calibrated[task], softmax(np.log(raw[task]), temperatures[task]), atol=1e-5)
        assert (calibrated[task].argmax(1) == raw[task].argmax(1)).all()
    # a model folder written before calibration (no temperatures in its spec) predicts as before: raw
    old = tmp_path / "old"
    shutil.copytree(paths.models_dir, old, ignore=shutil.ignore_patterns("groups"))
    spec = json.loads((old / "model_spec.json").read_text())
    del spec["temperatures"], spec["calibration"]
    (old / "model_spec.json").write_text(json.dumps(spec))
    before = MultiTaskPredictor(old / "model_spec.json", old / "model.safetensors").probabilities(images)
    for task in TASKS:
        np.testing.assert_allclose(before[task], raw[task], atol=1e-6)


def test_audit_labels_finds_flipped_training_labels(tiny_data: Path, tmp_path: Path) -> None:
    """Two folds over the tiny data's training split, one short training each: the command writes a
    report per task whose suspects are training rows of the manifest."""
    from tests.conftest import project_from
    from mtl_core.cli import main

    root = project_from(tiny_data, tmp_path, {"train": {"epochs": 1, "max_steps_per_epoch": 3}})
    assert main(["audit-labels", "--folds", "2", "--root", str(root)]) == 0
    summary = json.loads((root / "reports" / "label_audit" / "summary.json").read_text())
    assert summary["folds"] == 2 and set(summary["tasks"]) == set(TASKS)
    manifest = pd.read_csv(root / "data" / "ingested" / "manifest.csv", dtype=str, keep_default_na=False).set_index("row")
    for task in TASKS:
        suspects = pd.read_csv(root / "reports" / "label_audit" / f"{task}.csv", dtype=str, keep_default_na=False)
        assert len(suspects) == summary["tasks"][task]["suspects"]
        assert (manifest.loc[suspects["row"], "split"] == "train").all()
        assert 0.0 <= summary["tasks"][task]["out_of_fold_accuracy"] <= 1.0  # how far to trust the suspects
    assert main(["audit-labels", "--folds", "1", "--root", str(root)]) == 2  # one line, no traceback
