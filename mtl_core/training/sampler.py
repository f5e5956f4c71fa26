"""The training order and the augmentation randomness as pure functions of (seed, epoch, position).

A resumed run must see exactly the batches the uninterrupted run would have seen, augmented exactly the
same way, whatever the number of DataLoader workers and wherever it was stopped. So nothing here keeps a
running random state: the permutation of epoch e comes from a generator seeded with (seed, e), and every
sample carries its own augmentation seed, derived from (seed, e, index), to the dataset
(`CachedMultiTaskDataset` reseeds the Albumentations pipeline per sample). Resuming at step s of epoch e
is `set_epoch(e, start=s * batch_size)`: the same permutation, from position start on.

Distributed: the order is global, `batch_size` is the global batch, and rank r of W takes positions
r, r + W, r + 2W, ... of it (DistributedSampler's interleaving), in batches of batch_size / W. So the
ranks' j-th batches together are exactly the j-th batch a single process would train on, whatever W.
The last, partial batch of an epoch is kept only when every rank gets at least 2 of its samples
(BatchNorm cannot train on one sample, and all ranks must take the same number of steps); otherwise
its samples (fewer than 2W) wait for the next epoch's order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch` (a 32-bit int, as Albumentations takes)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def usable(remaining: int, batch_size: int, world_size: int = 1) -> int:
    """How many of the `remaining` positions of an epoch are trained on: the full global batches, and the
    partial last one when it gives every rank at least 2 samples."""
    last = remaining % batch_size
    return remaining - last + (last if last >= 2 * world_size else 0)


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields (index, augmentation seed) pairs: a seeded permutation per epoch (or the identity, without
    shuffle), from position `start`, this rank's share of it. Each `__iter__` consumes the epoch set by
    `set_epoch` and moves on to the next one, so a loader iterated twice without `set_epoch` still gets
    two different epochs. `batch_size`: the global batch (None: every sample, no batch rule)."""

    def __init__(
        self, n: int, seed: int, shuffle: bool = True, batch_size: int | None = None, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size is not None and batch_size % world_size:
            raise ValueError(
                f"train.batch_size {batch_size} is the global batch: it must divide by the {world_size} processes"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.epoch, self.start = 1, 0

    def _used(self, start: int) -> int:
        return usable(self.n - start, self.batch_size, self.world_size) if self.batch_size else self.n - start

    def steps(self, start: int = 0) -> int:
        """Global batches (optimizer steps) from position `start` to the end of an epoch."""
        used = self._used(start)
        return -(-used // self.batch_size) if self.batch_size else 1

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
        """The samples this rank yields in the current epoch."""
        return max(0, -(-(self._used(self.start) - self.rank) // self.world_size))

    def indices(self, epoch: int, start: int = 0) -> list[int]:
        """The sample indices this rank yields in `epoch` from position `start`, in order (no state change)."""
        positions = self.order(epoch)[start : start + self._used(start)]
        return positions[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0
        for i in self.indices(epoch, start):
            yield i, sample_seed(self.seed, epoch, i)


class ShardSampler(Sampler[int]):
    """Rank r of W evaluates samples r, r + W, ...: every sample exactly once over the ranks (no padding,
    unlike DistributedSampler's, which would count some samples twice in the reduced metrics)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))
