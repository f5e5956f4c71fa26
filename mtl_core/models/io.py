"""Save-free loading of a trained model: rebuild the network from code, then load safetensors weights.

No pickle is ever unpickled here: the spec is JSON and the weights are safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mtl_core.models.architectures import MultiTaskModel, build_model

SPEC_FORMAT = "mtl-pipeline/model-spec/1"


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
        from mtl_core.models.grouped import TaskGroupedModel

        members = [network({t: num_classes[t] for t in g}) for g in spec["task_groups"]]
        model: MultiTaskModel = TaskGroupedModel(members, list(num_classes))
    else:
        model = network(num_classes)
    try:
        model.load_state_dict(load_file(str(weights_path), device="cpu"))
    except RuntimeError as e:  # missing / unexpected / misshapen tensors: say which files disagree
        raise ValueError(f"{weights_path}: the weights do not fit the network of {spec_path}: {e}") from e
    return model.to(device).eval(), spec
