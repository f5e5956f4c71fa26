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


class StoreError(RuntimeError):
    """The MLflow tracking store does not answer or cannot be written; the message names the store, what is
    wrong and what to do (one line: the CLI prints it as `mtl <stage>: error: ...`)."""


class StoreUnavailable(StoreError):
    """The store failed while a training was running: the training is kept in its checkpoint."""


CHECK_TRIES = 3
"""Tries of the store check before a stage starts (a bounded number, not MLflow's default back-off)."""
CHECK_PAUSE_S = 1.0
"""Seconds between two tries."""
SQLITE_LOCK_WAIT_S = 2.0
"""How long one try waits for another process's write lock on a SQLite store."""
SERVER_TIMEOUT_S = 3.0
"""How long one try waits for a tracking server's answer."""
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",  # MLflow's default: 7, with back-off up to 64 s (251 s in all)
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
"""What MLflow's HTTP client retries against a tracking server, unless the user set these variables: a
server gone in the middle of a stage fails it within seconds, not minutes (`training.sink` keeps the
metrics it could not log)."""


def _processes_holding(db: Path) -> list[str]:
    """`pid N (command)` of the other processes of this machine with `db` (or its journal) open, as far
    as /proc shows them (Linux; a process of another user is not visible); empty elsewhere."""
    names = {str(db), f"{db}-journal", f"{db}-wal"}
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if not any(os.readlink(fd) in names for fd in (entry / "fd").iterdir()):
                continue
            command = " ".join((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split())
        except OSError:
            continue
        found.append(f"pid {entry.name} ({command[:120]})")
    return found


def _sqlite_problem(db: Path) -> tuple[str, str] | None:
    """(what is wrong, what to do) with SQLite store `db` now, or None when it can be written: a real
    write transaction (a table created, then rolled back) with a short lock wait."""
    import sqlite3

    if not db.exists():
        folder = db.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".{db.name}.probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            return (f"the folder {folder} cannot be written ({err.strerror or err})",
                    "make it writable, or set mlflow.tracking_uri to a store you can write")  # fmt: skip
        return None
    try:
        connection = sqlite3.connect(str(db), timeout=SQLITE_LOCK_WAIT_S, isolation_level=None)
    except sqlite3.Error as err:
        return f"it cannot be opened ({err})", "check the file and its folder"
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("CREATE TABLE _mtl_write_probe (x)")
        connection.execute("ROLLBACK")
    except sqlite3.OperationalError as err:
        text = str(err)
        if "locked" in text or "busy" in text:
            holders = _processes_holding(db)
            who = f"by {', '.join(holders)}" if holders else "by another process"
            return (f"it is locked {who}: a write waited more than {SQLITE_LOCK_WAIT_S:.0f} s",
                    "wait for that process to finish (or stop it), then rerun; several pipelines writing at once "
                    "need an MLflow server (docs: MLflow, Several pipelines, one store)")  # fmt: skip
        if "readonly" in text or "read-only" in text:
            return (f"it is read-only ({text})",
                    "make the file and its folder writable (chmod u+w, chattr -i), or set mlflow.tracking_uri "
                    "to a store you can write")  # fmt: skip
        return f"a test write failed ({text})", "check the file, its folder and the disk"
    finally:
        connection.close()
    return None


def _server_problem(uri: str) -> tuple[str, str] | None:
    """(what is wrong, what to do) with a tracking server now, or None when its /health answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_TIMEOUT_S) as answer:
            if answer.status == 200:
                return None
            what = f"its /health answered HTTP {answer.status}"
    except urllib.error.HTTPError as err:
        what = f"its /health answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        what = f"unreachable ({reason})"
    return what, (
        "start it (mlflow server --host <host> --port <port>), or point $MLFLOW_TRACKING_URI / "
        "params.yaml mlflow.tracking_uri at a running one"
    )


def store_problem(uri: str) -> tuple[str, str] | None:
    """One try: (what is wrong, what to do) with the store at `uri`, or None. Stores other than a
    SQLite file and an http(s) server are not checked."""
    db = sqlite_db_path(uri)
    if db is not None:
        return _sqlite_problem(db)
    if uri.startswith(("http://", "https://")):
        return _server_problem(uri)
    return None


def check_store(uri: str, tries: int = CHECK_TRIES) -> None:
    """Raise StoreError, in one line naming the store, what is wrong and what to do, unless the store at
    `uri` answers and can be written within `tries` short tries (a few seconds in all)."""
    import time

    start = time.monotonic()
    for attempt in range(tries):
        problem = store_problem(uri)
        if problem is None:
            return
        if attempt + 1 < tries:
            time.sleep(CHECK_PAUSE_S)
    what, todo = problem
    raise StoreError(
        f"the MLflow tracking store {uri} cannot be used: {what} ({tries} tries in "
        f"{time.monotonic() - start:.0f} s); {todo}"
    )


def is_store_failure(err: BaseException) -> bool:
    """Whether `err`, raised by an MLflow call, is the store failing (unreachable, locked, read-only, a
    server error) rather than a bad value."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
    if isinstance(err, OSError):
        return True
    try:
        import sqlalchemy.exc

        if isinstance(err, sqlalchemy.exc.OperationalError):
            return True
    except ImportError:
        pass
    try:
        import requests

        return isinstance(err, requests.RequestException)
    except ImportError:
        return False


def describe_store_failure(err: BaseException) -> str:
    """A store error in a few words: its first line, without the SQL statement SQLAlchemy appends."""
    text = " ".join(str(err).split("[SQL:")[0].split())
    return (text[:200] + "...") if len(text) > 200 else text


def bound_http_retries(uri: str) -> None:
    """For a tracking server, HTTP_RETRY_DEFAULTS where the user has not set them."""
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: for a SQLite store, `mlartifacts/` next to the database
    (the project's own store: inside the project; a store shared by several clones: beside the shared file,
    not in whichever clone created the experiment); for a server, None, i.e. the server's artifact root
    (with `mlflow server --artifacts-destination`, its artifact proxy)."""
    db = sqlite_db_path(uri)
    return (db.parent / DEFAULT_ARTIFACTS).as_uri() if db is not None else None


CREATING = ".creating-"
"""A new SQLite store is built as `.<name>.creating-<pid>` beside the store's file, then renamed into place."""


def initialise_store(uri: str) -> None:
    """Make MLflow create / migrate the tables of the store now (it does so lazily, on the first use of its
    tracking store and, separately, of its registry store, both in the same SQLite file).

    A new SQLite store is created whole or not at all: MLflow builds its tables with some forty migrations,
    and a process killed in the middle left a file at an intermediate schema that every later start
    refused ("out-of-date database schema"). So the tables are built in a temporary file that is renamed
    to the store's name once complete (the caller holds the store's file lock, see `setup_mlflow`)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    db = sqlite_db_path(uri)
    if db is not None:
        for stale in db.parent.glob(f".{db.name}{CREATING}*"):  # left by a creation that was killed
            stale.unlink(missing_ok=True)
        if not db.exists() or db.stat().st_size == 0:
            _create_sqlite_store(db)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
        if mlflow.get_registry_uri() == uri:
            client.search_registered_models(max_results=1)
    except MlflowException as err:
        if "out-of-date database schema" not in str(err):
            raise
        raise StoreError(
            f"the MLflow tracking store {uri} has tables of an older MLflow schema (a store made by an older "
            f"MLflow, or one whose creation was interrupted before this version made it atomic): back the file "
            f"up, then run `mlflow db upgrade {uri}`, or move it away to start a new store"
        ) from None


def _create_sqlite_store(db: Path) -> None:
    """Build MLflow's tables (tracking and registry) in a temporary file beside `db`, then rename it to `db`."""
    from mlflow.tracking import MlflowClient

    scratch = db.with_name(f".{db.name}{CREATING}{os.getpid()}")
    scratch.unlink(missing_ok=True)
    scratch_uri = f"sqlite:///{scratch}"
    client = MlflowClient(tracking_uri=scratch_uri, registry_uri=scratch_uri)
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)
    os.replace(scratch, db)  # connections MLflow keeps to the scratch name follow the file; none is used again



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
    check_store(uri)
    bound_http_retries(uri)
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
