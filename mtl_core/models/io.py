"""A trained model as files: its spec (JSON: how to rebuild the network from code) and its weights
(safetensors). `write_spec` writes the spec a training ends with; `load_model` rebuilds the network and
loads the weights. No pickle is ever unpickled here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mtl_core.models.architectures import MultiTaskModel, build_model
from mtl_core.models.grouped import TaskGroupedModel

SPEC_FORMAT = "mtl-pipeline/model-spec/1"


def model_spec(
    arch: str, arch_options: Mapping[str, Any], backbone: str, stem: str, pretrained: bool | str,
    tasks: Mapping[str, Sequence[str]], image_size: int, mean: Sequence[float], std: Sequence[float],
    task_groups: Sequence[Sequence[str]] | None = None, calibration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The spec of a trained network: `stem` resolved (`imagenet` or `small`, never `auto`, whose meaning
    may change); `pretrained` is provenance only (loading uses the trained weights); `tasks`: class
    names per task in label order; `task_groups`: one network per group (models.grouped); `calibration`:
    per-task temperatures (`temperatures`: the calibrated probabilities are softmax(logits / T)) and how they
    were fitted."""
    spec = {
        "format": SPEC_FORMAT,
        "arch": arch,
        "arch_options": dict(arch_options),
        "backbone": backbone,
        "stem": stem,
        "pretrained": pretrained,
        "tasks": {t: list(c) for t, c in tasks.items()},
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
    }
    if task_groups:
        spec["task_groups"] = [list(g) for g in task_groups]
    if calibration:
        spec["temperatures"] = {t: float(v) for t, v in calibration["temperatures"].items()}
        spec["calibration"] = {k: v for k, v in calibration.items() if k != "temperatures"}
    return spec


def temperatures(spec: Mapping[str, Any]) -> dict[str, float]:
    """The spec's per-task temperatures; 1.0 (the raw probabilities) for a spec written before calibration."""
    fitted = spec.get("temperatures") or {}
    return {t: float(fitted.get(t, 1.0)) for t in spec["tasks"]}


def write_spec(path: Path, spec: Mapping[str, Any]) -> None:
    Path(path).write_text(json.dumps(spec, indent=2) + "\n")


def read_spec(path: Path) -> dict[str, Any]:
    spec = json.loads(Path(path).read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{path}: not a model spec of format {SPEC_FORMAT!r} (got {spec.get('format')!r})")
    return spec


def load_model(spec_path: Path, weights_path: Path, device: torch.device | str = "cpu") -> tuple[MultiTaskModel, dict[str, Any]]:
    spec = read_spec(spec_path)
    num_classes = {t: len(c) for t, c in spec["tasks"].items()}
    # the trained weights replace any pretrained ones; the stem changes the network (older specs,
    # written before `model.stem` existed, were all trained with the ImageNet stem)
    def network(classes: dict[str, int]) -> MultiTaskModel:
        return build_model(
            spec["arch"], classes, spec["backbone"], pretrained=False, options=spec.get("arch_options"),
            stem=spec.get("stem", "imagenet"),
        )  # fmt: skip

    if spec.get("task_groups"):  # one network per group, used as one model
        members = [network({t: num_classes[t] for t in g}) for g in spec["task_groups"]]
        model: MultiTaskModel = TaskGroupedModel(members, list(num_classes))
    else:
        model = network(num_classes)
    try:
        model.load_state_dict(load_file(str(weights_path), device="cpu"))
    except RuntimeError as e:  # missing / unexpected / misshapen tensors: say which files disagree
        raise ValueError(f"{weights_path}: the weights do not fit the network of {spec_path}: {e}") from e
    return model.to(device).eval(), spec
