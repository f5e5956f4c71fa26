"""Multi-task architectures (`model.arch`), one per file over one base class (`base.MultiTaskModel`):
hard sharing, MMoE, cross-stitch. Importing the package registers them all in `ARCHITECTURES`."""

# registered in this order (ARCHITECTURES lists them so)
from mtl_core.models.architectures import hard_sharing  # noqa: F401, I001
from mtl_core.models.architectures import mmoe  # noqa: F401
from mtl_core.models.architectures import cross_stitch  # noqa: F401
from mtl_core.models.architectures.base import (
    ARCHITECTURES,
    BACKBONE_ARGUMENTS,
    MultiTaskModel,
    build_model,
    register_architecture,
)
from mtl_core.models.architectures.cross_stitch import CrossStitch, CrossStitchUnit
from mtl_core.models.architectures.hard_sharing import HardSharing
from mtl_core.models.architectures.heads import HeadView, LinearHeads
from mtl_core.models.architectures.mmoe import MultiGateMixtureOfExperts

__all__ = [
    "ARCHITECTURES", "BACKBONE_ARGUMENTS", "CrossStitch", "CrossStitchUnit", "HardSharing", "HeadView", "LinearHeads",
    "MultiGateMixtureOfExperts", "MultiTaskModel", "build_model", "register_architecture",
]  # fmt: skip
