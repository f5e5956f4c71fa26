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
from mtl_core.paths import ProjectPaths

log = logging.getLogger(__name__)

# stage -> "module:function"; imported on use so that `mtl ingest` does not pay for importing MLflow.
# In dependency order (the Prefect flow runs them in this order): register comes last, since it registers
# the solution that compare selects.
STAGES: dict[str, str] = {
    "ingest": "mtl_core.stages.ingest:run_ingest",
    "preprocess": "mtl_core.stages.preprocess:run_preprocess",
    "grouping": "mtl_core.stages.grouping:run_grouping",
    "train": "mtl_core.stages.train:run_train",
    "evaluate": "mtl_core.stages.evaluate:run_evaluate",
    "baselines": "mtl_core.stages.baselines:run_baselines",
    "all_in_one": "mtl_core.stages.all_in_one:run_all_in_one",
    "compare": "mtl_core.stages.compare:run_compare",
    "register": "mtl_core.stages.register:run_register",  # last: its description and card show compare's Δm
}


def stage_function(name: str) -> Callable[[PipelineConfig, Path], Any]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


LOGGING_STAGES = ("train", "evaluate", "register", "baselines", "all_in_one", "compare")
"""The stages that write to the MLflow tracking store: the CLI and the flow check the store before they
start one (tracking.store.check_store), so that a store that is down, locked or read-only fails the stage
at once, not after its work."""

TRAINING_STAGES = ("train", "baselines", "all_in_one")
"""The stages that checkpoint and resume after a kill (they take `fresh=True` to start over) and that
describe their fits as a plan: `plan(cfg, paths)` in the stage's module (training.plan)."""

DISTRIBUTED_STAGE = "mtl_core.training.workers:run_distributed_stage"
"""What a torchrun worker runs for a training stage."""


def stage_plan(name: str) -> Callable[[PipelineConfig, ProjectPaths], list[Any]]:
    """The `plan(cfg, paths)` of training stage `name`: the fits its stage function makes, in order."""
    return getattr(importlib.import_module(STAGES[name].split(":")[0]), "plan")


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
    return bool(stage_plan(name)(cfg, ProjectPaths(root)))


def _run_distributed(name: str, cfg: PipelineConfig, root: Path, fresh: bool) -> Any:
    """One torchrun worker (training.workers.run_distributed_stage: rank 0 runs the stage function, the
    other ranks its plan); imported by name, like the stages, so that only the training stages depend on
    the distributed runtime."""
    module, func = DISTRIBUTED_STAGE.split(":")
    return getattr(importlib.import_module(module), func)(cfg, root, fresh, stage_function(name), stage_plan(name))
