"""Stage `register`: pyfunc model without pickles, registry versions, and the champion alias."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mtl_core.config import load_config
from mtl_core.paths import ProjectPaths
from mtl_core.registry.register import CHAMPION, run_register
from mtl_core.tracking import tracking_uri


@pytest.fixture(scope="module")
def project(trained_project: Path, tmp_path_factory: pytest.TempPathFactory):
    # a copy, so that registering versions here leaves the shared project's registry alone
    root = tmp_path_factory.mktemp("register") / "project"
    shutil.copytree(trained_project, root)
    cfg = load_config(root / "params.yaml")
    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    return root, cfg, ProjectPaths(root)


def _set_mean_accuracy(paths: ProjectPaths, value: float) -> None:
    metrics = json.loads(paths.test_metrics.read_text())
    metrics["mean"]["accuracy"] = value
    paths.test_metrics.write_text(json.dumps(metrics))


def test_register_then_champion_moves_only_on_improvement(project, monkeypatch: pytest.MonkeyPatch):
    root, cfg, paths = project
    name = cfg.mlflow.model_name
    client = MlflowClient()

    first = run_register(cfg, root)
    assert (first.version, first.champion_moved, first.previous_champion_version) == ("1", True, None)
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert json.loads(paths.registry_report.read_text())["champion_version"] == "1"

    # the registered model loads without unpickling anything and predicts every task
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    images = np.load(paths.images_cache("test"))[:5]
    out = model.predict(images)
    spec = json.loads(paths.model_spec.read_text())
    for task, classes in spec["tasks"].items():
        # same predictions as the evaluate stage wrote for these test images
        expected = pd.read_csv(paths.predictions_dir / f"{task}.csv")["predicted"][:5]
        assert list(out[task]) == list(expected)
        probs = out[[f"{task}_prob_{c}" for c in classes]].to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(out[f"{task}_probability"], probs.max(1), atol=1e-7)
    # any image size is accepted and resized like in preprocessing
    big = np.repeat(np.repeat(images[:1], 2, axis=1), 2, axis=2)
    assert len(model.predict(big)) == 1

    _set_mean_accuracy(paths, first.mean_test_accuracy - 0.1)
    worse = run_register(cfg, root)
    assert (worse.version, worse.champion_moved, worse.champion_version) == ("2", False, "1")
    assert "does not beat champion version 1" in worse.reason
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    report = json.loads(paths.registry_report.read_text())
    assert report["champion_moved"] is False and report["version"] == "2"

    _set_mean_accuracy(paths, first.mean_test_accuracy + 0.1)
    better = run_register(cfg, root)
    assert (better.version, better.champion_moved, better.previous_champion_version) == ("3", True, "1")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "3"
    assert float(client.get_model_version(name, "3").tags["mean_test_accuracy"]) == first.mean_test_accuracy + 0.1


def test_a_tie_does_not_move_the_champion(trained_project: Path, tmp_path: Path):
    """The same score registered again (the same model retrained, or a rerun) leaves the alias on the
    first version. The score is chosen so that rounding it to 6 digits would make it look lower."""
    root = tmp_path / "project"
    shutil.copytree(trained_project, root)
    cfg = load_config(root / "params.yaml")
    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    paths = ProjectPaths(root)
    _set_mean_accuracy(paths, 0.1234564)
    first = run_register(cfg, root)
    again = run_register(cfg, root)
    assert (first.champion_moved, again.champion_moved, again.champion_version) == (True, False, first.version)
    assert again.previous_champion_accuracy == 0.1234564
    assert "does not beat" in again.reason
    assert str(MlflowClient().get_model_version_by_alias(cfg.mlflow.model_name, CHAMPION).version) == first.version
