"""The training order and the augmentation randomness as pure functions of (seed, epoch, position).

A resumed run must see exactly the batches the uninterrupted run would have seen, augmented exactly the
same way, whatever the number of DataLoader workers and wherever it was stopped. So nothing here keeps a
running random state: the permutation of epoch e comes from a generator seeded with (seed, e), and every
sample carries its own augmentation seed, derived from (seed, e, index), to the dataset
(`CachedMultiTaskDataset` reseeds the Albumentations pipeline per sample). Resuming at step s of epoch e
is `set_epoch(e, start=s * batch_size)`: the same permutation, from position start on. It is also what a
DistributedSampler needs: each rank can take its slice of the same global order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch` (a 32-bit int, as Albumentations takes)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields (index, augmentation seed) pairs: a seeded permutation per epoch (or the identity, without
    shuffle), from position `start`. Each `__iter__` consumes the epoch set by `set_epoch` and moves on to
    the next one, so a loader iterated twice without `set_epoch` still gets two different epochs."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.n:
            raise ValueError(f"start {start} outside 0..{self.n}")
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        return torch.randperm(self.n, generator=generator)

    def __len__(self) -> int:
        return self.n - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0
        for i in self.order(epoch)[start:].tolist():
            yield i, sample_seed(self.seed, epoch, i)
