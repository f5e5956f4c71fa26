"""Where a training reports what it does: one sink, chosen once, instead of rank checks through the engine.

* `MlflowSink`: the log lines and the active MLflow run (rank 0 of a stage);
* `LogSink`: the log lines only (benchmarks, unit tests: no MLflow run);
* `NullSink`: nothing (the other ranks of a distributed training, whose numbers rank 0 reports).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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
    task-gradient cosine matrix as a JSON artifact, the figures and reports as artifacts."""

    def __init__(self) -> None:
        import mlflow

        self._mlflow = mlflow
        self.run_id = mlflow.active_run().info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._mlflow.log_params(dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics(dict(metrics), step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._mlflow.set_tags(dict(tags))

    def log_artifact(self, path: Path, folder: str) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=folder)

    def log_epoch(self, row: Mapping[str, float], cosines: Mapping[int, list], tasks: Sequence[str], epochs: int) -> None:
        self._record_epoch(row, cosines, tasks)
        super().log_epoch(row, cosines, tasks, epochs)

    def _record_epoch(self, row: Mapping[str, float], cosines: Mapping[int, list], tasks: Sequence[str]) -> None:
        epoch = int(row["epoch"])
        self._mlflow.log_metrics({curve_metric(k): v for k, v in row.items() if k != "epoch" and np.isfinite(v)}, step=epoch)
        if epoch in cosines:
            self._mlflow.log_dict({"tasks": list(tasks), "epoch": epoch, "cosine": cosines[epoch]},
                                  f"task_relations/gradient_cosine_epoch_{epoch:03d}.json")  # fmt: skip

    def catch_up(self, history: Sequence[Mapping[str, float]], cosines: Mapping[int, list], tasks: Sequence[str]) -> None:
        """Log the epochs a resumed checkpoint holds but the run has not recorded (a kill between the
        checkpoint and the metrics), so the run has one value per epoch, none twice."""
        from mlflow.tracking import MlflowClient

        logged = {m.step for m in MlflowClient().get_metric_history(self.run_id, curve_metric("val/mean/accuracy"))}
        for row in history:
            if row["epoch"] not in logged:
                self._record_epoch(row, cosines, tasks)
