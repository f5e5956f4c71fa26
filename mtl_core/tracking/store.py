"""The MLflow tracking store: where it is, and opening it safely from several processes at once.

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
folders) need an MLflow server instead (docs: MLflow, "Several pipelines, one store").

MLflow is imported where it is used, not with this module: `mtl predict` resolves the project's store here
and reads a local champion without MLflow's two seconds of imports (registry/model_source.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from mtl_core.tracking.views import ui_experiment_tags

if TYPE_CHECKING:
    from mtl_core.config import PipelineConfig

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


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a `sqlite:` tracking URI (absolute); None for other stores and in-memory SQLite."""
    if not uri.startswith("sqlite:///"):  # `sqlite://` is an in-memory database
        return None
    # `sqlite:////abs/db`, `sqlite:///rel/db`; URL-quoted as SQLAlchemy reads it (`%20` is a space)
    database = unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
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
    import filelock

    db.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(f"{db}.lock", timeout=STORE_LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RuntimeError(
            f"{lock.lock_file}: another process has been initialising the MLflow store {db} for more than "
            f"{STORE_LOCK_TIMEOUT_S:.0f} s. If no such process is running, the lock is stale (a network file "
            "system?); for pipelines on several machines use an MLflow server (docs: MLflow, "
            "Several pipelines, one store) instead of one SQLite file."
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


def initialise_store(uri: str) -> None:
    """Make MLflow create / migrate the tables of the store now (it does so lazily, on the first use of its
    tracking store and, separately, of its registry store, both in the same SQLite file)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    client.search_experiments(max_results=1)
    if mlflow.get_registry_uri() == uri:
        client.search_registered_models(max_results=1)


def _experiment_id(name: str, location: str | None) -> str:
    """The id of experiment `name`, created when missing. Another process may create it between our look-up
    and our create (a server store, where no lock of ours applies): then read it again."""
    import mlflow
    from mlflow.exceptions import MlflowException

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        _complete_experiment_tags(exp.experiment_id, exp.tags)
        return exp.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags=ui_experiment_tags())
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := mlflow.get_experiment_by_name(name)) is None:
            raise
        return exp.experiment_id


def _complete_experiment_tags(experiment_id: str, tags: dict[str, str]) -> None:
    """Give an experiment created before these settings the missing ones; what is set is left alone (a
    user may have chosen another kind, written another description or changed the view in the UI)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in ui_experiment_tags().items():
        if key not in tags:
            client.set_experiment_tag(experiment_id, key, value)


def setup_mlflow(cfg: PipelineConfig, root: Path) -> str:
    """Point MLflow at the store and experiment; return the experiment id.

    A SQLite store is created or migrated, and the experiment looked up or created, under the store's file
    lock, so several processes can start on one fresh store at the same moment.
    """
    import mlflow

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
            initialise_store(uri)
        exp_id = _experiment_id(cfg.mlflow.experiment, artifact_location(uri))
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
