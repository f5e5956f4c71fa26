"""`mtl audit-labels`: a full audit of the training split's labels by k-fold cross-validation.

The evaluate stage looks for label problems on the validation and test splits only, where the model's
predictions are out-of-sample. The training split needs models that did not see each image: this
command (not a DVC stage: it trains k models) splits the training images into `folds` folds (seeded by
`train.seed`), trains the multi-task model of params.yaml on the other folds with the engine's own
`fit` (the project's validation split chooses each one's best epoch and temperatures), predicts the
held-out fold with calibrated probabilities, and runs confident learning (evaluation/label_issues.py)
on the out-of-sample predictions of every training image. Writes `reports/label_audit/<task>.csv`
(manifest row, path, given and suggested label, probabilities) with a thumbnail grid per task and
`reports/label_audit/summary.json`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from mtl_core.config import PipelineConfig
from mtl_core.data.dataset import CachedMultiTaskDataset
from mtl_core.evaluation.image_reports import calibrated_probabilities, label_issue_report
from mtl_core.inference import predict_loader
from mtl_core.models.io import load_model, temperatures
from mtl_core.paths import SPEC_FILE, WEIGHTS_FILE, ProjectPaths
from mtl_core.runtime import select_device
from mtl_core.tasks import MISSING_LABEL, TaskSpec
from mtl_core.training.engine import fit
from mtl_core.training.model_files import ModelFiles
from mtl_core.training.sink import LogSink
from mtl_core.transforms import eval_transform

log = logging.getLogger(__name__)


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each of `n` training images: a seeded permutation cut into equal parts."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) % folds
    return out


def _fold_project(paths: ProjectPaths, keep: np.ndarray, folder: Path) -> ProjectPaths:
    """A project folder whose training split is the training images `keep`, its other splits the
    project's own (linked, not copied)."""
    fold = ProjectPaths(folder)
    fold.preprocessed_dir.mkdir(parents=True)
    for cache in (paths.images_cache, paths.labels_cache, paths.weights_cache):
        np.save(fold.preprocessed_dir / cache("train").name, np.load(cache("train"), mmap_mode="r")[keep])
        for split in ("val", "test"):
            (fold.preprocessed_dir / cache(split).name).symlink_to(cache(split))
    (fold.preprocessed_dir / paths.tasks_file.name).symlink_to(paths.tasks_file)
    return fold


def run_audit_labels(cfg: PipelineConfig, root: Path, folds: int = 5) -> dict[str, Any]:
    if folds < 2:
        raise ValueError(f"--folds must be 2 or more (each image is predicted by a model trained on the others), got {folds}")
    paths = ProjectPaths(root)
    tasks = TaskSpec.load(paths.tasks_file)
    labels = np.load(paths.labels_cache("train"))
    images = np.load(paths.images_cache("train"), mmap_mode="r")
    which = fold_of(len(labels), folds, cfg.train.seed)
    probs = {t: np.zeros((len(labels), n), np.float64) for t, n in tasks.num_classes.items()}
    device = select_device(cfg.train.device)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"task_affinity_every": 0})})
    for f in range(folds):
        log.info("audit-labels: fold %d/%d: training on %d images, predicting %d", f + 1, folds, int((which != f).sum()), int((which == f).sum()))
        with tempfile.TemporaryDirectory(prefix="mtl-audit-") as tmp:
            fold = _fold_project(paths, np.flatnonzero(which != f), Path(tmp) / "project")
            files = ModelFiles.in_folder(Path(tmp) / "model")
            fit(cfg, fold, tasks, files, sink=LogSink())
            model, spec = load_model(files.weights.with_name(SPEC_FILE), files.weights.with_name(WEIGHTS_FILE), device)
            held_out = np.flatnonzero(which == f)
            preprocess = cfg.preprocess.model_copy(update={"mean": tuple(spec["mean"]), "std": tuple(spec["std"])})
            data = torch.utils.data.Subset(
                CachedMultiTaskDataset(paths.images_cache("train"), paths.labels_cache("train"), eval_transform(preprocess)), held_out.tolist()
            )  # fmt: skip
            p, _ = predict_loader(model, DataLoader(data, batch_size=cfg.train.batch_size), device, cfg.train.amp)
            for t, values in calibrated_probabilities(p, temperatures(spec)).items():
                probs[t][held_out] = values
    return _report(paths, tasks, labels, images, probs, cfg, folds)


def _report(
    paths: ProjectPaths, tasks: TaskSpec, labels: np.ndarray, images: np.ndarray, probs: dict[str, np.ndarray],
    cfg: PipelineConfig, folds: int,
) -> dict[str, Any]:  # fmt: skip
    out = paths.reports_dir / "label_audit"
    out.mkdir(parents=True, exist_ok=True)
    manifest = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
    rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    summary: dict[str, Any] = {"folds": folds, "train_images": int(len(labels)), "tasks": {}}
    for k, task in enumerate(tasks.names):
        split = [("train", probs[task], labels[:, k], images, rows)]
        summary["tasks"][task] = label_issue_report(
            task, split, tasks.classes[task], cfg.evaluate.label_issue_tiles, out / task, f"the training split, {folds}-fold cross-validation"
        )  # fmt: skip
        # how far to trust the suspects: a model that has not learned the task contradicts many right labels
        labelled = labels[:, k] != MISSING_LABEL
        hits = probs[task][labelled].argmax(1) == labels[labelled, k]
        summary["tasks"][task]["out_of_fold_accuracy"] = float(hits.mean()) if labelled.any() else None
        log.info(
            "audit-labels: %s: %d suspected label problems (out-of-fold accuracy %.3f)",
            task, summary["tasks"][task]["suspects"], hits.mean() if labelled.any() else float("nan"),
        )  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
