"""The optimizer, its learning-rate schedule and backbone freezing of one training."""

from __future__ import annotations

import logging

import torch

from mtl_core.config import TrainConfig
from mtl_core.models import MultiTaskModel
from mtl_core.weighting import GradientBalancing, LossWeighting
from mtl_core.weighting.gradnorm import GradNorm

log = logging.getLogger(__name__)

ONE_CYCLE_WARMUP = 0.15
"""The share of the steps in which OneCycleLR warms the learning rate up to its peak."""


def build_optimizer(model: MultiTaskModel, weighting: LossWeighting, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over three parameter groups, in this order: the model's new layers (heads, gates, experts,
    stitches: lr), its backbone (`model.backbone_parameters()`: lr x backbone_lr_scale, so pretrained
    features are fine-tuned gently) and the weighting method's own parameters (lr, no weight decay).
    Group 0 keeps the base lr, which the training history logs as `lr`."""
    backbone = model.backbone_parameters()
    in_backbone = {id(p) for p in backbone}
    groups = [
        {"name": "model", "params": [p for p in model.parameters() if id(p) not in in_backbone], "lr": cfg.lr},
        {"name": "backbone", "params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale},
        {"name": "weighting", "params": list(weighting.parameters()), "lr": cfg.lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def freeze_backbone(model: MultiTaskModel, epoch: int, cfg: TrainConfig) -> bool:
    """Freeze the backbone (requires_grad False) in epochs 1..freeze_backbone_epochs, unfreeze it after;
    return whether it is frozen in `epoch`. Frozen parameters get no gradient, so AdamW leaves them
    (and their weight decay) alone and the weighting methods skip them (weighting.gradients.trainable);
    BatchNorm running statistics still follow the data (the model trains in train mode)."""
    frozen = epoch <= cfg.freeze_backbone_epochs
    params = model.backbone_parameters()
    if any(p.requires_grad == frozen for p in params):
        log.info("epoch %d: backbone %s", epoch, "frozen (new layers only)" if frozen else "trainable")
    for p in params:
        p.requires_grad_(not frozen)
    return frozen


def check_freezable(model: MultiTaskModel, weighting: LossWeighting, arch: str, cfg: TrainConfig) -> None:
    """Fail before training where a frozen backbone leaves nothing shared to train (hard sharing) and
    the weighting method needs gradients on shared parameters or on the representation (the gradient-
    balancing methods, GradNorm): they would have nothing to balance."""
    if cfg.freeze_backbone_epochs == 0 or not isinstance(weighting, GradientBalancing | GradNorm):
        return
    in_backbone = {id(p) for p in model.backbone_parameters()}
    if not any(id(p) not in in_backbone for p in model.shared_parameters()):
        raise ValueError(
            f"train.freeze_backbone_epochs: {cfg.freeze_backbone_epochs} leaves model.arch {arch!r} "
            f"nothing shared to train, and train.weighting {cfg.weighting!r} balances the gradients of "
            "shared parameters; use a loss-weighting method (equal, fixed, uncertainty, dwa, rlw, famo) or "
            "freeze_backbone_epochs: 0"
        )


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One cycle over the whole training (`total_steps`, at least 1), one peak per parameter group at
    its own learning rate (the backbone's scaled by `train.backbone_lr_scale`)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(1, total_steps), pct_start=ONE_CYCLE_WARMUP,
    )  # fmt: skip


def check_weighting(model: MultiTaskModel, weighting: LossWeighting, arch: str, cfg: TrainConfig) -> None:
    """Point a gradient-balancing method at the model (`on: auto`) and fail before training where the
    method cannot work on this model: `on: representation` with task-specific parameters inside the
    encoder, or a frozen backbone that leaves nothing shared to balance (`check_freezable`)."""
    if isinstance(weighting, GradientBalancing):
        weighting.for_model(model.exact_representation_gradients)  # on: auto
    if isinstance(weighting, GradientBalancing) and weighting.on == "representation" and not model.exact_representation_gradients:
        raise ValueError(
            f"train.weighting_options.on: representation gives wrong gradients with model.arch "
            f"{arch!r} (task-specific parameters inside the encoder); use on: params"
        )
    check_freezable(model, weighting, arch, cfg)
