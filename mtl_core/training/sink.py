"""Where a training reports what it does: one sink, chosen once, instead of rank checks through the engine.

* `MlflowSink`: the log lines and the active MLflow run (rank 0 of a stage);
* `LogSink`: the log lines only (benchmarks, unit tests: no MLflow run);
* `NullSink`: nothing (the other ranks of a distributed training, whose numbers rank 0 reports).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mtl_core.training.engine")

CURVE_PREFIX = "by_epoch/"
"""Before each per-epoch metric in MLflow (`by_epoch/train/mean/loss`, `by_epoch/val/shape/accuracy`; the
columns of reports/train_history.csv keep their names): the run's *Model metrics* tab draws a section per
metric-name prefix in alphabetical order, so the learning curves come before the single-value `compare/`
and `test/` charts."""


def curve_metric(column: str) -> str:
    """The MLflow name of a per-epoch metric, a column of reports/train_history.csv."""
    return CURVE_PREFIX + column


class NullSink:
    """Reports nothing."""

    run_id = ""

    def info(self, message: str, *args: Any) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, path: Path, folder: str) -> None:
        pass

    def log_epoch(self, row: Mapping[str, float], cosines: Mapping[int, list], tasks: Sequence[str], epochs: int) -> None:
        pass

    def catch_up(self, history: Sequence[Mapping[str, float]], cosines: Mapping[int, list], tasks: Sequence[str]) -> None:
        pass

    def flush(self) -> None:
        """Write what the store did not take while training (MlflowSink); raise if it still cannot."""


class LogSink(NullSink):
    """The log lines: what training starts with, one line per epoch."""

    def info(self, message: str, *args: Any) -> None:
        log.info(message, *args)

    def log_epoch(self, row: Mapping[str, float], cosines: Mapping[int, list], tasks: Sequence[str], epochs: int) -> None:
        per_task = ", ".join(f"{t} {row[f'val/{t}/accuracy']:.3f}" for t in tasks)
        log.info(
            "epoch %d/%d: train loss %.3f, val mean accuracy %.3f (%s), %.1f images/s",
            int(row["epoch"]), epochs, row["train/mean/loss"], row["val/mean/accuracy"], per_task, row["train/images_per_second"],
        )  # fmt: skip


class MlflowSink(LogSink):
    """The log lines and the active MLflow run: params, per-epoch metrics (step = epoch), the epoch's
    task-gradient cosine matrix as a JSON artifact, the figures and reports as artifacts.

    A store that fails in the middle of a training (a server gone, a SQLite file locked or made read-only)
    does not stop it: the call that failed, and every later one, is kept in order; at each epoch's end,
    once a quick probe (tracking.store.store_problem) finds the store back, they are written. The
    checkpoints go on being written meanwhile. `flush()` at the end of the training writes what is left,
    or raises StoreUnavailable naming the store and the epochs not logged: the checkpoint holds them, and
    the rerun that resumes the run logs them (`catch_up`)."""

    def __init__(self) -> None:
        import mlflow

        self._mlflow = mlflow
        self.run_id = mlflow.active_run().info.run_id
        self._pending: list[tuple[str, Callable[[], Any]]] = []  # (what, call) the store did not take
        self._failure: str | None = None

    def _attempt(self, call: Callable[[], Any]) -> bool:
        """Run one store call: whether it went through; a store failure is kept in `_failure`, any other
        error raised."""
        try:
            call()
        except Exception as err:
            from mtl_core.tracking.store import describe_store_failure, is_store_failure

            if not is_store_failure(err):
                raise
            self._failure = describe_store_failure(err)
            log.debug("the MLflow store's error", exc_info=True)
            return False
        return True

    def _call(self, what: str, call: Callable[[], Any]) -> None:
        if self._pending:
            self._pending.append((what, call))
            return
        if not self._attempt(call):
            log.warning(
                "the MLflow store failed (%s: %s); training goes on and keeps its checkpoints; what it reports "
                "is kept and logged when the store answers again", what, self._failure,
            )  # fmt: skip
            self._pending.append((what, call))

    def _retry_pending(self) -> bool:
        """Write the kept calls if a quick probe finds the store back; whether nothing is left."""
        if not self._pending:
            return True
        from mtl_core.tracking.store import store_problem

        if store_problem(self._mlflow.get_tracking_uri()) is not None:
            return False
        while self._pending:
            if not self._attempt(self._pending[0][1]):
                return False
            self._pending.pop(0)
        log.info("the MLflow store answers again: what it missed is logged")
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("params", lambda: self._mlflow.log_params(dict(params)))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._call("metrics", lambda: self._mlflow.log_metrics(dict(metrics), step=step))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call("tags", lambda: self._mlflow.set_tags(dict(tags)))

    def log_artifact(self, path: Path, folder: str) -> None:
        self._call(f"artifact {path.name}", lambda: self._mlflow.log_artifact(str(path), artifact_path=folder))

    def log_epoch(self, row: Mapping[str, float], cosines: Mapping[int, list], tasks: Sequence[str], epochs: int) -> None:
        self._retry_pending()
        self._record_epoch(dict(row), dict(cosines), list(tasks))
        super().log_epoch(row, cosines, tasks, epochs)

    def _record_epoch(self, row: Mapping[str, float], cosines: Mapping[int, list], tasks: Sequence[str]) -> None:
        epoch = int(row["epoch"])
        metrics = {curve_metric(k): v for k, v in row.items() if k != "epoch" and np.isfinite(v)}
        self._call(f"epoch {epoch}", lambda: self._mlflow.log_metrics(metrics, step=epoch))
        if epoch in cosines:
            matrix = {"tasks": list(tasks), "epoch": epoch, "cosine": cosines[epoch]}
            self._call(f"epoch {epoch}", lambda: self._mlflow.log_dict(matrix, f"task_relations/gradient_cosine_epoch_{epoch:03d}.json"))

    def catch_up(self, history: Sequence[Mapping[str, float]], cosines: Mapping[int, list], tasks: Sequence[str]) -> None:
        """Log the epochs a resumed checkpoint holds but the run has not recorded (a kill between the
        checkpoint and the metrics, a store that failed during the killed attempt), so the run has one
        value per epoch, none twice."""
        from mlflow.tracking import MlflowClient

        logged = {m.step for m in MlflowClient().get_metric_history(self.run_id, curve_metric("val/mean/accuracy"))}
        for row in history:
            if row["epoch"] not in logged:
                self._record_epoch(row, cosines, tasks)

    def flush(self) -> None:
        if self._retry_pending():
            return
        from mtl_core.tracking.store import StoreUnavailable

        epochs = sorted({w.removeprefix("epoch ") for w, _ in self._pending if w.startswith("epoch ")}, key=int)
        missing = f"epoch(s) {', '.join(epochs)} and " if epochs else ""
        raise StoreUnavailable(
            f"the MLflow tracking store {self._mlflow.get_tracking_uri()} failed during training ({self._failure}); "
            f"{missing}{len(self._pending)} record(s) of run {self.run_id} could not be logged. The training is "
            "kept in its checkpoint (checkpoints/): once the store answers, rerun the stage: it resumes this run "
            "and logs what is missing"
        )
