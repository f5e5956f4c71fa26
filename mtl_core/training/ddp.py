"""DistributedDataParallel for the training stages, and what the ranks other than 0 run.

torchrun starts N processes (`train.distributed.nproc_per_node`, or by hand on M nodes); each joins the
process group (`runtime.init_distributed`) and runs the same training stage. Every rank trains on its
slice of each global batch (training.sampler) through a DDP-wrapped forward (`wrap`); only rank 0
opens MLflow runs and writes files. The other ranks run `run_worker_stage`: the same `fit` calls as
rank 0's stage function, in the same order and with the same arguments, and nothing else. `fit` starts
with rank 0's resume state broadcast to all, so a resumed, restored or fresh model is the same on
every rank. Each training stage lists its `fit` calls in `stage_fits`, next to the stage function:
a rank that calls `fit` a different number of times waits forever in a collective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mtl_core.config import PipelineConfig
from mtl_core.models import MultiTaskModel
from mtl_core.paths import ProjectPaths
from mtl_core import runtime
from mtl_core.runtime import Distributed
from mtl_core.tasks import TaskSpec

log = logging.getLogger(__name__)


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


def prepare_model(model: MultiTaskModel, device: torch.device, cfg: PipelineConfig, dist: Distributed) -> MultiTaskModel:
    """On CUDA with several processes, BatchNorm over the global batch (SyncBatchNorm), so that N
    processes compute what one process with the whole batch would. PyTorch's SyncBatchNorm is CUDA-only:
    on CPU each process normalises its own slice (the gloo tests use a GroupNorm backbone to compare)."""
    if dist.enabled and device.type == "cuda" and cfg.train.distributed.sync_batchnorm:
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


FitCall = tuple[PipelineConfig, TaskSpec, "list[int] | None", bool]
"""(config, tasks, label columns, measures task affinities) of one `fit` a training stage makes."""


def fits_of_stage(stage: str, cfg: PipelineConfig, tasks: TaskSpec) -> list[FitCall]:
    """The `fit` calls of training stage `stage`, in order: its module's `stage_fits`, which sits next
    to the stage function it mirrors (imported by name, as mtl_core.pipeline imports the stages)."""
    import importlib

    from mtl_core.pipeline import STAGES

    module = STAGES[stage].split(":")[0]
    return importlib.import_module(module).stage_fits(cfg, tasks)


def stage_fit_calls(stage: str, cfg: PipelineConfig, root: Path) -> list[FitCall]:
    return fits_of_stage(stage, cfg, TaskSpec.load(ProjectPaths(root).tasks_file))


def run_worker_stage(stage: str, cfg: PipelineConfig, root: Path) -> None:
    """A rank other than 0: take part in every `fit` of the stage, write nothing."""
    from mtl_core.training.runs import Resume
    from mtl_core.training.train import ModelFiles, fit

    paths = ProjectPaths(root)
    for fit_cfg, fit_tasks, columns, measures in stage_fit_calls(stage, cfg, root):
        nowhere = Path("/nonexistent-rank-output")  # never written: fit writes on rank 0 only
        files = ModelFiles.in_folder(nowhere, nowhere / "last.pt")  # checkpoint steps are collectives too
        if measures:
            files = ModelFiles(**{**files.__dict__, "gradient_cosine": nowhere / "task_gradient_cosine.json"})
        fit(fit_cfg, paths, fit_tasks, files, label_columns=columns, resume=Resume({}))


def run_distributed_stage(name: str, cfg: PipelineConfig, root: Path, fresh: bool, stage: Callable[..., Any]) -> Any:
    """One torchrun worker: join the process group; rank 0 runs the stage, the others its `fit` calls."""
    dist = runtime.init_distributed(cfg.train.device, cfg.train.distributed.backend)
    try:
        if dist.is_main:
            return stage(cfg, root, fresh=True) if fresh else stage(cfg, root)
        return run_worker_stage(name, cfg, root)
    finally:
        runtime.shutdown_distributed()
