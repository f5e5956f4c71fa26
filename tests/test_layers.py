"""The layers of mtl_core (mtl_core/layers.py) hold: no import from a lower layer to a higher one, no
import cycle, every module in a layer. Imports are read from the source (ast) of mtl_core and flows/:
top-level, function-level and type-only (`if TYPE_CHECKING:`) imports alike, since an import inside a
function still ties the two modules together and can hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mtl_core.layers import LAYERS, layer_of
from tests.source_imports import ROOT, all_modules, imports_of

@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    modules = all_modules()
    return {m: imports_of(p, m, modules) for m, p in modules.items()}


def test_every_module_has_a_layer(graph: dict[str, dict[str, int]]) -> None:
    missing = sorted(m for m in graph if layer_of(m) is None)
    assert not missing, f"modules in no layer of mtl_core/layers.py: {', '.join(missing)}"


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    names = [name for name, _ in LAYERS]
    found = []
    for module, imported in graph.items():
        for target, line in imported.items():
            low, high = layer_of(module), layer_of(target)
            if low is not None and high is not None and high > low:
                found.append(f"{module} (layer {names[low]}, line {line}) imports {target} (layer {names[high]})")
    return sorted(found)


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if state.get(start) is None and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_no_module_imports_from_a_higher_layer(graph: dict[str, dict[str, int]]) -> None:
    found = upward_imports(graph)
    assert not found, "imports from a lower layer to a higher one:\n" + "\n".join(found)


def test_there_is_no_import_cycle(graph: dict[str, dict[str, int]]) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    """The two checks on a graph made to fail: a cycle through a function-level import, as the train
    stage and the task groups once had, and a tracker in evaluation imported by the training loop."""
    cyclic = {"mtl_core.training.a": {"mtl_core.training.b": 1}, "mtl_core.training.b": {"mtl_core.training.a": 9}}
    assert find_cycle(cyclic) == ["mtl_core.training.a", "mtl_core.training.b", "mtl_core.training.a"]
    upward = {"mtl_core.training.loop": {"mtl_core.evaluation.task_relations": 20}}
    assert upward_imports(upward) == [
        "mtl_core.training.loop (layer training, line 20) imports mtl_core.evaluation.task_relations (layer evaluation)"
    ]


def test_function_level_imports_are_read(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from mtl_core.training import engine\n    import mtl_core.stages.train\n")
    modules = all_modules()
    assert imports_of(source, "x", modules) == {"mtl_core.training.engine": 2, "mtl_core.stages.train": 3}


MAX_TRAINING_FUNCTION_LINES = 80


def test_no_function_of_the_training_engine_is_longer_than_80_lines() -> None:
    """The engine stays readable as it grows: a function in mtl_core/training/ that passes 80 lines
    (decorators and docstring included) is split before it lands."""
    long = []
    for path in sorted((ROOT / "mtl_core" / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (n := node.end_lineno - start + 1) > MAX_TRAINING_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "functions over 80 lines: " + "; ".join(long)
