"""Validation after every epoch: per task, the mean negative log-likelihood and the accuracy."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from mtl_core.inference import predict_loader
from mtl_core.models import MultiTaskModel
from mtl_core.runtime import Distributed
from mtl_core.tasks import MISSING_LABEL


def validate(
    model: MultiTaskModel, loader: DataLoader, device: torch.device, amp: bool, dist: Distributed | None = None
) -> dict[str, dict[str, float]]:
    """Per task, the mean negative log-likelihood and the accuracy over the labelled validation samples;
    distributed, each rank scores its shard and the sums are reduced (every sample counted once)."""
    probs, targets = predict_loader(model, loader, device, amp)
    sums = np.zeros((3, len(model.task_names)))  # nll sum, correct, labelled count
    for k, t in enumerate(model.task_names):
        y = targets[:, k]
        labelled = y != MISSING_LABEL
        p = probs[t][labelled]
        sums[0, k] = -np.log(np.clip(p[np.arange(len(p)), y[labelled]], 1e-12, None)).sum()
        sums[1, k] = (probs[t].argmax(1)[labelled] == y[labelled]).sum()
        sums[2, k] = labelled.sum()
    if dist is not None and dist.enabled:
        sums = dist.sum(torch.from_numpy(sums)).numpy()
    out: dict[str, dict[str, float]] = {}
    for k, t in enumerate(model.task_names):
        n = sums[2, k]
        out[t] = {"loss": float(sums[0, k] / n) if n else float("nan"), "accuracy": float(sums[1, k] / n) if n else float("nan")}
    return out


def prefixed_metrics(prefix: str, per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {f"{prefix}/{t}/{m}": v for t, ms in per_task.items() for m, v in ms.items()}
    for m in ("loss", "accuracy"):
        out[f"{prefix}/mean/{m}"] = float(np.nanmean([ms[m] for ms in per_task.values()]))
    return out
