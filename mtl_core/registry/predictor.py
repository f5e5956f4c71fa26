"""Predictions for raw images from a trained model's spec and weights (no MLflow needed).

Used by the registered pyfunc (`pyfunc_model.py`, behind `mlflow models serve`) and by `mtl predict`.
It imports neither Albumentations nor pandas (pandas only for the pyfunc's DataFrame) nor the pipeline's
config: `mtl predict` runs in a shell loop, and those imports were a third of its time. The resize is the
training caches' own (`mtl_core.data.images.resize_rgb`, Pillow only); the normalisation is written out
here as a lookup table, equal to the bit to `eval_transform`'s Albumentations `Normalize` (tests/test_predict.py
holds them equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtl_core.data.images import resize_rgb
from mtl_core.inference import predict_probabilities
from mtl_core.models.io import load_model, temperatures

if TYPE_CHECKING:
    import pandas as pd

CHANNELS = 3


class ImageInputError(ValueError):
    """Images a model cannot take (type, dtype, value range, shape, channels); the message is one short line
    that names what was expected and what came, never the data."""


def _value_range(array: np.ndarray) -> str:
    return f"{array.min():.4g} to {array.max():.4g}" if array.size else "no values"


def _check_image_array(image: np.ndarray, where: str = "") -> np.ndarray:
    """One image (H, W, 3) or a batch (N, H, W, 3) of any integer dtype with values 0-255 -> uint8."""
    at = f" ({where})" if where else ""
    if image.dtype.kind == "f":
        hint = ": a float image in [0, 1]? send (image * 255).round() as uint8" if image.size and image.max() <= 1 else ""
        raise ImageInputError(
            f"expected uint8 pixel values 0-255, got {image.dtype} values {_value_range(image)}{at}{hint}"
        )
    if image.dtype.kind not in "iu":  # bool, complex, strings, objects (nested lists of unequal sizes)
        raise ImageInputError(f"expected uint8 pixel values 0-255, got dtype {image.dtype}{at}")
    if image.ndim not in (3, 4):
        raise ImageInputError(f"expected images of shape (N, H, W, 3) or one image (H, W, 3), got shape {image.shape}{at}")
    if image.shape[-1] != CHANNELS:
        raise ImageInputError(
            f"expected 3 channels (RGB) in the last axis, got {image.shape[-1]} (shape {image.shape}){at}: "
            "convert grayscale or RGBA images to RGB first"
        )
    if 0 in image.shape:
        raise ImageInputError(f"no pixels: shape {image.shape}{at}")
    if image.dtype != np.uint8:  # JSON integers arrive as int64
        low, high = image.min(), image.max()
        if low < 0 or high > 255:
            raise ImageInputError(f"expected uint8 pixel values 0-255, got {image.dtype} values {low} to {high}{at}")
        image = image.astype(np.uint8)
    return image


def as_image_batch(images: Any) -> list[np.ndarray]:
    """The images of a prediction request as uint8 RGB arrays (H, W, 3), any H and W, or ImageInputError.

    Takes a uint8 array (N, H, W, 3) or one image (H, W, 3), any integer array with values 0-255 (a JSON
    request arrives as int64), or a list of such images (sizes may differ). Refuses floats (a [0, 1] image
    cast to uint8 is black), values outside 0-255, other channel counts, empty batches."""
    if hasattr(images, "columns"):  # a pandas DataFrame
        raise ImageInputError("expected images as a uint8 array (N, H, W, 3), not a DataFrame")
    if isinstance(images, np.ndarray):
        batch = _check_image_array(images)
        out = list(batch) if batch.ndim == 4 else [batch]
    elif isinstance(images, list | tuple):
        out = []
        for i, image in enumerate(images):
            try:
                array = np.asarray(image)
            except ValueError:  # a ragged nested list
                raise ImageInputError(f"image {i}: not a rectangular array (H, W, 3)") from None
            if array.ndim != 3:
                raise ImageInputError(f"image {i}: expected one image of shape (H, W, 3), got shape {array.shape}")
            out.append(_check_image_array(array, f"image {i}"))
    else:
        raise ImageInputError(f"expected images as a uint8 array (N, H, W, 3), got {type(images).__name__}")
    if not out:
        raise ImageInputError("no images to predict")
    return out


def normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) float32: channel c, pixel value v -> (v - 255 mean_c) / (255 std_c), computed as
    Albumentations' `Normalize(max_pixel_value=255)` computes it for uint8 images (its lookup table)."""
    mean_px = np.array(mean, dtype=np.float32) * 255.0
    scale = np.reciprocal(np.array(std, dtype=np.float32) * 255.0)
    return (np.arange(256, dtype=np.float32) - mean_px.reshape(-1, 1)) * scale.reshape(-1, 1)


class MultiTaskPredictor:
    """Plain predictor over a model spec + weights; used by the pyfunc wrapper and by `mtl predict`."""

    def __init__(self, spec_path: Path, weights_path: Path, device: str = "cpu", raw: bool = False) -> None:
        """`raw`: the softmax of the logits as they are, not divided by the spec's per-task temperatures
        (the calibrated probabilities, the default; a spec without temperatures gives the raw ones)."""
        self.device = torch.device(device)
        self.model, self.spec = load_model(Path(spec_path), Path(weights_path), self.device)
        self.size = int(self.spec["image_size"])
        self._lut = normalize_lut(self.spec["mean"], self.spec["std"])
        self.temperatures = None if raw else temperatures(self.spec)

    def tensor(self, image: np.ndarray) -> torch.Tensor:
        """One uint8 RGB image (any size) -> the normalised (3, size, size) float32 tensor."""
        pixels = resize_rgb(image, self.size)
        return torch.from_numpy(np.stack([self._lut[c][pixels[..., c]] for c in range(CHANNELS)]))

    def probabilities(self, images: Any, raw: bool = False) -> dict[str, np.ndarray]:
        """Softmax probabilities (N, classes) per task, calibrated unless `raw` (here or at construction),
        for the images `as_image_batch` takes."""
        batch = torch.stack([self.tensor(im) for im in as_image_batch(images)])
        return predict_probabilities(self.model, batch, self.device, amp=False, temperatures=None if raw else self.temperatures)

    def predict_images(self, images: Any, raw: bool = False) -> pd.DataFrame:
        """The pyfunc's output: per task `<task>` (class), `<task>_probability`, `<task>_prob_<class>`."""
        import pandas as pd

        columns: dict[str, Any] = {}
        for task, p in self.probabilities(images, raw).items():
            classes = self.spec["tasks"][task]
            best = p.argmax(1)
            columns[task] = [classes[i] for i in best]
            columns[f"{task}_probability"] = p[np.arange(len(p)), best].astype(np.float64)
            for j, c in enumerate(classes):
                columns[f"{task}_prob_{c}"] = p[:, j].astype(np.float64)
        return pd.DataFrame(columns)
