"""A trained model scored on the test split: per-task metrics, confusion matrices, probabilities.

What the evaluate stage reports for the multi-task model, and what the baselines and all_in_one stages
report for their models, computed the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from mtl_core.config import PipelineConfig
from mtl_core.data.dataset import CachedMultiTaskDataset
from mtl_core.evaluation.metrics import task_metrics
from mtl_core.inference import predict_loader
from mtl_core.models import MultiTaskModel
from mtl_core.models.io import load_model
from mtl_core.paths import SPEC_FILE, TEST_PREDICTIONS_FILE, WEIGHTS_FILE, ProjectPaths
from mtl_core.runtime import select_device
from mtl_core.tasks import MISSING_LABEL
from mtl_core.transforms import eval_transform


def make_test_loader(
    cfg: PipelineConfig, paths: ProjectPaths, label_columns: list[int] | None = None, spec: dict | None = None,
    split: str = "test",
) -> DataLoader:
    """The test split (or `split`; label columns `label_columns`), normalised as the model of `spec` was
    trained (its recorded mean and std; without a spec, params.yaml's, which must then be numbers)."""
    preprocess = cfg.preprocess
    if spec is not None:
        preprocess = preprocess.model_copy(update={"mean": tuple(spec["mean"]), "std": tuple(spec["std"])})
    dataset = CachedMultiTaskDataset(
        paths.images_cache(split), paths.labels_cache(split), eval_transform(preprocess), None, label_columns
    )
    return DataLoader(dataset, batch_size=cfg.train.batch_size, num_workers=0)


def score(model: MultiTaskModel, loader: DataLoader, device: torch.device, amp: bool):
    """Per-task metrics (with `support`, the labelled count), confusion matrices, probabilities, targets."""
    probs, targets = predict_loader(model, loader, device, amp)
    per_task: dict[str, dict[str, float]] = {}
    confusions: dict[str, np.ndarray] = {}
    for k, task in enumerate(model.task_names):
        values, confusions[task] = task_metrics(probs[task], targets[:, k])
        values["support"] = int((targets[:, k] != MISSING_LABEL).sum())
        per_task[task] = values
    return per_task, confusions, probs, targets


def write_test_predictions(path: Path, probs: dict[str, np.ndarray]) -> None:
    """The predicted class index of every test image, a column per task (paths.TEST_PREDICTIONS_FILE)."""
    pd.DataFrame({t: p.argmax(1) for t, p in probs.items()}).to_csv(path, index=False)


def read_test_predictions(path: Path, tasks: list[str]) -> np.ndarray:
    """(N, len(tasks)) predicted class indices from `write_test_predictions`'s file; a ValueError naming the
    file when it lacks a task."""
    frame = pd.read_csv(path)
    missing = [t for t in tasks if t not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no predictions for task(s) {', '.join(missing)}; rerun the stage that wrote it")
    return frame[tasks].to_numpy(dtype=np.int64)


def score_folder(cfg: PipelineConfig, paths: ProjectPaths, folder: Path, label_columns: list[int] | None = None) -> dict[str, dict[str, float]]:
    """Per-task test metrics of the model trained into `folder` (its best weights), on label columns
    `label_columns` of the test cache; its per-image predictions go to `folder`/test_predictions.csv."""
    device = select_device(cfg.train.device)
    model, spec = load_model(folder / SPEC_FILE, folder / WEIGHTS_FILE, device)
    per_task, _, probs, _ = score(model, make_test_loader(cfg, paths, label_columns, spec), device, cfg.train.amp)
    write_test_predictions(folder / TEST_PREDICTIONS_FILE, probs)
    return per_task
