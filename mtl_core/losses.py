"""Per-task classification losses that tolerate missing labels.

A sample whose label for task t is MISSING_LABEL contributes no loss (and so exactly zero gradient) to
task t, and still trains every other task.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mtl_core.tasks import MISSING_LABEL


def masked_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled samples; 0 (still in the graph) when none is labelled."""
    labelled = targets != MISSING_LABEL
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled].float(), targets[labelled])


def task_losses(logits: dict[str, Tensor], targets: Tensor, task_names: list[str]) -> dict[str, Tensor]:
    """{task: loss} for stacked targets (N, K) in `task_names` order."""
    return {t: masked_cross_entropy(logits[t], targets[:, k]) for k, t in enumerate(task_names)}
