import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from mtl_core.config import config_from_dict
from mtl_core.tracking.store import artifact_location, setup_mlflow, sqlite_db_path, tracking_uri


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


def test_sqlite_store_file_lock_and_artifacts_sit_next_to_the_database(tmp_path: Path):
    """The lock and artifact folder follow the database file (shared by several clones), not the project;
    a server store keeps the server's artifact root (its artifact proxy)."""
    shared = tmp_path / "shared" / "mlflow.db"
    assert sqlite_db_path(f"sqlite:///{shared}") == shared
    assert sqlite_db_path("sqlite://") is None and sqlite_db_path("http://127.0.0.1:5000") is None
    assert artifact_location(f"sqlite:///{shared}") == (shared.parent / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None
    exp_id = setup_mlflow(config_from_dict({"mlflow": {"tracking_uri": f"sqlite:///{shared}"}}), tmp_path / "clone")
    assert (shared.parent / "mlflow.db.lock").exists() and not (tmp_path / "clone").exists()
    assert mlflow.get_experiment(exp_id).artifact_location == (shared.parent / "mlartifacts").as_uri()


# A process that sets up the project's store the moment its partner does, then logs one run. Both wait at
# a file barrier in each round's folder after importing MLflow, so their store initialisations overlap.
_CONCURRENT_SETUP = """
import sys, time
from pathlib import Path

import mlflow

from mtl_core.config import config_from_dict
from mtl_core.tracking.store import setup_mlflow

me, rounds = sys.argv[1], [Path(p) for p in sys.argv[2:]]
for root in rounds:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"ready-{me}").touch()
    deadline = time.monotonic() + 30
    while len(list(root.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    exp_id = setup_mlflow(config_from_dict({}), root)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"process {me}"):
        mlflow.log_metric("m", float(me))
"""


def test_two_processes_set_up_one_fresh_sqlite_store_at_once(tmp_path: Path):
    """Two pipelines starting together on a new SQLite store: MLflow creates and migrates the tables in
    whichever process comes first, and two at once used to break the store (`table _alembic_tmp_experiments
    already exists`); the store's file lock serialises it. Several rounds, each on a fresh store."""
    from tests.conftest import REPO_ROOT

    script = tmp_path / "setup_and_log.py"
    script.write_text(_CONCURRENT_SETUP)
    rounds = [tmp_path / f"round{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), me, *map(str, rounds)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for me in ("0", "1")
    ]  # fmt: skip
    # When one process fails, its partner would wait at each later barrier: stop it then.
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.returncode for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outputs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    for root in rounds:
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        assert (root / "mlflow.db.lock").exists()
        assert sorted(e.name for e in mlflow.search_experiments()) == ["Default", "mtl-pipeline"]
        runs = mlflow.search_runs(experiment_names=["mtl-pipeline"])
        assert sorted(runs["tags.mlflow.runName"]) == ["process 0", "process 1"], root
        assert set(runs["status"]) == {"FINISHED"} and sorted(runs["metrics.m"]) == [0.0, 1.0]


def test_two_mtl_train_processes_share_one_fresh_store(tmp_path: Path):
    """Two projects (two clones, say) whose params point at one shared SQLite file, trained at the same
    moment while that file does not exist yet: both runs land, finished, in one experiment whose artifacts
    are next to the shared file, not in the clone that happened to create the experiment."""
    from mtl_core.pipeline import run_stage
    from tests.conftest import stage_env, write_params

    shared = tmp_path / "shared" / "mlflow.db"
    roots = [tmp_path / f"clone{i}" for i in range(2)]
    for root in roots:
        (root / "data" / "datasets").mkdir(parents=True)
        write_params(root, {"mlflow": {"tracking_uri": f"sqlite:///{shared.as_posix()}"}, "train": {"epochs": 1}})
        for stage in ("ingest", "preprocess"):
            run_stage(stage, root=root)
    assert not shared.exists()
    procs = [
        subprocess.Popen(["mtl", "train"], cwd=root, env=stage_env(root), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for root in roots
    ]  # fmt: skip
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{shared.as_posix()}")
    (exp,) = [e for e in mlflow.search_experiments() if e.name == "mtl-pipeline"]
    assert exp.artifact_location == (shared.parent / "mlartifacts").as_uri()
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id])
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    assert sorted(runs["run_id"]) == sorted(
        json.loads((root / "models" / "mlflow_run.json").read_text())["run_id"] for root in roots
    )
    assert not any((root / "mlartifacts").exists() for root in roots)
