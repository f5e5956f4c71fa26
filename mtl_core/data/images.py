"""Decode an image file the way it is meant to be seen, into uint8 RGB: the one decoder of ingest and
preprocess, so what ingest accepted is exactly what preprocess caches.

Why not `Image.open(p).convert("RGB")`: that ignores the EXIF orientation (phone photos come out
sideways) and clips 16-bit and float pixels at 255 (a 16-bit scan becomes an all-white image).

* EXIF orientation (tag 0x0112, values 2-8) is applied, as a viewer would.
* 8-bit modes (1, L, P, RGB, RGBA, LA, CMYK, YCbCr, ...) go through Pillow's conversion to RGB (alpha
  is dropped, as before).
* 16-bit and 32-bit integer (I;16*, I) and float (F) images are scaled to 0..255 by their real range,
  the smallest and largest pixel value: v -> round(255 (v - min) / (max - min)). An image that cannot
  be scaled faithfully is refused with the reason: a single value in every pixel (no range), or a NaN
  or infinite pixel.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ORIENTATION_TAG = 0x0112
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I", "F"})
"""Modes with more than 8 bits per pixel, scaled by their range instead of clipped."""


class ImageError(ValueError):
    """The file is not an image this pipeline can read faithfully; the message is the reason."""


@dataclass(frozen=True)
class ImageInfo:
    mode: str  # the file's mode, before conversion
    width: int  # as displayed (after the EXIF orientation)
    height: int
    orientation: int  # the EXIF orientation applied (1: none)
    value_range: tuple[float, float] | None  # (min, max) a high-depth image was scaled from


def _scale_to_8bit(im: Image.Image) -> tuple[np.ndarray, tuple[float, float]]:
    """A high-depth single-channel image -> (uint8 (H, W), (min, max)), or ImageError."""
    values = np.asarray(im)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise ImageError(f"cannot scale to 8 bits: {im.mode} image with {bad} NaN or infinite pixel(s)")
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        raise ImageError(
            f"cannot scale to 8 bits: {im.mode} image with the single value {lo:g} in every pixel (no range)"
        )
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8), (lo, hi)


def decode(source: Path | bytes) -> tuple[np.ndarray, ImageInfo]:
    """A file (path or its bytes) -> (uint8 RGB array (H, W, 3), how it was read); ImageError if it cannot be."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()
            mode = im.mode
            orientation = int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
            if 2 <= orientation <= 8:
                im = ImageOps.exif_transpose(im)
            else:
                orientation = 1
            value_range = None
            if mode in HIGH_DEPTH_MODES:
                gray, value_range = _scale_to_8bit(im)
                rgb = np.repeat(gray[..., None], 3, axis=2)
            else:
                rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("image does not decode: not an image format Pillow recognises") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # what Pillow raises on bad files
        raise ImageError(f"image does not decode: {type(err).__name__}: {err}") from None
    height, width = rgb.shape[:2]
    return rgb, ImageInfo(mode, width, height, orientation, value_range)


def read_rgb(path: Path) -> np.ndarray:
    """The file's pixels as uint8 RGB (H, W, 3), as `decode` reads them."""
    return decode(Path(path))[0]


def resize_rgb(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Any image -> uint8 RGB array (size, size, 3): Pillow's antialiased bilinear. The one resize of the
    training caches (preprocess) and of prediction (`registry/predictor.py`), so both see the same pixels."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
