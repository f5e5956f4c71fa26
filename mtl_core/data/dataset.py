"""Torch Dataset over the preprocessed cache, with the Albumentations transform applied per sample."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset


class CachedMultiTaskDataset(Dataset):
    """(image tensor, label vector) pairs from the memory-mapped `.npy` cache of one split.

    The memory map is opened lazily in each DataLoader worker, so forked workers share the page cache
    rather than a copied array.
    """

    def __init__(self, images: Path, labels: Path, transform: A.Compose) -> None:
        self.images_path = images
        self.labels = torch.from_numpy(np.load(labels))
        self.transform = transform
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.ascontiguousarray(self.images[i])
        return self.transform(image=image)["image"], self.labels[i]
