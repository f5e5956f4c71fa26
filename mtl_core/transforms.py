"""Image transforms: Albumentations pipelines (the resize shared by preprocessing and serving is `data.images.resize_rgb`).

The training augmentation is declared in params.yaml (`preprocess.augment`, a list of Albumentations
transform names with their arguments) and applied on the fly in the DataLoader workers; evaluation and
serving use only the deterministic part (resize, normalise), so there is no train/serve skew.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import

from collections.abc import Sequence  # noqa: E402

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from mtl_core.config import AugmentStep, PreprocessConfig  # noqa: E402
from mtl_core.data.images import resize_rgb  # noqa: E402,F401  (re-exported: the caches' resize)


class TransformConfigError(ValueError):
    """An augmentation step in params.yaml names an unknown transform or bad arguments."""


def _build_step(index: int, step: AugmentStep) -> A.BasicTransform:
    cls = getattr(A, step.name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise TransformConfigError(
            f"params.yaml preprocess.augment[{index}]: unknown Albumentations transform {step.name!r}"
        )
    try:
        with warnings.catch_warnings():
            # Albumentations only warns about unknown arguments and then ignores them: refuse instead.
            warnings.filterwarnings("error", message=".*are not valid for transform", category=UserWarning)
            return cls(**step.kwargs)
    except Exception as err:  # albumentations validates arguments with pydantic / plain TypeErrors
        raise TransformConfigError(
            f"params.yaml preprocess.augment[{index}] ({step.name}): invalid arguments {step.kwargs}: {err}"
        ) from None


def _normalize(cfg: PreprocessConfig) -> list[A.BasicTransform]:
    return [A.Normalize(mean=cfg.mean, std=cfg.std, max_pixel_value=255.0), ToTensorV2()]


def train_transform(cfg: PreprocessConfig, normalize: bool = True) -> A.Compose:
    """The augmentation of params.yaml, then normalisation; `normalize=False` stops at a uint8 CHW
    tensor, which the train loop normalises on the device (`normalize_on_device`): a quarter of the
    bytes through the DataLoader's workers, pinned memory and the host-to-device copy."""
    steps: Sequence[A.BasicTransform] = [_build_step(i, s) for i, s in enumerate(cfg.augment)]
    return A.Compose([*steps, *(_normalize(cfg) if normalize else [ToTensorV2()])])


def normalize_on_device(x: "torch.Tensor", mean: Sequence[float], std: Sequence[float]) -> "torch.Tensor":
    """uint8 (N, 3, H, W) on the device -> float32 (x / 255 - mean) / std, as A.Normalize computes it."""
    import torch

    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def eval_transform(cfg: PreprocessConfig) -> A.Compose:
    return A.Compose(_normalize(cfg))
