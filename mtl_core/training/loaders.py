"""The training and validation loaders of one training, over the preprocessed cache."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from mtl_core.config import PipelineConfig
from mtl_core.data.dataset import CachedMultiTaskDataset
from mtl_core.paths import ProjectPaths
from mtl_core.runtime import Distributed
from mtl_core.training.normalisation import resolve_normalisation
from mtl_core.training.sampler import ResumableSampler, ShardSampler
from mtl_core.transforms import eval_transform, train_transform


def make_loaders(
    cfg: PipelineConfig,
    paths: ProjectPaths,
    generator: torch.Generator,
    device: torch.device,
    label_columns: list[int] | None = None,
    dist: Distributed | None = None,
) -> dict[str, DataLoader]:
    """Train and val loaders over the cache; `label_columns` selects a subset of the tasks. The training
    order and each sample's augmentation come from `train.seed` and the epoch alone (ResumableSampler),
    so they do not depend on the number of workers, and a resumed run sees the batches it would have.
    Distributed: this rank's share of every global batch (`train.batch_size` / world size) and of the
    validation set."""
    dist = dist or Distributed()
    if "auto" in (cfg.preprocess.mean, cfg.preprocess.std):  # fit has resolved them (and warned) already
        cfg = resolve_normalisation(cfg)
    workers = cfg.train.workers(int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
    common = dict(
        batch_size=cfg.train.batch_size // dist.world_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    train_data = CachedMultiTaskDataset(
        paths.images_cache("train"), paths.labels_cache("train"), train_transform(cfg.preprocess, normalize=False),
        paths.weights_cache("train"), label_columns,
    )  # fmt: skip
    loaders = {
        "train": DataLoader(
            train_data,
            sampler=ResumableSampler(
                len(train_data), cfg.train.seed, shuffle=True, batch_size=cfg.train.batch_size,
                rank=dist.rank, world_size=dist.world_size,
            ),  # fmt: skip
            drop_last=False,  # the sampler decides (a last batch of one sample never reaches BatchNorm)
            generator=generator,  # the workers' base seed comes from it, not from the global generator
            **common,
        ),
    }
    val_data = CachedMultiTaskDataset(
        paths.images_cache("val"), paths.labels_cache("val"), eval_transform(cfg.preprocess), None, label_columns
    )
    loaders["val"] = DataLoader(val_data, sampler=ShardSampler(len(val_data), dist.rank, dist.world_size), **common)
    return loaders
