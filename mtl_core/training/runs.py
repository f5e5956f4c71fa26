"""The MLflow run of a training that may be resumed, and the runs whose process died.

A training run is opened through `training_run`: when the model's folder under checkpoints/ records a
run of the same fingerprint (`run.json`, written as the run starts), it reopens that MLflow run (its
metric steps continue) with the checkpoint `last.pt` if there is one, else it starts a new one. Each run records the host and the
process training it (`mtl.host`, `mtl.pid`); when a stage starts, a RUNNING run of that stage whose process
on this host is gone, and which no checkpoint can resume, is marked FAILED: a killed attempt never stays
"RUNNING" forever. Runs on other hosts are left alone (their process cannot be checked from here).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mtl_core.training import checkpoint
from mtl_core.training.checkpoint import Resume

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


def _process_tags() -> dict[str, str]:
    return {"mtl.host": socket.gethostname(), "mtl.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _existing_run(run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        return MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _read_run_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_run_file(path: Path, run_id: str, fingerprint: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"run_id": run_id, "fingerprint": fingerprint}))
    os.replace(tmp, path)


@contextmanager
def training_run(
    folder: Path, fingerprint: dict[str, Any], *, experiment_id: str | None = None, run_name: str | None = None,
    nested: bool = False, fresh: bool = False, on_new: Callable[[], None] | None = None,
) -> Iterator[tuple[mlflow.ActiveRun, Resume]]:
    """Open the MLflow run of the model checkpointed in `folder` (`run.json`: the run id, written when the
    run starts; `last.pt`: the checkpoint): the killed attempt's run when its fingerprint matches and the
    run is still in the store, with its checkpoint if there is one; else a new run, in which `on_new()`
    records what a run records once (its parameters and tags: tracking.runs.record_new_run)."""
    run_file = folder / RUN_FILE
    recorded = {} if fresh else _read_run_file(run_file)
    state = checkpoint.load_resumable(folder / checkpoint.LAST, fingerprint, fresh)
    same = recorded.get("fingerprint") == fingerprint and _existing_run(recorded.get("run_id"))
    if state is not None and (not same or state.get("run_id") != recorded.get("run_id")):
        log.warning("train: the checkpoint in %s belongs to another MLflow run; starting over", folder)
        state = None
    if same:
        run = mlflow.start_run(run_id=recorded["run_id"], nested=nested)
        if state is not None:
            where = (
                f"epoch {state['epoch']}, step {state['progress']['steps']} of it" if state.get("progress")
                else f"after epoch {state['epoch']}" + (" (finished)" if state["epoch"] >= state.get("epochs", 0) else "")
            )  # fmt: skip
            log.info("train: resuming MLflow run %s from %s: %s", recorded["run_id"], folder / checkpoint.LAST, where)
        else:
            log.info("train: reopening MLflow run %s, killed before its first checkpoint; training from epoch 1", recorded["run_id"])
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=nested)
        _write_run_file(run_file, run.info.run_id, fingerprint)
    with run:
        mlflow.set_tags(_process_tags())
        if not same and on_new is not None:
            on_new()
        yield run, Resume(fingerprint, state, resumed=same)


def recorded_run_ids(root: Path) -> set[str]:
    """The MLflow runs recorded by the run files under `root` (checkpoints/...): runs a later stage
    invocation may still resume, not to be failed as orphans."""
    return {r["run_id"] for f in Path(root).rglob(RUN_FILE) if (r := _read_run_file(f)).get("run_id")}


def fail_orphan_runs(experiment_id: str, stage: str, keep: set[str] = frozenset()) -> list[str]:
    """Mark FAILED the RUNNING runs of `stage` started on this host by a process that is gone, except
    `keep` (runs about to be resumed); return their ids."""
    client = MlflowClient()
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`mtl.stage` = '{stage}'", max_results=1000
    )
    failed = []
    for run in runs:
        tags = run.data.tags
        pid = tags.get("mtl.pid", "")
        if run.info.run_id in keep or tags.get("mtl.host") != host or not pid.isdigit() or _alive(int(pid)):
            continue
        client.set_terminated(run.info.run_id, status="FAILED")
        client.set_tag(run.info.run_id, "mtl.failed_reason", "its process died and no checkpoint can resume it")
        log.warning("%s: MLflow run %s (%s) was left RUNNING by a process that died; marked FAILED", stage, run.info.run_id, run.info.run_name)
        failed.append(run.info.run_id)
    return failed
