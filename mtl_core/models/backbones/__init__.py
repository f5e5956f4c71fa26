"""Backbones (`model.backbone`): image classifiers with their classification layer removed, by name
(`registry`), with the small stem for small images (`stems`) and pretrained weights from the library or
a local file (`weights`). `build_backbone` puts the three together.

`model.pretrained`: false (random init, the default: nothing is downloaded), true (the library
downloads its default weights, so it needs the internet), or the path of a local weights file
(`weights.load_pretrained_file`), so that an offline GPU node can start from pretrained weights too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from mtl_core.models.backbones.registry import BACKBONE_SOURCES, BACKBONES, Backbone, resolve_backbone
from mtl_core.models.backbones.small_cnn import SmallConvNet
from mtl_core.models.backbones.stems import (
    SMALL_STEM_MAX_SIZE,
    SMALL_STEMS,
    STEMS,
    apply_small_stem,
    is_instance_of,
    resolve_stem,
    small_stem_for,
)
from mtl_core.models.backbones.weights import WEIGHT_READERS, load_pretrained_file, under_prefixes, read_weights_file

__all__ = [
    "BACKBONES", "BACKBONE_SOURCES", "Backbone", "SMALL_STEMS", "SMALL_STEM_MAX_SIZE", "STEMS", "SmallConvNet",
    "WEIGHT_READERS", "apply_small_stem", "build_backbone", "is_instance_of", "load_pretrained_file",
    "read_weights_file", "resolve_backbone", "resolve_stem", "small_stem_for",
]  # fmt: skip

log = logging.getLogger(__name__)


def build_backbone(
    name: str, pretrained: bool | str | Path = False, stem: str = "imagenet"
) -> tuple[nn.Module, int]:
    """(feature extractor, feature dimension) of backbone `name`.

    `pretrained`: False (random init), True (the library downloads its weights) or the path of a local
    weights file (`load_pretrained_file`; resolve relative paths first, see ModelConfig.pretrained_weights).
    `stem`: `imagenet` (the network as published) or `small` (`apply_small_stem`); resolve `auto` first
    with `resolve_stem`."""
    if stem not in ("imagenet", "small"):
        raise ValueError(f"stem must be 'imagenet' or 'small' here, got {stem!r} (resolve_stem resolves 'auto')")
    net, dim = resolve_backbone(name).build(pretrained is True)
    replaced = apply_small_stem(net, name) if stem == "small" else ()
    if replaced and pretrained is True and any(under_prefixes(k, replaced) for k in net.state_dict()):
        log.warning("backbone %s: model.stem small replaced %s, which start from random init", name, ", ".join(replaced))
    if isinstance(pretrained, str | Path):
        load_pretrained_file(net, Path(pretrained), name, replaced)
    return net, dim
