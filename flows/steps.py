"""Deployment steps of prefect.yaml (run by a worker's flow run before the flow is loaded)."""

from __future__ import annotations

import os
from pathlib import Path


def enter_project(directory: str = "") -> dict[str, str]:
    """Pull step: work in the project checkout on the worker's machine, `$MTL_PROJECT_DIR`.

    The flow runs where its data, DVC cache and MLflow store are, which may be another machine, or
    another path, than the one that ran `prefect deploy`; Prefect's own `set_working_directory` would
    only say `No such file or directory: ''` when the variable is not set.
    """
    if not directory:
        raise ValueError(
            "MTL_PROJECT_DIR is not set: start the worker with the path of its mtl-pipeline checkout, "
            "e.g. `MTL_PROJECT_DIR=$PWD prefect worker start --pool mtl-process`"
        )
    path = Path(directory).expanduser().resolve()
    if not (path / "dvc.yaml").is_file() or not (path / "flows" / "pipeline.py").is_file():
        raise ValueError(f"MTL_PROJECT_DIR={directory!r} is not an mtl-pipeline checkout (no dvc.yaml, flows/pipeline.py)")
    os.chdir(path)
    return {"directory": str(path)}
