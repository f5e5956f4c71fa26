"""DistributedDataParallel for the training stages, and what the ranks other than 0 run.

torchrun starts N processes (`train.distributed.nproc_per_node`, or by hand on M nodes); each joins the
process group (`runtime.init_distributed`) and runs the same training stage. Every rank trains on its
slice of each global batch (training.sampler) through a DDP-wrapped forward (`wrap`); only rank 0
opens MLflow runs and writes files; the other ranks run the stage's plan (training.workers). Here:
the DDP forward, SyncBatchNorm, and the global batch's loss denominators and loss values that every rank
computes the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mtl_core.losses import TaskLoss
from mtl_core.models import MultiTaskModel
from mtl_core.runtime import Distributed


class EncodeDecode(nn.Module):
    """The model's forward as the step loop needs it, (shared representation, logits per task), in one
    module call: DDP prepares its gradient reduction in its forward, so encode and decode go through it
    together."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.model.encode(x)
        return z, self.model.decode(z)


def prepare_model(model: MultiTaskModel, device: torch.device, sync_batchnorm: bool, dist: Distributed) -> MultiTaskModel:
    """On CUDA with several processes, BatchNorm over the global batch (SyncBatchNorm, when
    `sync_batchnorm`), so that N processes compute what one process with the whole batch would.
    PyTorch's SyncBatchNorm is CUDA-only: on CPU each process normalises its own slice (the gloo tests
    use a GroupNorm backbone to compare)."""
    if dist.enabled and device.type == "cuda" and sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap(model: MultiTaskModel, device: torch.device, dist: Distributed) -> DistributedDataParallel | None:
    """The DDP forward of `model` (None with one process). DDP registers the parameters that require a
    gradient when it is built, so `fit` builds it again when freezing changes that set."""
    if not dist.enabled:
        return None
    # buffers (BatchNorm running statistics) follow rank 0's at every forward, as the checkpoint does
    return DistributedDataParallel(EncodeDecode(model), device_ids=[device.index] if device.type == "cuda" else None)


def trainable_set(model: nn.Module) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in model.parameters())


class _GlobalValue(torch.autograd.Function):
    """Forward: the global batch's loss (bit-identical on every rank); backward: into this rank's loss."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, global_value: torch.Tensor) -> torch.Tensor:
        return global_value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def global_losses(losses: dict[str, torch.Tensor], dist: Distributed) -> dict[str, torch.Tensor]:
    """Under DDP, each task's loss with the global batch's value (the ranks' mean: each rank's loss is
    normalised by the global denominator / W) and this rank's gradient. A weighting method computes
    its weights from these values, identical on every rank, and the gradient of anything it builds
    from them is this rank's share of the global gradient, which DDP's mean completes. One all-reduce
    of K floats."""
    stacked = torch.stack([losses[t].detach().float() for t in losses])
    mean = dist.mean(stacked)
    return {t: _GlobalValue.apply(loss, mean[k].to(loss.dtype)) for k, (t, loss) in enumerate(losses.items())}


def global_batch(
    loss_fn: TaskLoss, y: torch.Tensor, w: torch.Tensor, labelled: torch.Tensor, dist: Distributed
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(each task's loss denominator for this rank: the global batch's / W, which tasks are labelled in
    the global batch): one all-reduce of 2K floats; (None, labelled) with one process."""
    if not dist.enabled:
        return None, labelled
    k = len(labelled)
    local = torch.cat([loss_fn.denominators(y, w), labelled.to(y.device, torch.float32)])
    total = dist.sum(local)
    return total[:k] / dist.world_size, total[k:].cpu() > 0
