"""Shared fixtures: tiny projects on the built-in dataset, an isolated MLflow store per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Tests never touch a user's MLflow server: every store is a SQLite file inside a test's folder.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_REGISTRY_URI", None)

REPO_ROOT = Path(__file__).resolve().parents[1]

# A pipeline small enough for CPU tests: ~240 images, a small CNN, two short epochs, few image tiles.
TINY_PARAMS = {
    "data": {"builtin": {"num_images": 240, "seed": 0}},
    "model": {"backbone": "small_cnn"},
    "train": {"epochs": 2, "batch_size": 32, "num_workers": 0, "lr": 0.003},
    # the image reports drawn with a few tiles (each tile is a matplotlib axes: 8/12/4 cost every evaluate
    # of the suite ~3 s more on 2 cores); `trained_project` draws them at params.yaml's values
    "evaluate": {"gallery_tiles": 2, "label_issue_tiles": 2, "gradcam_images": 1},
}


def deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_params(root: Path, overrides: dict | None = None) -> Path:
    """The repository's params.yaml with test overrides, written into `root`."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params = deep_update(params, deep_update(TINY_PARAMS, overrides or {}))
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _no_tracking_uri_leak():
    """`mlflow.set_tracking_uri` (called by tests to read a store back) also exports the URI to the
    environment, where our resolver would prefer it for the next test's project: clear it around tests."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "data" / "datasets").mkdir(parents=True)
    write_params(root)
    return root


def wait_until_serving(url: str, proc: subprocess.Popen, log_path: Path, what: str, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the tail of the server's log if `proc` exits first or
    `timeout` seconds pass (a server a test started on 127.0.0.1)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n" + Path(log_path).read_text()[-3000:])
        time.sleep(0.5)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project through ingest and preprocess, once per session: `project_from` copies it for
    tests that train on the tiny data with parameters of their own (ingest and preprocess do not depend
    on the train or model sections)."""
    from mtl_core.pipeline import run_stage

    root = tmp_path_factory.mktemp("tiny-data") / "project"
    (root / "data" / "datasets").mkdir(parents=True)
    write_params(root)
    for stage in ("ingest", "preprocess"):
        run_stage(stage, root=root)
    # The store's tables made once here: a fresh SQLite store costs every `mtl` process that creates it
    # ~4 s of alembic migrations on 2 cores, and the copies only ever need an empty, current one (the
    # creation of a fresh store has tests of its own in test_tracking.py).
    from mtl_core.config import load_config
    from mtl_core.tracking.store import initialise_store, tracking_uri

    initialise_store(tracking_uri(load_config(root / "params.yaml"), root))
    return root


def project_from(data: Path, dest: Path, overrides: dict | None = None) -> Path:
    """A copy of the `tiny_data` project in `dest/project`, with params.yaml's test overrides."""
    root = Path(dest) / "project"
    shutil.copytree(data, root)
    write_params(root, overrides)
    return root


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project taken through ingest, preprocess, train and evaluate once, shared by stage tests
    (5 epochs: about 10 s of training on 2 cores, after which `color` and `size` are well learned)."""
    from mtl_core.pipeline import run_stage

    root = tmp_path_factory.mktemp("trained") / "project"
    (root / "data" / "datasets").mkdir(parents=True)
    defaults = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["evaluate"]  # image reports as users get them
    write_params(root, {"train": {"epochs": 5}, "evaluate": defaults})  # epochs: the easy tasks end far above chance
    for stage in ("ingest", "preprocess", "train", "evaluate"):
        run_stage(stage, root=root)
    return root


@pytest.fixture(scope="session")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MMoE project with single-task baselines, taken through compare (shared by the baselines /
    compare tests and the task-group tests, which reuse its data and baselines)."""
    from mtl_core.pipeline import run_stage

    root = tmp_path_factory.mktemp("compare") / "project"
    (root / "data" / "datasets").mkdir(parents=True)
    write_params(root, {
        "compare": {"single_task": True},
        "model": {"arch": "mmoe", "arch_options": {"num_experts": 2}},
        "train": {"epochs": 1, "task_affinity_every": 2},
    })  # fmt: skip
    for stage in ("ingest", "preprocess", "train", "evaluate", "baselines", "all_in_one", "compare"):
        run_stage(stage, root=root)
    return root


def copy_working_tree(dest: Path) -> Path:
    """A fresh git clone of the working tree as it is now (tracked and untracked-not-ignored files).

    CI runs on a clean checkout, where this equals `git clone`; during development it also carries
    uncommitted changes, so the end-to-end tests test the code under review.
    """
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.email=test@example.com", "-c", "user.name=test"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "test clone"], cwd=dest, check=True)
    return dest


def stage_env(root: Path) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first on PATH (for `mtl`), offline tools."""
    import sys

    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PREFECT_HOME"] = str(root / ".prefect-home")
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    return env


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server or worker a test started: SIGTERM, so it shuts down cleanly, then SIGKILL if it has
    not exited within `timeout` seconds (a hung server must not outlive its test)."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `prefect server start` on 127.0.0.1 (its own database), shared by a module's tests (a
    start takes 10-30 s on 2 cores), stopped after them. Yields (API URL, environment for clients).
    Started in the repository root, so it reads the project's prefect.toml as a user's server does."""
    import sys

    home = tmp_path_factory.mktemp("prefect-server")
    port, env = free_port(), stage_env(home)
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/api"
        try:
            wait_until_serving(f"{url}/health", proc, log_path, "Prefect server", timeout=180)
            yield url, env
        finally:
            stop_process(proc)


# The suite runs on 2 workers, one test file at a time each (`--dist loadfile`), each worker starting with
# the next file in collection order when it finishes one. A file of a few minutes collected late leaves one
# worker idle while the other finishes it, so the slowest files go first (longest-first scheduling) and
# the many short ones fill in at the end. Slowest first, summed from the 30 slowest tests of a fresh-clone
# run on 2 cores (2026-12-07); a file not listed runs after these, files with more tests first (xdist's own order).
SLOWEST_FILES = [
    "test_deployment.py", "test_resume.py", "test_distributed.py", "test_dvc_experiments.py", "test_e2e_dvc.py",
    "test_register.py", "test_store_faults.py", "test_auto_grouping.py", "test_baselines_compare.py",
    "test_tracking.py", "test_forty_tasks.py", "test_predict.py", "test_stopping.py", "test_task_groups.py",
    "test_runtime_speed_options.py",
]  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the test files slowest first (SLOWEST_FILES), keeping the order of the tests in each file."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.path.name] = counts.get(item.path.name, 0) + 1
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -counts[item.path.name], str(item.path)))
