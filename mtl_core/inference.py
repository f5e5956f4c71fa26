"""Batched prediction shared by validation, the evaluate stage and the registered model."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from mtl_core.models.architectures import MultiTaskModel
from mtl_core.runtime import autocast


@torch.no_grad()
def predict_logits(model: MultiTaskModel, images: torch.Tensor, device: torch.device, amp: bool = True) -> dict[str, torch.Tensor]:
    """Logits per task (float32, on the CPU) for a normalised batch (N, 3, H, W)."""
    model.eval()
    with autocast(device, amp):
        logits = model(images.to(device, non_blocking=True))
    return {t: v.float().cpu() for t, v in logits.items()}


@torch.no_grad()
def predict_probabilities(
    model: MultiTaskModel, images: torch.Tensor, device: torch.device, amp: bool = True,
    temperatures: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Softmax probabilities per task for a normalised batch (N, 3, H, W); with `temperatures`, of the
    logits divided by each task's temperature (the calibrated probabilities: mtl_core/calibration.py)."""
    temperatures = temperatures or {}
    return {
        t: torch.softmax(v / float(temperatures.get(t, 1.0)), dim=1).numpy()
        for t, v in predict_logits(model, images, device, amp).items()
    }


@torch.no_grad()
def predict_loader(
    model: MultiTaskModel, loader: DataLoader, device: torch.device, amp: bool = True, logits: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(probabilities per task (N, C_t) -- or the raw logits with `logits` --, targets (N, K)) over a
    whole loader of (images, labels, ...) batches.

    Anything after the labels in a batch (the sample weights of CachedMultiTaskDataset) is ignored.
    """
    probs: dict[str, list[np.ndarray]] = {t: [] for t in model.task_names}
    targets: list[np.ndarray] = []
    for images, labels, *_ in loader:
        out = predict_logits(model, images, device, amp) if logits else predict_probabilities(model, images, device, amp)
        for t, p in out.items():
            probs[t].append(np.asarray(p))
        targets.append(labels.numpy())
    empty = {t: np.zeros((0, n), np.float32) for t, n in model.num_classes.items()}
    return (
        {t: np.concatenate(v) if v else empty[t] for t, v in probs.items()},
        np.concatenate(targets) if targets else np.zeros((0, len(model.task_names)), np.int64),
    )
