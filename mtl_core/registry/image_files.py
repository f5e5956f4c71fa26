"""The image files `mtl predict` is given: checked before a model is loaded, decoded as ingest decodes
them (mtl_core.data.images: EXIF orientation applied, 16-bit and float images scaled by their range)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mtl_core.data.images import ImageError, decode, resize_rgb


class ImageReadError(ValueError):
    """An image file cannot be read or decoded; the message names the file."""


def check_images(images: Sequence[str | Path]) -> list[Path]:
    """Fail early, before loading a model, on a missing file or one that is not an image."""
    if not images:
        raise ValueError("no images given")
    paths = [Path(p) for p in images]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"image not found: {path}")
        if not path.is_file():
            raise ImageReadError(f"not an image file: {path} is a folder")
        try:
            with Image.open(path):  # reads the header only
                pass
        except UnidentifiedImageError:
            raise ImageReadError(f"cannot read image {path}: not an image format Pillow recognises") from None
        except (OSError, Image.DecompressionBombError) as err:
            raise ImageReadError(f"cannot read image {path}: {err}") from None
    return paths


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """uint8 RGB (H, W, 3) as ingest and preprocess decode it (EXIF orientation applied, 16-bit and float
    images scaled by their range: `mtl_core.data.images.decode`), resized to (size, size) when size is given."""
    try:
        pixels, _ = decode(Path(path))
    except ImageError as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from None
    return pixels if size is None else resize_rgb(pixels, size)
