"""MLflow plumbing shared by the stages: where the store is, and which run a model belongs to.

One trained model has one MLflow run. `train` opens it and writes its id next to the model
(`models/mlflow_run.json`); `evaluate` and `register` reopen that run, so when DVC skips a cached stage,
the later stages still log into the run of the model they actually handle.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml

from mtl_core.config import PipelineConfig
from mtl_core.paths import ProjectPaths

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri(cfg: PipelineConfig, root: Path) -> str:
    """$MLFLOW_TRACKING_URI, else params' mlflow.tracking_uri, else the project's SQLite file."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or cfg.mlflow.tracking_uri
        or f"sqlite:///{(root / DEFAULT_DB).resolve().as_posix()}"
    )


def setup_mlflow(cfg: PipelineConfig, root: Path) -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    uri = tracking_uri(cfg, root)
    user_setting = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow 3 also exports the URI as $MLFLOW_TRACKING_URI; restore the user's own setting, or the next
    # project handled in this process (a flow, a test session) would silently log into this store.
    if user_setting is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_setting
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        return exp.experiment_id
    # A local store keeps artifacts inside the project too, not in whatever folder we happen to run from.
    location = (root / DEFAULT_ARTIFACTS).resolve().as_uri() if uri.startswith("sqlite:") else None
    exp_id = mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def ingested_data_hash(root: Path) -> dict[str, str]:
    """The DVC hash of the ingested manifest as recorded in dvc.lock, plus its content hash.

    The DVC hash ties the run to `dvc.lock`; the manifest hash also works when a stage runs outside DVC.
    """
    paths = ProjectPaths(root)
    tags: dict[str, str] = {}
    if paths.manifest.is_file():
        tags["data.manifest_sha256"] = hashlib.sha256(paths.manifest.read_bytes()).hexdigest()
    lock = root / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("ingest", {}).get("outs", []):
            if out.get("path") == "data/ingested/manifest.csv" and "md5" in out:
                tags["dvc.data_md5"] = out["md5"]
    return tags


def write_run_info(paths: ProjectPaths, run_id: str, experiment_id: str) -> None:
    paths.run_info.write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id}, indent=2) + "\n")


def read_run_info(paths: ProjectPaths) -> dict[str, str]:
    if not paths.run_info.is_file():
        raise FileNotFoundError(f"{paths.run_info}: no MLflow run recorded for this model; run the train stage first")
    return json.loads(paths.run_info.read_text())


@contextmanager
def model_run(cfg: PipelineConfig, root: Path) -> Iterator[mlflow.ActiveRun]:
    """Reopen the MLflow run of the model in `models/`."""
    setup_mlflow(cfg, root)
    info = read_run_info(ProjectPaths(root))
    with mlflow.start_run(run_id=info["run_id"]) as run:
        yield run
