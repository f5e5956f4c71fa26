"""Everything a checkpoint holds, in one object: `TrainingState`.

The model, optimizer, learning-rate schedule, weighting method and gradient tracker, the history of the
epochs trained, the best-on-validation epoch and its weights, the running totals, how far the current
epoch has come and the global random generators: `state_dict()` gives all of it (tensors, numbers,
strings and lists: what `torch.load(weights_only=True)` reads back) and `load_state_dict()` restores all
of it, so that checkpointing (training.checkpoint) reads and writes this object only. Modelled on
PyTorch Lightning's checkpoint connector and accelerate's `save_state`, without either dependency.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mtl_core.models import MultiTaskModel
from mtl_core.training.gradient_cosine import GradientCosineTracker
from mtl_core.training.lookahead_affinity import LookaheadAffinityTracker
from mtl_core.training.progress import EpochProgress
from mtl_core.weighting import LossWeighting


def rng_state() -> dict[str, Any]:
    """Every global random generator the training loop may draw from (dropout, methods without their own)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.asarray(np_state["state"]["key"], dtype=np.uint64), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict on the CPU (the best weights, a checkpoint's model)."""
    return {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class TrainingState:
    model: MultiTaskModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    weighting: LossWeighting
    tracker: GradientCosineTracker | None = None
    lookahead: LookaheadAffinityTracker | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    """One row per finished epoch: its training and validation metrics (the training history)."""
    cosines: dict[int, list[list[float]]] = field(default_factory=dict)
    """Per epoch, the mean task-gradient cosine matrix (epochs in which the tracker measured)."""
    lookaheads: dict[int, list[list[float]]] = field(default_factory=dict)
    """Per epoch, the mean lookahead affinity matrix (epochs in which `lookahead` measured)."""
    best_score: float = -math.inf
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    """The best-on-validation epoch's weights (on the CPU; rank 0 only under DDP)."""
    totals: dict[str, Any] = field(default_factory=lambda: {"images": 0, "seconds": 0.0, "skipped": 0})
    epoch: int = 0
    """The last epoch finished, or the one in progress when `progress` is set."""
    progress: dict[str, Any] | None = None
    """The unfinished epoch's `EpochProgress.state_dict()` (a checkpoint taken mid-epoch), else None."""

    @property
    def start_epoch(self) -> int:
        """The epoch training continues with."""
        return self.epoch if self.progress is not None else self.epoch + 1

    def record_best(self, score: float, epoch: int, keep_weights: bool) -> bool:
        """Whether `score` beats the best so far; if so it becomes the best, with a copy of the weights
        when `keep_weights` (rank 0: the ranks' models are the same, one copy is written)."""
        if not score > self.best_score:
            return False
        self.best_score, self.best_epoch = score, epoch
        self.best_weights = cpu_state(self.model) if keep_weights else None
        return True

    def state_dict(self, epoch: int, progress: EpochProgress | None = None) -> dict[str, Any]:
        """The whole state after `epoch` (or inside it: `progress`), with the global RNG states now."""
        return {
            "epoch": epoch, "progress": progress.state_dict() if progress is not None else None,
            "model": cpu_state(self.model), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "weighting": self.weighting.state_dict(), "tracker": self.tracker.state_dict() if self.tracker is not None else None,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "lookaheads": {str(e): m for e, m in self.lookaheads.items()},
            "rng": rng_state(), "history": self.history, "cosines": {str(e): m for e, m in self.cosines.items()},
            "best": {"score": self.best_score, "epoch": self.best_epoch}, "best_weights": self.best_weights, "totals": self.totals,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (a checkpoint of the same configuration: training.checkpoint checks),
        the global random generators included."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.weighting.load_state_dict(state["weighting"])
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])
        if self.lookahead is not None and state.get("lookahead") is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        self.lookaheads = {int(e): m for e, m in state.get("lookaheads", {}).items()}
        restore_rng(state["rng"])
        self.history, self.totals = list(state["history"]), dict(state["totals"])
        self.cosines = {int(e): m for e, m in state["cosines"].items()}
        self.best_score, self.best_epoch = state["best"]["score"], state["best"]["epoch"]
        self.best_weights = state["best_weights"]
        self.epoch, self.progress = state["epoch"], state["progress"]
