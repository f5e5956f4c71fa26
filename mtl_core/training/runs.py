"""The MLflow run of a training that may be resumed, and the runs whose process died.

A training run is opened through `training_run`: when the model's folder under checkpoints/ records a
run of the same fingerprint (`run.json`, written as the run starts), it reopens that MLflow run (its
metric steps continue) with the checkpoint `last.pt` if there is one, else it starts a new one. A
checkpoint that is there but cannot be resumed (unreadable, another format) starts a new run and marks
the old one FAILED with the reason (`unreadable checkpoint`): training again from epoch 1 in the old run
would give its history two values for the epochs it had logged.

Each run records the host and the process that has it open (`mtl.host`, `mtl.pid`, `mtl.pid_start`,
`mtl.open_by`: the training, then evaluate, register and compare, which reopen it). When a stage starts,
a RUNNING run of that stage whose process on this host is gone, and which no checkpoint can resume, is
settled: FINISHED when its training had finished (`mtl.trained`; a later stage was killed while it had the
run open: `mtl.interrupted_stage` names it), else FAILED with the reason. A killed attempt never stays
"RUNNING" forever, a finished training is never marked FAILED, and a run whose process is alive is left
alone. Runs on other hosts are left alone too (their process cannot be checked from here).
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

from mtl_core.stopping import StageStopped
from mtl_core.tracking.runs import (
    HOST_TAG, INTERRUPTED_TAG, OPEN_BY_TAG, PID_TAG, REASON_TAG, TRAINED_TAG, end_active_run, process_alive, process_tags,
)  # fmt: skip
from mtl_core.tracking.store import StoreError
from mtl_core.training import checkpoint
from mtl_core.training.checkpoint import Resume

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


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
    try:
        tmp.write_text(json.dumps({"run_id": run_id, "fingerprint": fingerprint}))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _remove_stale_run_files(folder: Path) -> None:
    """Temporary run files of writes that were killed before their rename."""
    if folder.is_dir():
        for stale in folder.glob(f".{RUN_FILE}.tmp-*"):
            stale.unlink(missing_ok=True)


def fail_run(run_id: str, reason: str) -> None:
    """Mark run `run_id` FAILED with `reason` (its mtl.failed_reason tag)."""
    client = MlflowClient()
    client.set_tag(run_id, REASON_TAG, reason)
    client.set_terminated(run_id, status="FAILED")


@contextmanager
def training_run(
    folder: Path, fingerprint: dict[str, Any], *, experiment_id: str | None = None, run_name: str | None = None,
    nested: bool = False, fresh: bool = False, on_new: Callable[[], None] | None = None, stage: str = "train",
) -> Iterator[tuple[mlflow.ActiveRun, Resume]]:
    """Open the MLflow run of the model checkpointed in `folder` (`run.json`: the run id, written when the
    run starts; `last.pt`: the checkpoint): the killed attempt's run when its fingerprint matches and the
    run is still in the store, with its checkpoint if there is one; else a new run, in which `on_new()`
    records what a run records once (its parameters and tags: tracking.runs.record_new_run).

    The run ends FINISHED (and `mtl.trained`) when the body returns; KILLED with the signal as its reason
    when the stage is stopped (the checkpoint stays: the next start resumes into this run); FAILED on an
    error, quietly when the store itself is what failed (the rerun that resumes the run settles it)."""
    run_file = folder / RUN_FILE
    _remove_stale_run_files(folder)
    recorded = {} if fresh else _read_run_file(run_file)
    state, refused = checkpoint.read_checkpoint(folder / checkpoint.LAST, fingerprint, fresh)
    same = recorded.get("fingerprint") == fingerprint and _existing_run(recorded.get("run_id"))
    if state is not None and (not same or state.get("run_id") != recorded.get("run_id")):
        log.warning("train: the checkpoint in %s belongs to another MLflow run; starting over", folder)
        state, refused = None, "checkpoint of another run"
    if same and refused is not None:
        # the run logged the epochs before its checkpoint: training again from epoch 1 in it would give its
        # history two values for one epoch
        reason = refused if refused == checkpoint.UNREADABLE else f"checkpoint not resumable ({refused})"
        fail_run(recorded["run_id"], reason)
        log.warning("train: MLflow run %s marked FAILED (%s); training from epoch 1 in a new run", recorded["run_id"], reason)
        same = False
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
    try:
        mlflow.set_tags(process_tags(stage))
        if not same and on_new is not None:
            on_new()
        yield run, Resume(fingerprint, state, resumed=same)
    except StageStopped as stop:
        end_active_run("KILLED", stop.reason)
        raise
    except StoreError:
        end_active_run("FAILED")
        raise
    except BaseException as err:
        end_active_run("FAILED", f"{type(err).__name__}: {' '.join(str(err).split())[:200]}")
        raise
    else:
        mlflow.set_tag(TRAINED_TAG, "true")
        mlflow.end_run("FINISHED")


def recorded_run_ids(root: Path) -> set[str]:
    """The MLflow runs recorded by the run files under `root` (checkpoints/...): runs a later stage
    invocation may still resume, not to be failed as orphans."""
    return {r["run_id"] for f in Path(root).rglob(RUN_FILE) if (r := _read_run_file(f)).get("run_id")}


def fail_orphan_runs(experiment_id: str, stage: str, keep: set[str] = frozenset()) -> list[str]:
    """Settle the RUNNING runs of `stage` left open on this host by a process that is gone, except `keep`
    (runs about to be resumed): FINISHED when their training had finished (a later stage was killed while
    it had the run open), else FAILED. Return the ids of those marked FAILED."""
    client = MlflowClient()
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`mtl.stage` = '{stage}'", max_results=1000
    )
    failed = []
    for run in runs:
        tags = run.data.tags
        if run.info.run_id in keep or tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit() or process_alive(tags):
            continue
        opened_by = tags.get(OPEN_BY_TAG, stage)
        if tags.get(TRAINED_TAG) == "true":
            client.set_tag(run.info.run_id, INTERRUPTED_TAG, f"{opened_by} (its process died)")
            client.set_terminated(run.info.run_id, status="FINISHED")
            log.warning(
                "%s: MLflow run %s (%s) finished training, but its %s stage's process died with the run open; "
                "marked FINISHED (the next %s finishes that stage's work)",
                stage, run.info.run_id, run.info.run_name, opened_by, opened_by,
            )  # fmt: skip
            continue
        client.set_tag(run.info.run_id, REASON_TAG, "its process died and no checkpoint can resume it")
        client.set_terminated(run.info.run_id, status="FAILED")
        log.warning("%s: MLflow run %s (%s) was left RUNNING by a process that died; marked FAILED", stage, run.info.run_id, run.info.run_name)
        failed.append(run.info.run_id)
    return failed
