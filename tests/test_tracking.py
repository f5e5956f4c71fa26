from pathlib import Path

import mlflow
import pytest

from mtl_core.config import config_from_dict
from mtl_core.tracking import setup_mlflow, tracking_uri


def test_default_store_is_the_projects_sqlite_file_and_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = config_from_dict({})
    assert tracking_uri(cfg, tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve().as_posix()}"
    assert tracking_uri(config_from_dict({"mlflow": {"tracking_uri": "http://127.0.0.1:5999"}}), tmp_path) == "http://127.0.0.1:5999"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert tracking_uri(cfg, tmp_path) == "sqlite:////elsewhere/mlflow.db"


def test_two_projects_in_one_process_keep_their_own_stores(tmp_path: Path):
    """MLflow exports set_tracking_uri to the environment; the next project must not inherit it."""
    cfg = config_from_dict({})
    setup_mlflow(cfg, tmp_path / "a")
    assert mlflow.get_tracking_uri().endswith("a/mlflow.db")
    assert tracking_uri(cfg, tmp_path / "b").endswith("b/mlflow.db")
    exp_b = setup_mlflow(cfg, tmp_path / "b")
    assert mlflow.get_tracking_uri().endswith("b/mlflow.db")
    assert (tmp_path / "b" / "mlflow.db").is_file() and mlflow.get_experiment(exp_b).name == "mtl-pipeline"
