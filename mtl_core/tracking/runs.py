"""The MLflow run of a model: its name and tags, what a new run records once, and reopening it.

One trained model has one MLflow run. `train` opens it and writes its id next to the model
(`models/mlflow_run.json`); `evaluate`, `register` and `compare` reopen that run (`model_run`), so when
DVC skips a cached stage, the later stages still log into the run of the model they actually handle.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mtl_core.config import flatten
from mtl_core.hashing import dvc_locked_md5
from mtl_core.paths import ProjectPaths
from mtl_core.tracking.store import setup_mlflow

if TYPE_CHECKING:
    import mlflow

    from mtl_core.config import PipelineConfig


def experiment_tags(cfg: PipelineConfig) -> dict[str, str]:
    """The method of a run as tags (`mtl.weighting`, `mtl.arch`, `mtl.backbone`), and the DVC experiment
    it belongs to when there is one: `dvc.exp_name` and `dvc.exp_baseline_rev` (the commit the experiment
    started from), from the `$DVC_EXP_NAME` and `$DVC_EXP_BASELINE_REV` that `dvc exp run` sets."""
    tags = {"mtl.weighting": cfg.train.weighting, "mtl.arch": cfg.model.arch, "mtl.backbone": cfg.model.backbone}
    for tag, var in (("dvc.exp_name", "DVC_EXP_NAME"), ("dvc.exp_baseline_rev", "DVC_EXP_BASELINE_REV")):
        if value := os.environ.get(var):
            tags[tag] = value
    return tags


def run_name(cfg: PipelineConfig, kind: str = "mtl", task: str | None = None) -> str:
    """A run's name in the MLflow UI: what it trained, short enough for the runs table's name column.

    * `mtl`: the multi-task model, `mtl-<weighting>-<backbone>` (`mtl-famo-resnet18`), with the architecture
      when it is not hard sharing (`mtl-famo-mmoe-resnet18`) and `-groups` for a grouped model;
    * `stl`: the single-task baseline of `task`, `stl-<task>-<backbone>` (`stl-shape-resnet18`);
    * `all_in_one`: the ungrouped multi-task reference of a grouped model, `mtl-...-all-in-one`.
    """
    arch = "" if cfg.model.arch == "hard_sharing" else f"-{cfg.model.arch}"
    method = f"mtl-{cfg.train.weighting}{arch}-{cfg.model.backbone}"
    if kind == "mtl":
        return method + ("-groups" if cfg.model.task_groups else "")
    if kind == "stl":
        if not task:
            raise ValueError("a single-task run name needs its task")
        return f"stl-{task}-{cfg.model.backbone}"
    if kind == "all_in_one":
        return f"{method}-all-in-one"
    raise ValueError(f"unknown run kind {kind!r}: expected mtl, stl or all_in_one")


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
    if (md5 := dvc_locked_md5(root, "ingest", "data/ingested/manifest.csv")) is not None:
        tags["dvc.data_md5"] = md5
    return tags


def write_run_info(paths: ProjectPaths, run_id: str, experiment_id: str) -> None:
    paths.run_info.write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id}, indent=2) + "\n")


def read_run_info(paths: ProjectPaths) -> dict[str, str]:
    if not paths.run_info.is_file():
        raise FileNotFoundError(f"{paths.run_info}: no MLflow run recorded for this model; run the train stage first")
    return json.loads(paths.run_info.read_text())


HOST_TAG, PID_TAG, PID_START_TAG = "mtl.host", "mtl.pid", "mtl.pid_start"
OPEN_BY_TAG = "mtl.open_by"
"""The stage whose process has the run open now (train, evaluate, register, compare, ...)."""
TRAINED_TAG = "mtl.trained"
"""'true' once the run's training has finished: a later stage killed while it had the run open leaves it
FINISHED, never FAILED (training.runs.fail_orphan_runs)."""
REASON_TAG = "mtl.failed_reason"
INTERRUPTED_TAG = "mtl.interrupted_stage"


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc; None elsewhere): a pid reused by another
    process since a run recorded it does not pass for the run's process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[19].decode()


def process_tags(stage: str) -> dict[str, str]:
    """The host and process that have a run open now, and their stage."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), OPEN_BY_TAG: stage}
    if (start := _process_start(os.getpid())) is not None:
        tags[PID_START_TAG] = start
    return tags


def process_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process a run's tags name (on this host) is still running: it exists, and, where its
    start time was recorded, it is the same process (not a reused pid)."""
    pid = tags.get(PID_TAG, "")
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    recorded = tags.get(PID_START_TAG)
    return recorded is None or _process_start(int(pid)) in (None, recorded)


def end_active_run(status: str, reason: str | None = None, tags: Mapping[str, str] | None = None) -> None:
    """End the active run with `status` (and `reason` as its mtl.failed_reason tag). A store that fails
    now is not a second error: the run is left as it is, and the orphan sweep of the next stage start
    (or the rerun that resumes it) settles it."""
    import mlflow

    try:
        extra = dict(tags or {})
        if reason:
            extra[REASON_TAG] = reason
        if extra:
            mlflow.set_tags(extra)
    except Exception:  # noqa: BLE001 - the store is what failed
        pass
    try:
        mlflow.end_run(status)  # pops the run first: the next start_run is not nested under it
    except Exception:  # noqa: BLE001
        pass


@contextmanager
def model_run(cfg: PipelineConfig, root: Path, stage: str = "evaluate") -> Iterator[mlflow.ActiveRun]:
    """Reopen the MLflow run of the model in `models/` for `stage`, recording this process as the one that
    has it open (so that the orphan sweep does not take the run for the dead training process's). A stop
    (SIGTERM, Ctrl-C) leaves the run FINISHED when its training had finished, with the stage that was
    stopped as `mtl.interrupted_stage`; an error of the stage marks it FAILED."""
    import mlflow

    from mtl_core.stopping import StageStopped
    from mtl_core.tracking.store import StoreError

    setup_mlflow(cfg, root)
    info = read_run_info(ProjectPaths(root))
    run = mlflow.start_run(run_id=info["run_id"])
    trained = False
    try:
        trained = mlflow.get_run(run.info.run_id).data.tags.get(TRAINED_TAG) == "true"
        mlflow.set_tags(process_tags(stage))
        yield run
    except StageStopped as stop:
        end_active_run("FINISHED" if trained else "KILLED", None if trained else stop.reason, {INTERRUPTED_TAG: f"{stage} ({stop.reason})"})
        raise
    except BaseException as err:
        end_active_run("FAILED", None if isinstance(err, StoreError) else f"{stage}: {type(err).__name__}")
        raise
    else:
        mlflow.end_run("FINISHED")


def log_config_params(cfg: PipelineConfig) -> None:
    """Every parameter of `cfg` as an MLflow param of the active run, by its dotted name."""
    import mlflow

    params = cfg.model_dump(mode="json")
    if isinstance(params["train"]["class_weights"], dict):  # class names need not be valid MLflow keys
        params["train"]["class_weights"] = json.dumps(params["train"]["class_weights"])
    mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})


def record_new_run(cfg: PipelineConfig, root: Path, tags: Mapping[str, str]) -> None:
    """What a new training run records once (a resumed one has it already): the parameters it trained
    with, `tags` (stage, kind, ...), the ingested data's hashes and the git commit."""
    import mlflow

    log_config_params(cfg)
    all_tags = {**tags, **ingested_data_hash(root)}
    if commit := git_commit(root):
        all_tags["git_commit"] = commit
    mlflow.set_tags(all_tags)


def log_training_data(cfg: PipelineConfig, paths: ProjectPaths) -> None:
    """The multi-task run's inputs: the ingested manifest as an MLflow dataset, the data report and
    params.yaml as artifacts."""
    import mlflow
    import pandas as pd

    manifest = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
    with warnings.catch_warnings():  # a local path matches two equivalent MLflow source types
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(manifest, source=str(paths.manifest.resolve()), name=cfg.data.source)
    mlflow.log_input(dataset, context="training")
    mlflow.log_artifact(str(paths.data_report), artifact_path="data")
    if (paths.root / "params.yaml").is_file():
        mlflow.log_artifact(str(paths.root / "params.yaml"))


def tag_run_and_version(
    uri: str, run_id: str, tags: Mapping[str, str], model_name: str | None = None, version: str | None = None
) -> None:
    """Set `tags` on a finished run and, when given, on its registered model version (a flow run names
    the revision and the Prefect flow run behind both, after the stages)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
        if model_name and version:
            client.set_model_version_tag(model_name, version, key, value)
