"""MLflow plumbing shared by the stages: where the store is, and which run a model belongs to.

One trained model has one MLflow run. `train` opens it and writes its id next to the model
(`models/mlflow_run.json`); `evaluate` and `register` reopen that run, so when DVC skips a cached stage,
the later stages still log into the run of the model they actually handle.

A DVC experiment queued with `dvc exp run --queue` runs its stages in a temporary copy of the project
(`.dvc/tmp/exps/...`); its runs go into the store of the project it came from (`$DVC_ROOT`), not into a
store inside that copy, which DVC deletes afterwards.
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


def store_root(root: Path) -> Path:
    """Where the project's local MLflow store lives: `root`, or, when `root` is the temporary copy a queued
    DVC experiment runs in (inside `$DVC_ROOT/.dvc/tmp`), the project DVC copied it from."""
    root = root.resolve()
    dvc_root = os.environ.get("DVC_ROOT")
    if dvc_root and root.is_relative_to(Path(dvc_root).resolve() / ".dvc" / "tmp"):
        return Path(dvc_root).resolve()
    return root


def tracking_uri(cfg: PipelineConfig, root: Path) -> str:
    """$MLFLOW_TRACKING_URI, else params' mlflow.tracking_uri, else the project's SQLite file."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or cfg.mlflow.tracking_uri
        or f"sqlite:///{(store_root(root) / DEFAULT_DB).as_posix()}"
    )


def experiment_tags(cfg: PipelineConfig) -> dict[str, str]:
    """The method of a run as tags (`mtl.weighting`, `mtl.arch`, `mtl.backbone`), and the DVC experiment
    it belongs to when there is one: `dvc.exp_name` and `dvc.exp_baseline_rev` (the commit the experiment
    started from), from the `$DVC_EXP_NAME` and `$DVC_EXP_BASELINE_REV` that `dvc exp run` sets."""
    tags = {"mtl.weighting": cfg.train.weighting, "mtl.arch": cfg.model.arch, "mtl.backbone": cfg.model.backbone}
    for tag, var in (("dvc.exp_name", "DVC_EXP_NAME"), ("dvc.exp_baseline_rev", "DVC_EXP_BASELINE_REV")):
        if value := os.environ.get(var):
            tags[tag] = value
    return tags


def run_name(cfg: PipelineConfig) -> str:
    """The multi-task run's name in the MLflow UI: its method, e.g. `famo · hard_sharing · resnet18`."""
    return f"{cfg.train.weighting} · {cfg.model.arch} · {cfg.model.backbone}"


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
    location = (store_root(root) / DEFAULT_ARTIFACTS).as_uri() if uri.startswith("sqlite:") else None
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
