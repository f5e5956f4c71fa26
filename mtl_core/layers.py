"""The layers of mtl_core, bottom to top: a module may import from its own layer and the layers below it,
never from a layer above (tests/test_layers.py holds every import to this, function-level and type-only
imports included, and fails on any import cycle). A module belongs to the layer of the longest prefix
listed here (`mtl_core` itself, the package's `__init__`, matches only itself); a module that no prefix
covers fails the test until it is given a layer.

The architecture page of the documentation (docs/architecture.md) draws these layers.
"""

from __future__ import annotations

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # what everything stands on: where files are, the tasks and their labels, the device and the
    # distributed context, fault injection for tests, file hashes, stopping on a signal, a retrain's result as
    # a git / DVC revision
    ("base", ("mtl_core", "mtl_core.paths", "mtl_core.tasks", "mtl_core.runtime", "mtl_core.faults", "mtl_core.hashing",
              "mtl_core.stopping", "mtl_core.revisions")),
    # the pluggable pieces and pure functions of plain values: networks, weighting methods, figures,
    # the built-in datasets, image decoding, probability calibration
    ("components", (
        "mtl_core.models", "mtl_core.weighting", "mtl_core.figures", "mtl_core.data.builtin", "mtl_core.data.images",
        "mtl_core.calibration",
    )),
    # params.yaml, validated (against the registries of the layer below)
    ("config", ("mtl_core.config", "mtl_core.config_names", "mtl_core.config_reference")),
    # data: the manifest's checks and split, the preprocessed cache, augmentation, the task losses
    ("data", ("mtl_core.data", "mtl_core.transforms", "mtl_core.losses")),
    # MLflow: the store, the runs and their tags, what the UI shows
    ("tracking", ("mtl_core.tracking",)),
    # the fitting engine and its mechanics; batched prediction, which validation uses too
    ("training", ("mtl_core.training", "mtl_core.inference")),
    # test-split scores, comparisons with the single-task models, task relations and groupings
    ("evaluation", ("mtl_core.evaluation",)),
    # the champion gate, the registered model, serving and `mtl predict`
    ("registry", ("mtl_core.registry",)),
    # the pipeline's stages, one module each
    ("stages", ("mtl_core.stages",)),
    # the shells over the stages: the dispatcher, the CLI, the Prefect flows; developer tools (the DVC plots page)
    ("shells", ("mtl_core.pipeline", "mtl_core.cli", "mtl_core.layers", "mtl_core.plots_page", "flows")),
)


def layer_of(module: str) -> int | None:
    """The index in LAYERS of `module`'s layer (the longest matching prefix), None if none matches."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "mtl_core" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]
