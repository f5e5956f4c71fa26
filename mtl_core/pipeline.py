"""The stages, by name: the one implementation behind dvc.yaml, the CLI and the Prefect flow."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtl_core.config import PipelineConfig, load_config

log = logging.getLogger(__name__)

# stage -> "module:function"; imported on use so that `mtl ingest` does not pay for importing MLflow.
STAGES: dict[str, str] = {
    "ingest": "mtl_core.data.ingest:run_ingest",
    "preprocess": "mtl_core.data.preprocess:run_preprocess",
    "train": "mtl_core.training.train:run_train",
    "evaluate": "mtl_core.evaluation.evaluate:run_evaluate",
    "register": "mtl_core.registry.register:run_register",
    "baselines": "mtl_core.training.baselines:run_baselines",
    "all_in_one": "mtl_core.training.all_in_one:run_all_in_one",
    "compare": "mtl_core.evaluation.compare:run_compare",
}


def stage_function(name: str) -> Callable[[PipelineConfig, Path], Any]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


DISTRIBUTED_STAGE = "mtl_core.training.ddp:run_distributed_stage"
"""What a torchrun worker runs for a training stage."""

TRAINING_STAGES = ("train", "baselines", "all_in_one")
"""The stages that checkpoint and resume after a kill; they take `fresh=True` to start over."""


def run_stage(name: str, params: str | Path = "params.yaml", root: str | Path = ".", fresh: bool = False) -> Any:
    root = Path(root).resolve()
    params = Path(params)
    cfg = load_config(params if params.is_absolute() else root / params)
    if fresh and name not in TRAINING_STAGES:
        raise ValueError(f"--fresh applies to the training stages ({', '.join(TRAINING_STAGES)}), not {name!r}")
    if name in TRAINING_STAGES:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun worker
            return _run_distributed(name, cfg, root, fresh)
        if cfg.train.distributed.nproc_per_node > 1 and _trains_anything(name, cfg, root):
            return launch_torchrun(name, params if params.is_absolute() else root / params, root, fresh, cfg.train.distributed.nproc_per_node)
    return stage_function(name)(cfg, root, fresh=True) if fresh else stage_function(name)(cfg, root)


def launch_torchrun(name: str, params: Path, root: Path, fresh: bool, nproc: int) -> None:
    """Run training stage `name` in `nproc` processes on this machine through PyTorch's own launcher
    (`torchrun --standalone`: rendezvous on a free local port), each process this same command; its
    exit status is the stage's. For several machines, start torchrun by hand (README "Scaling out")."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "mtl_core.cli", name, "--params", str(params), "--root", str(root), *(["--fresh"] if fresh else []),
    ]  # fmt: skip
    log.info("%s: starting %d processes: %s", name, nproc, " ".join(command[1:]))
    code = subprocess.run(command, cwd=root).returncode
    if code != 0:
        raise RuntimeError(f"{name}: torchrun with {nproc} processes exited with status {code} (see the log above)")


def _trains_anything(name: str, cfg: PipelineConfig, root: Path) -> bool:
    """Whether the stage fits a model at all (a disabled baselines stage starts no processes)."""
    module, _ = DISTRIBUTED_STAGE.split(":")
    return bool(importlib.import_module(module).stage_fit_calls(name, cfg, root))


def _run_distributed(name: str, cfg: PipelineConfig, root: Path, fresh: bool) -> Any:
    """One torchrun worker (training.ddp.run_distributed_stage); imported by name, like the stages, so
    that only the training stages depend on the distributed runtime."""
    module, func = DISTRIBUTED_STAGE.split(":")
    return getattr(importlib.import_module(module), func)(name, cfg, root, fresh, stage_function(name))
