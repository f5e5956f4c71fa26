"""Temperature scaling of a trained model, fitted on the validation split when its training ends.

Per task, the temperature T that minimises the validation labels' negative log-likelihood under
softmax(logits / T) (mtl_core/calibration.py: Guo et al. 2017), on the best-on-validation weights and
the labelled validation images only. The temperatures go into the model spec (`temperatures`), where the
registered model, `mtl predict` and `mlflow models serve` read them to return calibrated probabilities
(the raw ones stay available). A task with no labelled validation image keeps T = 1.0, and the spec says
why (`calibration.unfitted`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtl_core.calibration import fit_temperature, nll
from mtl_core.inference import predict_loader
from mtl_core.tasks import MISSING_LABEL
from mtl_core.training.state import TrainingState

log = logging.getLogger(__name__)


def calibrate(state: TrainingState, val: DataLoader, device: torch.device, amp: bool) -> dict[str, Any]:
    """{"temperatures": {task: T}, "fitted_on": "val", "unfitted": {task: why}, "val_nll": {task: [before,
    after]}} for the best-on-validation weights of `state` (a copy of the model: the training's own is left
    with its last weights), over the whole validation split (one process)."""
    model = copy.deepcopy(state.model)
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    full = DataLoader(val.dataset, batch_size=val.batch_size, num_workers=0)  # every image, not a rank's shard
    logits, targets = predict_loader(model, full, device, amp, logits=True)
    out: dict[str, Any] = {"temperatures": {}, "fitted_on": "val", "unfitted": {}, "val_nll": {}}
    for k, task in enumerate(model.task_names):
        labelled = targets[:, k] != MISSING_LABEL
        if not labelled.any():
            out["temperatures"][task] = 1.0
            out["unfitted"][task] = "no labelled validation image"
            log.warning("calibration: task %s has no labelled validation image; temperature 1.0", task)
            continue
        z, y = logits[task][labelled], targets[labelled, k]
        t = fit_temperature(z, y)
        out["temperatures"][task] = t
        out["val_nll"][task] = [nll(z, y), nll(z, y, t)]
    log.info("calibration: temperatures %s (fitted on the validation split)", ", ".join(f"{k} {v:.3f}" for k, v in out["temperatures"].items()))
    return out
