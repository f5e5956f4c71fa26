"""The stages, by name: the one implementation behind dvc.yaml, the CLI and the Prefect flow."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtl_core.config import PipelineConfig, load_config

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


TRAINING_STAGES = ("train", "baselines", "all_in_one")
"""The stages that checkpoint and resume after a kill; they take `fresh=True` to start over."""


def run_stage(name: str, params: str | Path = "params.yaml", root: str | Path = ".", fresh: bool = False) -> Any:
    root = Path(root).resolve()
    params = Path(params)
    cfg = load_config(params if params.is_absolute() else root / params)
    if fresh and name not in TRAINING_STAGES:
        raise ValueError(f"--fresh applies to the training stages ({', '.join(TRAINING_STAGES)}), not {name!r}")
    return stage_function(name)(cfg, root, fresh=True) if fresh else stage_function(name)(cfg, root)
