"""Stages `train` and `evaluate` on a tiny built-in dataset: files and MLflow records read back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from mtl_core.config import load_config
from mtl_core.models.io import load_model
from mtl_core.paths import ProjectPaths
from mtl_core.tracking.runs import read_run_info, run_name
from mtl_core.tracking.store import tracking_uri
from mtl_core.tracking.views import RESULTS_VIEW, TABLE_FILE, VIEW_TAG_PREFIX
from mtl_core.runtime import seed_everything
from mtl_core.training.loaders import make_loaders
from mtl_core.training.validation import validate

TASKS = ["shape", "color", "size", "position"]


@pytest.fixture(scope="module")
def project(trained_project: Path):
    cfg = load_config(trained_project / "params.yaml")
    mlflow.set_tracking_uri(tracking_uri(cfg, trained_project))
    paths = ProjectPaths(trained_project)
    run = MlflowClient().get_run(read_run_info(paths)["run_id"])
    return trained_project, cfg, paths, run


def test_train_writes_checkpoint_weights_spec_and_class_names(project):
    root, cfg, paths, _ = project
    spec = json.loads(paths.model_spec.read_text())
    assert list(spec["tasks"]) == TASKS
    assert spec["tasks"]["color"] == ["blue", "cyan", "green", "magenta", "red", "yellow"]
    ckpt = torch.load(paths.checkpoint, weights_only=True)  # loads without unpickling arbitrary objects
    assert ckpt["epoch"] == cfg.train.epochs
    assert set(ckpt["model"]) >= {"heads.shape.weight", "heads.position.bias"}


def test_best_weights_reproduce_the_recorded_validation_accuracy(project):
    root, cfg, paths, _ = project
    summary = json.loads(paths.train_metrics.read_text())
    model, _ = load_model(paths.model_spec, paths.weights)
    loaders = make_loaders(cfg, paths, seed_everything(0), torch.device("cpu"))
    val = validate(model, loaders["val"], torch.device("cpu"), amp=False)
    assert np.mean([val[t]["accuracy"] for t in TASKS]) == pytest.approx(summary["best_val_mean_accuracy"], abs=1e-9)
    assert summary["images_per_second"] > 0


def test_mlflow_run_has_per_epoch_per_task_metrics_params_tags_and_dataset(project):
    root, cfg, paths, run = project
    client = MlflowClient()
    history = pd.read_csv(paths.train_history)
    assert list(history["epoch"]) == list(range(1, cfg.train.epochs + 1))
    for t in TASKS:
        for split in ("train", "val"):
            for m in ("loss", "accuracy"):
                key = f"{split}/{t}/{m}"
                logged = client.get_metric_history(run.info.run_id, f"by_epoch/{key}")  # the learning curves first in the UI
                assert [p.step for p in logged] == list(history["epoch"])
                assert [p.value for p in logged] == pytest.approx(list(history[key]))
    assert run.data.params["train.epochs"] == str(cfg.train.epochs)
    assert run.data.params["model.backbone"] == "small_cnn"
    assert run.data.tags["data.manifest_sha256"] == hashlib.sha256(paths.manifest.read_bytes()).hexdigest()
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "builtin:shapes"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"data", "plots", "params.yaml", "model_spec"} <= artifacts


def test_evaluate_metrics_match_the_written_predictions(project):
    root, cfg, paths, run = project
    metrics = json.loads(paths.test_metrics.read_text())
    n_test = len(np.load(paths.labels_cache("test")))
    for t in TASKS:
        pred = pd.read_csv(paths.predictions_dir / f"{t}.csv")
        assert len(pred) == n_test == metrics["tasks"][t]["support"]
        assert metrics["tasks"][t]["accuracy"] == pytest.approx((pred["actual"] == pred["predicted"]).mean(), abs=1e-6)
        # macro recall by hand: mean over classes present of the per-class hit rate
        recalls = [(g["predicted"] == c).mean() for c, g in pred.groupby("actual")]
        assert metrics["tasks"][t]["recall_macro"] == pytest.approx(np.mean(recalls), abs=1e-6)
        assert metrics["tasks"][t]["balanced_accuracy"] == pytest.approx(np.mean(recalls), abs=1e-6)  # its definition
        assert "auroc" not in metrics["tasks"][t]  # the built-in tasks have 3 to 6 classes
        assert (paths.confusion_dir / f"{t}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["mean"]["accuracy"] == pytest.approx(np.mean([metrics["tasks"][t]["accuracy"] for t in TASKS]))


def test_evaluate_logs_into_the_training_run(project):
    root, cfg, paths, run = project
    metrics = json.loads(paths.test_metrics.read_text())
    logged = MlflowClient().get_run(run.info.run_id).data.metrics
    for t in TASKS:
        for m in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
            assert logged[f"test/{t}/{m}"] == pytest.approx(metrics["tasks"][t][m])
    assert logged["test/mean/accuracy"] == pytest.approx(metrics["mean"]["accuracy"])
    confusion = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots/confusion")}
    assert confusion == {f"plots/confusion/{t}.png" for t in TASKS}
    assert paths.confusion_grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # all tasks in one figure
    assert "plots/confusion_grid.png" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}


def test_run_is_named_described_and_tabled_for_the_mlflow_ui(project):
    """What the MLflow UI shows of the run: a name that says what it is, a description with every task's
    test accuracy, the per-task table (sortable in the UI, with balanced accuracy) and a column per task
    in the *Results* view."""
    root, cfg, paths, run = project
    client = MlflowClient()
    run = client.get_run(run.info.run_id)
    assert run.info.run_name == run_name(cfg) == f"mtl-{cfg.train.weighting}-small_cnn"
    metrics = json.loads(paths.test_metrics.read_text())
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith(f"**{run.info.run_name}**: multi-task model")
    for t in TASKS:
        assert f"| {t} | {metrics['tasks'][t]['accuracy']:.3f}" in description

    table = client.load_table(run.info.experiment_id, TABLE_FILE, run_ids=[run.info.run_id])
    assert list(table["task"]) == TASKS  # one row per task, evaluate having run once
    for row in table.itertuples():
        assert row.accuracy == pytest.approx(metrics["tasks"][row.task]["accuracy"], abs=1e-4)
        assert row.balanced_accuracy == pytest.approx(metrics["tasks"][row.task]["balanced_accuracy"], abs=1e-4)
        assert row.support == metrics["tasks"][row.task]["support"]
        assert 0 < row.majority_rate <= 1
    assert {"path": TABLE_FILE, "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])

    tags = client.get_experiment(run.info.experiment_id).tags
    view = json.loads(json.loads(tags[VIEW_TAG_PREFIX + RESULTS_VIEW])["state"])
    # a balanced-accuracy column per task (the default decision metric: majority-class answers score chance)
    assert [f"metrics.`test/{t}/balanced_accuracy`" for t in TASKS] == [c for c in view["selectedColumns"] if c.startswith("metrics.`test/") and "/mean/" not in c]
