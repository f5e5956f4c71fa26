"""Networks: backbones and multi-task architectures."""

from mtl_core.models.architectures import ARCHITECTURES, MultiTaskModel, build_model
from mtl_core.models.backbones import BACKBONES, build_backbone

__all__ = ["ARCHITECTURES", "BACKBONES", "MultiTaskModel", "build_backbone", "build_model"]
