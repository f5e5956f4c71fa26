"""Checkpoints that resume a training run exactly, and only into the run that wrote them.

A checkpoint holds everything the next step depends on: model, optimizer and LR schedule, the weighting
method's state, every random generator the loop draws from (python, numpy, torch, CUDA; the data order
and the augmentation need none, training.sampler derives them from the seed), the epoch and the step
within it with that epoch's running statistics, the history so far, the best-on-validation weights, the
MLflow run id, and a fingerprint of what defines the run. bf16 autocast needs no loss scaler, so there is
no AMP state to keep.

Where: `checkpoints/<model>/last.pt` under the project root, outside every DVC output (DVC deletes a
stage's outputs before it reruns the stage; a checkpoint must outlive exactly that), git-ignored. The
stage deletes its checkpoints once it has finished, so a checkpoint always means "an unfinished run".

Writes are atomic: a temporary file in the same folder, fsync, rename over the old one, fsync of the
folder. A kill at any moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl_core.config import PipelineConfig, flatten
from mtl_core.faults import fault_point
from mtl_core.hashing import dvc_locked_md5, file_sha256
from mtl_core.paths import ProjectPaths
from mtl_core.runtime import Distributed

if TYPE_CHECKING:
    from mtl_core.training.progress import EpochProgress
    from mtl_core.training.state import TrainingState

log = logging.getLogger(__name__)

FORMAT = 1
CHECKPOINTS_DIR = "checkpoints"
LAST = "last.pt"

NOT_TRAINING = frozenset({
    "train.num_workers",  # the sampler makes batches and augmentation independent of the workers
    "train.device",  # a run may continue on another device (float results then differ at rounding level)
    "train.checkpoint_every_steps", "train.on_nonfinite", "train.max_skipped_steps",
    # the global batch, data order and augmentation do not depend on the number of processes (the ranks
    # take slices of one global order), so a run may resume on another number of GPUs
    "train.distributed.nproc_per_node", "train.distributed.backend",
    # how the device computes the same step (memory layout, compiled kernels): rounding-level differences
    "train.channels_last", "train.compile",
})  # fmt: skip
"""Parameters that do not change what a run computes: changing them still resumes."""


@dataclass(frozen=True)
class Resume:
    """What `fit` needs to continue a run: the run's fingerprint, and the checkpoint to resume (None:
    start at epoch 1). `resumed`: the MLflow run is the one a killed attempt opened."""

    fingerprint: dict[str, Any]
    state: dict[str, Any] | None = None
    resumed: bool = False


def checkpoints_root(root: Path) -> Path:
    return Path(root) / CHECKPOINTS_DIR


@functools.cache
def code_version() -> str:
    """sha256 of every mtl_core source file (path and content): a checkpoint of other code is not resumed,
    committed or not. Once per process (the baselines stage asks once per task)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _content_sha256(path: Path, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


def _sha256(path: Path) -> str:
    """file_sha256, once per file version in a process (the baselines stage fingerprints K models over
    the same caches: the image cache alone is 73 MB per task on the default data)."""
    stat = path.stat()
    return _content_sha256(path, stat.st_mtime_ns, stat.st_size)


def data_fingerprint(paths: ProjectPaths) -> dict[str, str]:
    """The training data: the ingested manifest and the label / weight caches by content; the image cache
    by DVC's hash of data/preprocessed where dvc.lock has one, else by content (hashing it is the only
    costly part, and under `dvc repro` it is skipped)."""
    out: dict[str, str] = {}
    if paths.manifest.is_file():
        out["manifest"] = _sha256(paths.manifest)
    for split in ("train", "val"):
        for name, path in (("labels", paths.labels_cache(split)), ("weights", paths.weights_cache(split))):
            if path.is_file():
                out[f"{split}_{name}"] = _sha256(path)
    dvc_md5 = dvc_locked_md5(paths.root, "preprocess", "data/preprocessed")
    for split in ("train", "val"):
        path = paths.images_cache(split)
        if path.is_file():
            out[f"{split}_images"] = f"dvc:{dvc_md5}:{path.stat().st_size}" if dvc_md5 else _sha256(path)
    return out


def training_params(cfg: PipelineConfig) -> dict[str, str]:
    """The parameters that define what a training run computes, flattened to `section.key: json`."""
    sections = cfg.model_dump(mode="json", include={"model", "train", "preprocess"})
    return {k: json.dumps(v, sort_keys=True) for k, v in flatten(sections).items() if k not in NOT_TRAINING}


def fingerprint(cfg: PipelineConfig, paths: ProjectPaths, label_columns: list[int] | None) -> dict[str, Any]:
    return {
        "params": training_params(cfg),
        "label_columns": list(label_columns) if label_columns is not None else None,
        "data": data_fingerprint(paths),
        "code": code_version(),
        "torch": str(torch.__version__),
    }


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs, readably: changed parameters by name, else the component (data, code, ...)."""
    changes = []
    old_params, new_params = old.get("params", {}), new.get("params", {})
    for key in sorted(set(old_params) | set(new_params)):
        if old_params.get(key) != new_params.get(key):
            changes.append(f"{key}: {old_params.get(key, '(unset)')} -> {new_params.get(key, '(unset)')}")
    for part in ("label_columns", "data", "code", "torch"):
        if old.get(part) != new.get(part):
            changes.append(f"{part} changed")
    return changes


def save(path: Path, state: dict[str, Any]) -> None:
    """Atomically replace `path` with `state` (temporary file, fsync, rename, fsync of the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # serialised in memory first: torch.save into a file turns a failed write (a full disk) into a
    # RuntimeError "unexpected pos"; a plain write raises the OSError that says what happened
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    try:
        with tmp.open("wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:  # a full disk, a stop: no torn temporary file left on the disk
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not err.filename:  # a write names no file: name it
            raise OSError(err.errno, err.strerror, str(tmp)) from err
        raise
    fault_point("checkpoint.before_rename")
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_stale_temporaries(path: Path) -> None:
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)


UNREADABLE = "unreadable checkpoint"
"""Why `read_checkpoint` did not resume a checkpoint that cannot be read (also the reason a run it
belonged to is marked FAILED with: training.runs)."""


def read_checkpoint(path: Path, expected: dict[str, Any], fresh: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """(the checkpoint at `path` if it may be resumed, else None; why a checkpoint that is there is not
    resumed: UNREADABLE, "other format", "other settings", "--fresh"; None when there is none or it is
    resumed). Resumable: readable, and made by a run with the fingerprint `expected`. One log line says
    why a checkpoint is not resumed (never a silent resume into another configuration, nor a silent
    restart)."""
    if not path.parent.is_dir():
        return None, None
    _remove_stale_temporaries(path)  # a write that was killed before its rename
    if not path.is_file():
        return None, None
    if fresh:
        log.info("train: --fresh: ignoring the checkpoint %s", path)
        return None, "--fresh"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a checkpoint")
    except Exception as err:  # a file from elsewhere or of an older format: never trusted, never fatal
        log.warning("train: ignoring the unreadable checkpoint %s (%s); starting over", path, " ".join(str(err).split())[:300])
        return None, UNREADABLE
    if state.get("format") != FORMAT:
        log.warning("train: ignoring the checkpoint %s of format %s (this code writes %s); starting over", path, state.get("format"), FORMAT)
        return None, "other format"
    if state.get("fingerprint") != expected:
        changes = fingerprint_diff(state.get("fingerprint", {}), expected)
        log.warning(
            "train: ignoring the checkpoint %s (epoch %s, step %s): it was made with other settings (%s); starting over",
            path, state.get("epoch"), state.get("step"), "; ".join(changes[:8]) + (" ..." if len(changes) > 8 else ""),
        )  # fmt: skip
        return None, "other settings"
    return state, None


def load_resumable(path: Path, expected: dict[str, Any], fresh: bool = False) -> dict[str, Any] | None:
    """The checkpoint at `path` if it may be resumed (read_checkpoint), else None."""
    return read_checkpoint(path, expected, fresh)[0]


def remove(path: Path) -> None:
    """Delete a finished run's checkpoint folder (and an empty parent)."""
    shutil.rmtree(path.parent, ignore_errors=True)


@dataclass(frozen=True)
class Checkpointer:
    """Where and as what one training's checkpoints are written: `path` (None: no checkpoints), the
    fingerprint and MLflow run they belong to, the epochs planned. Under DDP every rank calls `save`
    at the same steps (a mid-epoch checkpoint holds the epoch's statistics summed over the ranks, a
    collective); rank 0 writes."""

    path: Path | None
    fingerprint: dict[str, Any]
    run_id: str
    epochs: int
    dist: Distributed

    def save(self, state: TrainingState, epoch: int, progress: EpochProgress | None = None) -> None:
        if self.path is None:
            return
        if progress is not None:
            progress = progress.reduced(self.dist)  # a collective: the global sums go into the checkpoint
        if not self.dist.is_main:
            return
        save(self.path, {"fingerprint": self.fingerprint, "run_id": self.run_id, "epochs": self.epochs, **state.state_dict(epoch, progress)})
