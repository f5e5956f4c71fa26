"""Torch Dataset over the preprocessed cache, with the Albumentations transform applied per sample."""

from __future__ import annotations

import random
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset


class CachedMultiTaskDataset(Dataset):
    """(image tensor, label vector, sample weight) triples from the memory-mapped `.npy` cache of one split.

    `weights` is the split's `{split}_weights.npy`; None gives every sample weight 1. The memory map is
    opened lazily in each DataLoader worker, so forked workers share the page cache rather than a copied
    array.
    """

    def __init__(
        self,
        images: Path,
        labels: Path,
        transform: A.Compose,
        weights: Path | None = None,
        label_columns: list[int] | None = None,
    ) -> None:
        self.images_path = images
        all_labels = np.load(labels)
        # a subset of the tasks (a single-task baseline trains on one column)
        self.labels = torch.from_numpy(np.ascontiguousarray(all_labels[:, label_columns] if label_columns is not None else all_labels))
        self.weights = (
            torch.from_numpy(np.load(weights).astype(np.float32, copy=False))
            if weights is not None
            else torch.ones(len(self.labels), dtype=torch.float32)
        )
        if len(self.weights) != len(self.labels):
            raise ValueError(f"{weights}: {len(self.weights)} sample weights for {len(self.labels)} labels")
        self.transform = transform
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`item`: an index, or (index, augmentation seed) from training.sampler.ResumableSampler, which
        makes the sample's augmentation a function of the seed alone (not of the worker, nor of the
        samples drawn before it), so a resumed run augments exactly as an uninterrupted one."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        image = np.array(self.images[i])  # a copy: a view of the read-only memory map must not become a tensor
        return self.transform(image=image)["image"], self.labels[i], self.weights[i]
