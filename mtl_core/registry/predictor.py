"""Predictions for raw images from a trained model's spec and weights (no MLflow needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mtl_core.config import PreprocessConfig
from mtl_core.inference import predict_probabilities
from mtl_core.models.io import load_model
from mtl_core.transforms import eval_transform, resize_rgb


class MultiTaskPredictor:
    """Plain predictor over a model spec + weights; used by the pyfunc wrapper and by `mtl predict`."""

    def __init__(self, spec_path: Path, weights_path: Path, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model, self.spec = load_model(Path(spec_path), Path(weights_path), self.device)
        pre = PreprocessConfig(image_size=self.spec["image_size"], mean=self.spec["mean"], std=self.spec["std"])
        self.size = pre.image_size
        self.transform = eval_transform(pre)

    def predict_images(self, images: np.ndarray | list[np.ndarray]) -> pd.DataFrame:
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[None]
        if len(images) == 0:
            raise ValueError("no images to predict")
        batch = torch.stack(
            [self.transform(image=resize_rgb(np.asarray(im, dtype=np.uint8), self.size))["image"] for im in images]
        )
        probs = predict_probabilities(self.model, batch, self.device, amp=False)
        columns: dict[str, Any] = {}
        for task, p in probs.items():
            classes = self.spec["tasks"][task]
            best = p.argmax(1)
            columns[task] = [classes[i] for i in best]
            columns[f"{task}_probability"] = p[np.arange(len(p)), best].astype(np.float64)
            for j, c in enumerate(classes):
                columns[f"{task}_prob_{c}"] = p[:, j].astype(np.float64)
        return pd.DataFrame(columns)
