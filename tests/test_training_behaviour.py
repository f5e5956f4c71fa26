"""Training does what it claims: it learns, it keeps the best epoch's weights, it clips and it skips an
unlabelled task. Each test fails for a specific way of breaking the loop (see the docstrings)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from mtl_core.config import load_config
from mtl_core.losses import TaskLoss
from mtl_core.models import build_model
from mtl_core.models.io import load_model
from mtl_core.paths import ProjectPaths
from mtl_core.tasks import MISSING_LABEL, TaskSpec
from mtl_core.tracking.store import setup_mlflow
from mtl_core.runtime import seed_everything
from mtl_core.training.engine import fit
from mtl_core.training.loaders import make_loaders
from mtl_core.training.loop import EpochPlan, StepSettings, train_one_epoch
from mtl_core.training.model_files import ModelFiles
from mtl_core.training.state import TrainingState
from mtl_core.training.validation import validate
from mtl_core.weighting import build_weighting

from conftest import write_params


def test_a_small_run_learns_the_easy_builtin_tasks(trained_project: Path) -> None:
    """240 images, small_cnn, 5 epochs: `color` (6 classes, chance 0.17) and `size` (3 classes, chance
    0.33) end far above chance on the test split, and the training loss falls. Fails when the optimizer
    never steps, the gradients never reach the weights, or the labels are scrambled."""
    metrics = json.loads(ProjectPaths(trained_project).test_metrics.read_text())["tasks"]
    assert metrics["color"]["accuracy"] >= 0.8, metrics["color"]
    assert metrics["size"]["accuracy"] >= 0.5, metrics["size"]
    history = pd.read_csv(ProjectPaths(trained_project).train_history)
    assert history["train/mean/loss"].iloc[-1] < 0.85 * history["train/mean/loss"].iloc[0]
    assert history["val/color/accuracy"].iloc[-1] >= 0.8


def flipped_validation_project(root: Path, n_train: int = 64, n_val: int = 32) -> tuple[ProjectPaths, TaskSpec]:
    """A cache where one task, `tone`, is the brightness of the image, and the validation labels are the
    opposite of the training ones: the more the model learns, the worse it scores on validation, so the
    best validation epoch is an early one by construction."""
    paths = ProjectPaths(root)
    paths.preprocessed_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n, flip in (("train", n_train, False), ("val", n_val, True)):
        tone = np.arange(n) % 2
        images = np.where(tone[:, None, None, None] == 1, 190, 60) + rng.integers(-30, 30, (n, 32, 32, 3))
        np.save(paths.images_cache(split), images.clip(0, 255).astype(np.uint8))
        np.save(paths.labels_cache(split), (1 - tone if flip else tone)[:, None].astype(np.int64))
        np.save(paths.weights_cache(split), np.ones(n, dtype=np.float32))
    tasks = TaskSpec({"tone": ["dark", "light"]})
    tasks.save(paths.tasks_file)
    return paths, tasks


def test_the_saved_weights_are_the_best_validation_epochs(tmp_path: Path) -> None:
    """`best_epoch` is the first epoch of the highest validation accuracy in the history, and the saved
    weights reproduce that epoch's validation loss and accuracy (not the last epoch's). Fails when the
    last epoch's weights are kept."""
    root = tmp_path / "project"
    root.mkdir()
    write_params(root, {"train": {"epochs": 4, "batch_size": 16, "task_affinity_every": 0}, "preprocess": {"augment": []}})
    cfg = load_config(root / "params.yaml")
    paths, tasks = flipped_validation_project(root)
    files = ModelFiles.in_folder(root / "model")
    with mlflow.start_run(experiment_id=setup_mlflow(cfg, root)):
        result = fit(cfg, paths, tasks, files)
    history = pd.read_csv(files.history)
    val_acc = history["val/mean/accuracy"].to_numpy()
    best = int(np.argmax(val_acc)) + 1  # argmax returns the first of equal maxima
    assert result.best_epoch == best == json.loads(files.summary.read_text())["best_epoch"]
    assert best < cfg.train.epochs, "by construction the last epoch is not the best"
    assert history["val/tone/loss"].iloc[best - 1] != pytest.approx(history["val/tone/loss"].iloc[-1], rel=1e-3)
    model, _ = load_model(files.spec, files.weights)
    val = validate(model, make_loaders(cfg, paths, seed_everything(0), torch.device("cpu"))["val"], torch.device("cpu"), amp=False)
    assert val["tone"]["accuracy"] == pytest.approx(val_acc[best - 1], abs=1e-9)
    assert val["tone"]["loss"] == pytest.approx(history["val/tone/loss"].iloc[best - 1], rel=1e-5)


def test_the_loop_clips_the_shared_gradient_and_gives_an_unlabelled_task_weight_zero(tiny_project: Path) -> None:
    """Two batches in which task `b` has no label: MGDA weighs `a` 1 and `b` 0 (its loss and accuracy are
    NaN, not 0), and with `train.grad_clip` the shared gradient of the last step has exactly that norm
    while the head's gradient is left alone."""
    write_params(tiny_project, {"train": {"grad_clip": 1e-3, "weighting": "mgda", "amp": False}})
    cfg = load_config(tiny_project / "params.yaml")
    torch.manual_seed(0)
    model = build_model("hard_sharing", {"a": 2, "b": 3}, "small_cnn")
    gen = torch.Generator().manual_seed(0)
    loader = []
    for _ in range(2):
        y = torch.stack([torch.randint(0, 2, (8,), generator=gen), torch.full((8,), MISSING_LABEL)], 1)
        loader.append((torch.randn(8, 3, 32, 32, generator=gen), y, torch.ones(8)))
    weighting = build_weighting("mgda", ["a", "b"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainingState(model, optimizer, scheduler, weighting)
    progress = train_one_epoch(state, TaskLoss(["a", "b"]), loader, StepSettings.from_config(cfg), torch.device("cpu"), EpochPlan(1))
    stats, weights = progress.stats.summary()
    assert (progress.images, progress.steps) == (16, 2)
    assert weights == {"a": pytest.approx(1.0), "b": 0.0}
    assert np.isnan(stats["b"]["loss"]) and np.isnan(stats["b"]["accuracy"])
    assert np.isfinite(stats["a"]["loss"])
    shared = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters() if p.grad is not None])
    assert float(shared.norm()) == pytest.approx(1e-3, rel=1e-3)
    head = torch.cat([g.reshape(-1) for g in model.heads["a"].gradients()])
    assert float(head.norm()) > 1e-2


def test_a_last_batch_of_one_sample_never_reaches_batchnorm(tmp_path: Path) -> None:
    """65 training images, batch 16: the epoch's last batch would be one sample, on which BatchNorm
    cannot train ("Expected more than 1 value per channel"). It is left out of that epoch (4 steps of
    16), the sample left out differs from epoch to epoch (the order is reshuffled), and training ends."""
    from mtl_core.training.sampler import ResumableSampler

    root = tmp_path / "project"
    root.mkdir()
    write_params(root, {"train": {"epochs": 2, "batch_size": 16, "task_affinity_every": 0}, "preprocess": {"augment": []}})
    cfg = load_config(root / "params.yaml")
    paths, tasks = flipped_validation_project(root, n_train=65)
    files = ModelFiles.in_folder(root / "model")
    with mlflow.start_run(experiment_id=setup_mlflow(cfg, root)):
        fit(cfg, paths, tasks, files)
    summary = json.loads(files.summary.read_text())
    assert summary["images_per_second"] * summary["train_seconds"] == pytest.approx(2 * 64)
    sampler = ResumableSampler(65, seed=0, batch_size=16)
    left_out = []
    for epoch in (1, 2, 3):
        sampler.set_epoch(epoch)
        seen = [i for i, _ in sampler]
        assert len(seen) == 64 and sampler.steps() == 4
        left_out.append(set(range(65)) - set(seen))
    assert len(set.union(*left_out)) > 1
    # a last batch of 2 is kept with one process, and split 1 + 1 over two, so then left out
    assert ResumableSampler(66, 0, batch_size=16).steps() == 5
    assert ResumableSampler(66, 0, batch_size=16, rank=1, world_size=2).steps() == 4
