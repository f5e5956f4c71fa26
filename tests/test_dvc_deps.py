"""dvc.yaml's code deps: every mtl_core module a stage runs is a dependency of that stage, so editing
it makes `dvc repro` rerun the stage instead of calling a stale cached result up to date.

The imports are read from the source (ast), directly and through other modules, function-level
imports included; importing `a.b.c` also runs the packages `a` and `a.b`. The closure starts at the
stage's function (mtl_core.pipeline.STAGES) and the dispatcher `mtl_core.pipeline`; the `mtl` CLI
around it only parses arguments. It stops at `mtl_core.config_names`, which checks the registry names
of params.yaml at load: it can refuse a configuration, never change what a stage computes (so editing
a weighting method does not rerun ingest)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from mtl_core.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
REFUSE_ONLY = {"mtl_core.config_names"}


def module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(file: Path, module: str) -> set[str]:
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule, if it is one
    return {m for m in found if m.split(".")[0] == "mtl_core" and module_file(m) is not None}


def stage_closure(stage: str) -> set[Path]:
    todo = [STAGES[stage].split(":")[0], "mtl_core.pipeline"]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module in REFUSE_ONLY:
            continue
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        todo.extend(imported_modules(module_file(module), module))
    return {module_file(m).relative_to(ROOT) for m in seen - REFUSE_ONLY}


def covered(file: Path, deps: list[str]) -> bool:
    return any(file == Path(d) or Path(d) in file.parents for d in deps)


def test_the_closure_follows_imports_through_other_modules() -> None:
    """Precondition: the train stage reaches transforms.py only through other modules' imports."""
    closure = stage_closure("train")
    assert Path("mtl_core/transforms.py") in closure and Path("mtl_core/weighting/pcgrad.py") in closure
    assert Path("mtl_core/__init__.py") in closure
    assert Path("mtl_core/cli.py") not in closure and Path("mtl_core/registry/register.py") not in closure


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_stage_deps_cover_every_module_the_stage_imports(stage: str) -> None:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    assert spec["cmd"] == f"mtl {stage}"
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
    missing = sorted(str(f) for f in stage_closure(stage) if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r} does not depend on: {', '.join(missing)}"
