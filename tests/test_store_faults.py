"""The MLflow tracking store checked before a stage works, and a store that goes away during a training.

Real stores only: the project's SQLite file locked by a real second process (a write transaction held
open), the same file made read-only (chattr +i as root, chmod elsewhere), a tracking URI on a closed port
of 127.0.0.1. Each fails the stage with one `mtl <stage>: error:` line naming the store, what is wrong
and what to do, within seconds (MLflow alone waits 20 s per locked write, retries a server for minutes);
the traceback only with --verbose. A store locked in the middle of a training loses nothing: the stage
ends with one line, the checkpoint holds the epochs, and the rerun logs them into the same run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, project_from, stage_env
from mtl_core.cli import main
from mtl_core.pipeline import run_stage
from mtl_core.tracking.store import StoreError

HOLD_LOCK = (
    "import sqlite3, sys, time\n"
    "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "c.execute('BEGIN EXCLUSIVE')\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"  # until the test closes our stdin
)


@contextmanager
def lock_held(db: Path):
    """A second process holding a write transaction on `db` (BEGIN EXCLUSIVE) until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.fixture
def project(tiny_data: Path, tmp_path: Path) -> Path:
    return project_from(tiny_data, tmp_path, {"train": {"epochs": 1}})


def run_cli(capsys, *argv: str) -> tuple[int, list[str], float]:
    start = time.monotonic()
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines(), time.monotonic() - start


def test_a_store_locked_by_another_process_fails_at_once_naming_it(project: Path, capsys) -> None:
    db = project / "mlflow.db"
    with lock_held(db) as holder:
        code, err, seconds = run_cli(capsys, "train", "--root", str(project))
        with pytest.raises(StoreError):  # --verbose: the exception itself, with its traceback
            main(["--verbose", "evaluate", "--root", str(project)])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"mtl train: error: the MLflow tracking store sqlite:///{db} cannot be used: it is locked by pid {holder.pid} (")
    assert "wait for that process to finish (or stop it), then rerun" in err[0]
    assert seconds < 30, seconds  # 3 tries of 2 s; MLflow alone: 20 s per write, then a traceback
    assert not (project / "models" / "model.safetensors").exists()  # nothing trained


def test_a_read_only_store_fails_at_once(project: Path, capsys) -> None:
    db = project / "mlflow.db"
    if os.geteuid() == 0:
        make, undo = ["chattr", "+i", str(db)], ["chattr", "-i", str(db)]
        if subprocess.run(make, capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported on this file system")
    else:
        db.chmod(0o444)
        undo = None
    try:
        code, err, seconds = run_cli(capsys, "register", "--root", str(project))
    finally:
        subprocess.run(undo, check=True) if undo else db.chmod(0o644)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"mtl register: error: the MLflow tracking store sqlite:///{db} cannot be used: it is read-only (attempt to write a readonly database)")
    assert "make the file and its folder writable" in err[0]
    assert seconds < 30, seconds


def test_a_server_that_is_down_fails_within_seconds(project: Path, capsys, monkeypatch) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, err, seconds = run_cli(capsys, "evaluate", "--root", str(project))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"mtl evaluate: error: the MLflow tracking store {uri} cannot be used: unreachable (")
    assert "3 tries in" in err[0] and "start it (mlflow server" in err[0]
    assert seconds < 30, seconds  # MLflow's own retries: 251 s (the measurement)
    # the flow checks before its first stage too
    from flows.pipeline import mtl_pipeline

    start = time.monotonic()
    with pytest.raises(StoreError, match="unreachable"):
        mtl_pipeline.fn(str(project))
    assert time.monotonic() - start < 30
    assert not (project / "reports" / "test_metrics.json").exists()


@pytest.mark.timeout(600)
def test_a_store_locked_during_training_loses_nothing(tiny_data: Path, tmp_path: Path) -> None:
    """Locked after epoch 1 is logged: training goes on and checkpoints; the stage ends with one line; the
    rerun, with the store back, resumes the same run and logs the epochs it missed, each once."""
    root = project_from(tiny_data, tmp_path, {"train": {"epochs": 2, "max_steps_per_epoch": 3}})
    db = root / "mlflow.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtl_core.cli", "train"], cwd=root, env=stage_env(root), stderr=subprocess.PIPE, text=True
    )  # fmt: skip
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "epoch 1/2:" in line:
            break
    with lock_held(db):
        lines += proc.stderr.readlines()
        assert proc.wait(timeout=300) == 2, "".join(lines)[-3000:]
        assert (root / "checkpoints" / "train" / "last.pt").is_file()  # the epochs are kept
    text = "".join(lines)
    assert "Traceback" not in text, text
    assert lines[-1].startswith(f"mtl train: error: the MLflow tracking store sqlite:///{db} failed during training (")
    assert "(sqlite3.OperationalError) database is locked);" in lines[-1] and "[SQL" not in lines[-1]
    assert "epoch(s) 2 and " in lines[-1] and "once the store answers, rerun the stage" in lines[-1]
    assert text.count("the MLflow store failed (") == 1  # one warning, not one per call

    run_stage("train", root=root)
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("mtl-pipeline").experiment_id], "tags.`mtl.stage` = 'train'")
    assert run.info.status == "FINISHED"
    for key in ("by_epoch/val/mean/accuracy", "by_epoch/train/mean/loss"):  # training.sink.curve_metric
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2], key
    assert not (root / "checkpoints" / "train").exists()


KILLED_IN_MIGRATIONS = """
import os, signal, sys
from pathlib import Path
import mlflow.store.db.utils as db_utils
from alembic import command
from alembic.script import ScriptDirectory

def upgrade_then_die(engine):  # the first half of MLflow's migrations, then SIGKILL, as a kill would land
    config = db_utils._get_alembic_config(str(engine.url))
    revisions = [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()][::-1]
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revisions[len(revisions) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

db_utils._upgrade_db = upgrade_then_die
from mtl_core.config import load_config
from mtl_core.tracking.store import setup_mlflow
root = Path(sys.argv[1])
setup_mlflow(load_config(root / "params.yaml"), root)
"""


def test_a_process_killed_while_creating_the_store_leaves_none_the_next_one_creates_it(project: Path) -> None:
    """SIGKILL in the middle of MLflow's schema migrations of a new SQLite store (half of them applied)
    leaves no store file, or the next start would find an intermediate schema and refuse it forever
    ("out-of-date database schema"; seen in the soak): the next stage creates the store and trains,
    and no temporary file is left beside it."""
    db = project / "mlflow.db"
    db.unlink()  # the tiny project comes with a store made once for the session: start without one
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_MIGRATIONS, str(project)], env=stage_env(project),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not db.exists()
    for stage in ("ingest", "preprocess", "train"):
        run_stage(stage, root=project)
    runs = MlflowClient(f"sqlite:///{db}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{db}").search_experiments()]
    )
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert [p.name for p in project.iterdir() if ".creating-" in p.name] == []
