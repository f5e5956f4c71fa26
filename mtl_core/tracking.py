"""MLflow plumbing shared by the stages: where the store is, and which run a model belongs to.

One trained model has one MLflow run. `train` opens it and writes its id next to the model
(`models/mlflow_run.json`); `evaluate` and `register` reopen that run, so when DVC skips a cached stage,
the later stages still log into the run of the model they actually handle.

A DVC experiment queued with `dvc exp run --queue` runs its stages in a temporary copy of the project
(`.dvc/tmp/exps/...`); its runs go into the store of the project it came from (`$DVC_ROOT`), not into a
store inside that copy, which DVC deletes afterwards.

Several processes may share one SQLite store (two pipelines started at once, a DVC queue with several
workers, clones pointing `mlflow.tracking_uri` at one file). MLflow creates and migrates a fresh SQLite
store in whichever process touches it first, without a lock between processes, and two processes doing it
at once break the store (`table _alembic_tmp_experiments already exists`). `setup_mlflow` therefore opens a
SQLite store, and looks up or creates the experiment, under a file lock next to the database
(`mlflow.db.lock`). After that, concurrent writes are left to SQLite: MLflow sets `PRAGMA busy_timeout =
20000` on each of its sessions, so a writer waits up to 20 s for another one instead of failing with
"database is locked". Several machines (or clones that should not write artifacts into one another's
folders) need an MLflow server instead, see README "Several pipelines, one store".
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

import filelock
import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mtl_core.config import PipelineConfig
from mtl_core.paths import ProjectPaths

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# How long a process waits for another one to create / migrate a SQLite store (a fresh store takes a few
# seconds, a migration of a large one can take minutes).
STORE_LOCK_TIMEOUT_S = 600.0


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


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a `sqlite:` tracking URI (absolute); None for other stores and in-memory SQLite."""
    if not uri.startswith("sqlite:///"):  # `sqlite://` is an in-memory database
        return None
    database = uri.removeprefix("sqlite:///").split("?", 1)[0]  # `sqlite:////abs/db`, `sqlite:///rel/db`
    if not database or database == ":memory:":
        return None
    return Path(database).absolute()


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold `<db>.lock`, the inter-process lock of a SQLite store, for the body; a no-op for other stores."""
    db = sqlite_db_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(f"{db}.lock", timeout=STORE_LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RuntimeError(
            f"{lock.lock_file}: another process has been initialising the MLflow store {db} for more than "
            f"{STORE_LOCK_TIMEOUT_S:.0f} s. If no such process is running, the lock is stale (a network file "
            "system?); for pipelines on several machines use an MLflow server (README: Several pipelines, "
            "one store) instead of one SQLite file."
        ) from None
    try:
        yield
    finally:
        lock.release()


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: for a SQLite store, `mlartifacts/` next to the database
    (the project's own store: inside the project; a store shared by several clones: beside the shared file,
    not in whichever clone created the experiment); for a server, None, i.e. the server's artifact root
    (with `mlflow server --artifacts-destination`, its artifact proxy)."""
    db = sqlite_db_path(uri)
    return (db.parent / DEFAULT_ARTIFACTS).as_uri() if db is not None else None


def _initialise_store(uri: str) -> None:
    """Make MLflow create / migrate the tables of the store now (it does so lazily, on the first use of its
    tracking store and, separately, of its registry store, both in the same SQLite file)."""
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments(max_results=1)
    if mlflow.get_registry_uri() == uri:
        client.search_registered_models(max_results=1)


def _experiment_id(name: str, location: str | None) -> str:
    """The id of experiment `name`, created when missing. Another process may create it between our look-up
    and our create (a server store, where no lock of ours applies): then read it again."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := mlflow.get_experiment_by_name(name)) is None:
            raise
        return exp.experiment_id


def setup_mlflow(cfg: PipelineConfig, root: Path) -> str:
    """Point MLflow at the store and experiment; return the experiment id.

    A SQLite store is created or migrated, and the experiment looked up or created, under the store's file
    lock, so several processes can start on one fresh store at the same moment.
    """
    uri = tracking_uri(cfg, root)
    user_setting = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow 3 also exports the URI as $MLFLOW_TRACKING_URI; restore the user's own setting, or the next
    # project handled in this process (a flow, a test session) would silently log into this store.
    if user_setting is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_setting
    with store_lock(uri):
        if sqlite_db_path(uri) is not None:
            _initialise_store(uri)
        exp_id = _experiment_id(cfg.mlflow.experiment, artifact_location(uri))
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


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in 1 MiB blocks (model weights, data caches)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
