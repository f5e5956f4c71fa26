"""What the benchmarks share: `--set section.key=value` overrides of params.yaml (the value is YAML), and
a project folder with its data ingested and preprocessed."""

from __future__ import annotations

from pathlib import Path

import yaml


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """`params` (params.yaml as a dict) with each `section.key=value` set, sections created as needed."""
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return params


def prepared_project(workdir: Path, params: dict) -> Path:
    """`workdir` (resolved) with `params` as its params.yaml and the built-in data ingested and
    preprocessed, unless an earlier run there already did."""
    from mtl_core.pipeline import run_stage

    workdir = workdir.resolve()
    (workdir / "data" / "datasets").mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (workdir / "data" / "preprocessed" / "tasks.json").is_file():
        for stage in ("ingest", "preprocess"):
            run_stage(stage, root=workdir)
    return workdir
