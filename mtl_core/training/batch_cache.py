"""Augmented training batches recorded once and replayed: the input pipeline of the K single-task
baselines paid once, not K times (`compare.shared_input`).

Why this is exact: a training batch is a pure function of (data, `preprocess.augment`, `train.seed`,
`train.batch_size`, epoch, position): the sampler's order and each sample's augmentation seed depend on
nothing else (training/sampler.py). The K baselines share all of these and differ only in the label
column they train on. So the first baseline's training records each epoch's uint8 images, exactly as
its DataLoader produced them, and every later one replays them with its own labels, read from the cache
by the sampler's indices: each model sees the bytes a training of its own would have decoded and
augmented, and ends with the same weights (tests/test_baselines_compare.py checks it bit for bit).

An epoch is recorded only when a training traverses it from its first batch (a resumed, mid-epoch run
does not record its rest); it is written to a temporary file and renamed when its last batch is in, so a
kill leaves no partial recording that a later training would replay. The recordings live in the
stage's checkpoint folder and go with it when the stage finishes. One process only: under torchrun each
rank reads its own data (the cache is not used).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_core.data.disk import free_bytes, human_bytes
from mtl_core.training.sampler import ResumableSampler

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class BatchCache:
    """The recorded epochs of one training configuration, in `folder` (one `epoch-<e>.npy` each)."""

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.key = json.dumps(key, sort_keys=True)
        self.events: list[tuple[int, str]] = []  # (epoch, "replayed" | "recorded" | "read"), in order

    def _file(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch}.npy"

    def _meta(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch}.json"

    def recorded(self, epoch: int, samples: int) -> bool:
        """Whether epoch `epoch` is recorded, whole (`samples` images), for this configuration."""
        meta = self._meta(epoch)
        if not (meta.is_file() and self._file(epoch).is_file()):
            return False
        info = json.loads(meta.read_text())
        return info.get("key") == self.key and info.get("samples") == samples

    def loader(self, loader: Any, epoch: int, start: int, steps: int) -> Iterable[Batch]:
        """What the training of `epoch` iterates instead of `loader`: from sample position `start` to the
        end of the epoch's `steps` batches (all of them, from its start). The recording when there is
        one, else `loader` itself, recorded on the way when the epoch starts at its beginning and the
        disk has room."""
        sampler: ResumableSampler = loader.sampler
        epoch_indices = sampler.indices(epoch)[: steps * loader.batch_size]
        if self.recorded(epoch, len(epoch_indices)):
            self.events.append((epoch, "replayed"))
            return _Replay(self._file(epoch), loader, epoch_indices[start:], start)
        self.events.append((epoch, "read"))
        if start > 0 or not epoch_indices:
            return loader
        first = loader.dataset[(epoch_indices[0], 0)][0]  # the shape and dtype of one training image
        needed = len(epoch_indices) * first.numel() * first.element_size()
        self.folder.mkdir(parents=True, exist_ok=True)
        if needed > free_bytes(self.folder) * 0.9:
            log.warning(
                "baselines: not recording epoch %d's batches for the other tasks (%s needed, %s free in %s); "
                "each baseline reads its own", epoch, human_bytes(needed), human_bytes(free_bytes(self.folder)), self.folder,
            )  # fmt: skip
            return loader
        self.events[-1] = (epoch, "recorded")
        return _Recording(self, loader, epoch, len(epoch_indices), tuple(first.shape), first.dtype)

    def summary(self, since: int = 0) -> str:
        """How the epochs of the events from `since` on got their batches, e.g. `replayed` or `recorded`
        (or `replayed 1-2, read 3` when they differ): a tag of the baseline's MLflow run."""
        events = self.events[since:]
        kinds = list(dict.fromkeys(kind for _, kind in events))
        if len(kinds) == 1:
            return kinds[0]
        return ", ".join(f"{kind} {','.join(str(e) for e, k in events if k == kind)}" for kind in kinds)

    def remove(self) -> None:
        """Delete the recordings (the stage is done with them)."""
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


class _Recording:
    """Iterates the real loader and writes each batch's images at their positions; renames the file into
    place when the epoch's last batch is written (before that batch is trained on)."""

    def __init__(self, cache: BatchCache, loader: Any, epoch: int, samples: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.cache, self.loader, self.epoch, self.samples = cache, loader, epoch, samples
        self.shape, self.dtype = shape, dtype

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        final = self.cache._file(self.epoch)
        tmp = final.with_name(final.name + f".{os.getpid()}.tmp")
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=(self.samples, *self.shape))
        written = 0
        try:
            for x, y, w in self.loader:
                if written < self.samples:
                    n = min(len(x), self.samples - written)
                    out[written : written + n] = x[:n].numpy()
                    written += n
                    if written == self.samples:
                        out.flush()
                        del out
                        os.replace(tmp, final)
                        meta = {"key": self.cache.key, "samples": self.samples}
                        self.cache._meta(self.epoch).write_text(json.dumps(meta))
                yield x, y, w
        finally:
            if tmp.exists():
                tmp.unlink()


class _Replay:
    """The recorded images of an epoch from position `start`, in the loader's batches, with the labels and
    sample weights of the loader's dataset (this training's label columns) at the sampler's indices."""

    def __init__(self, file: Path, loader: Any, indices: list[int], start: int) -> None:
        self.file, self.indices, self.start = file, indices, start
        self.batch_size = loader.batch_size
        self.labels, self.weights = loader.dataset.labels, loader.dataset.weights

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        images = np.load(self.file, mmap_mode="r")
        for a in range(0, len(self.indices), self.batch_size):
            rows = torch.tensor(self.indices[a : a + self.batch_size])
            x = torch.from_numpy(np.array(images[self.start + a : self.start + a + len(rows)]))
            yield x, self.labels[rows], self.weights[rows]
