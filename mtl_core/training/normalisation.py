"""`preprocess.mean: auto` / `std: auto` resolved for a training: the normalisation the backbone's
pretrained weights were trained with (models.backbones: timm's `pretrained_cfg`, torchvision's weights
transforms) when `model.pretrained` is set, else ImageNet's; and a warning when the images are far
smaller than the weights' native input size. `fit` resolves its configuration once; the trained model's
spec records the values, and evaluation, registration and serving read them from there.
"""

from __future__ import annotations

import logging

from mtl_core.config import PipelineConfig
from mtl_core.models.backbones import resolve_backbone
from mtl_core.models.backbones.registry import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

SMALL_FOR_WEIGHTS = 0.5
"""A warning when `preprocess.image_size` is below this share of the weights' native input size."""


def resolve_normalisation(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with `auto` mean and std replaced by numbers (unchanged where params.yaml gives numbers)."""
    p, m = cfg.preprocess, cfg.model
    pretrained = None
    if m.pretrained is not False:
        try:
            pretrained = resolve_backbone(m.backbone).pretrained_config()
        except (ImportError, ValueError) as err:  # a library that cannot say: the defaults, with a warning
            log.warning("model.pretrained: cannot read the pretrained config of %s (%s)", m.backbone, err)
        if pretrained is None and "auto" in (p.mean, p.std):
            log.warning(
                "preprocess.mean/std auto: %s has no pretrained config to take them from; using ImageNet's "
                "(set preprocess.mean and std in params.yaml to the ones its weights were trained with)", m.backbone,
            )  # fmt: skip
        if pretrained is not None and p.image_size < SMALL_FOR_WEIGHTS * pretrained.input_size:
            log.warning(
                "model.pretrained: %s's weights were trained on %d px images (%s); preprocess.image_size %d is far "
                "below, which wastes much of what they learned (a larger image size, or model.stem: small, helps)",
                m.backbone, pretrained.input_size, pretrained.source, p.image_size,
            )  # fmt: skip
    if "auto" not in (p.mean, p.std):
        return cfg
    mean = pretrained.mean if pretrained is not None else IMAGENET_MEAN
    std = pretrained.std if pretrained is not None else IMAGENET_STD
    if pretrained is not None:
        log.info("preprocess.mean/std auto: %s, %s (%s)", mean, std, pretrained.source)
    resolved = {"mean": mean if p.mean == "auto" else p.mean, "std": std if p.std == "auto" else p.std}
    return cfg.model_copy(update={"preprocess": p.model_copy(update=resolved)})
