"""dvc.yaml's code deps, both ways: every mtl_core module a stage runs is a dependency of that stage, so
editing it makes `dvc repro` rerun the stage instead of calling a stale cached result up to date; and
no dependency is a module the stage does not run, so editing it does not rerun the stage for nothing.

The imports are read from the source (ast), directly and through other modules, function-level
imports included; importing `a.b.c` also runs the packages `a` and `a.b`. The closure starts at the
stage's function (mtl_core.pipeline.STAGES) and the dispatcher `mtl_core.pipeline`, and for a training
stage also at what a torchrun worker runs (mtl_core.pipeline.DISTRIBUTED_STAGE, imported by name); the
`mtl` CLI around it only parses arguments. It stops at `mtl_core.config_names`, which checks the
registry names of params.yaml at load: it can refuse a configuration, never change what a stage
computes (so editing a weighting method does not rerun ingest)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtl_core.pipeline import DISTRIBUTED_STAGE, STAGES, TRAINING_STAGES

from tests.source_imports import ROOT, all_modules, imports_of

MODULES = all_modules()
REFUSE_ONLY = {"mtl_core.config_names"}


def module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def stage_closure(stage: str) -> set[Path]:
    todo = [STAGES[stage].split(":")[0], "mtl_core.pipeline"]
    if stage in TRAINING_STAGES:
        todo.append(DISTRIBUTED_STAGE.split(":")[0])
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
        todo.extend(imports_of(module_file(module), module, MODULES))
    return {module_file(m).relative_to(ROOT) for m in seen - REFUSE_ONLY}


def covered(file: Path, deps: list[str]) -> bool:
    return any(file == Path(d) or Path(d) in file.parents for d in deps)


def code_deps(stage: str) -> list[str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
    return [d for d in deps if d.split("/")[0] == "mtl_core"]


def files_of(dep: str) -> list[Path]:
    """The Python files a dependency path stands for (a file, or every .py file under a folder)."""
    path = ROOT / dep
    return [path.relative_to(ROOT)] if path.is_file() else sorted(p.relative_to(ROOT) for p in path.rglob("*.py"))


def test_the_closure_follows_imports_through_other_modules() -> None:
    """Precondition: the train stage reaches transforms.py only through other modules' imports, and
    the torchrun worker's module only by name."""
    closure = stage_closure("train")
    assert Path("mtl_core/transforms.py") in closure and Path("mtl_core/weighting/pcgrad.py") in closure
    assert Path("mtl_core/__init__.py") in closure and Path("mtl_core/training/workers.py") in closure
    assert Path("mtl_core/cli.py") not in closure and Path("mtl_core/stages/register.py") not in closure
    assert not any(p.parts[1] == "weighting" for p in stage_closure("evaluate"))  # the tracker moved to training


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_stage_deps_cover_every_module_the_stage_imports(stage: str) -> None:
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"] == f"mtl {stage}"
    deps = code_deps(stage)
    missing = sorted(str(f) for f in stage_closure(stage) if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r} does not depend on: {', '.join(missing)}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_stage_deps_hold_nothing_the_stage_does_not_import(stage: str) -> None:
    """A dependency that the stage never runs would rerun it (and everything after it) for nothing."""
    closure = stage_closure(stage)
    extra = sorted(str(f) for dep in code_deps(stage) for f in files_of(dep) if f not in closure)
    assert not extra, f"dvc.yaml stage {stage!r} depends on modules it does not import: {', '.join(extra)}"
    assert all(files_of(dep) for dep in code_deps(stage)), f"dvc.yaml stage {stage!r}: a dependency that does not exist"
