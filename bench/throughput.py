"""Is training input-bound? Three figures per backbone, image size and DataLoader workers, in one run.

* input: images/s out of the DataLoader alone (preprocessed-cache Dataset, the Albumentations pipeline
  of params.yaml, uint8 batches collated and, on CUDA, pinned), no model;
* step: images/s of the training step alone (normalisation on the device, forward, weighting
  backward, AdamW) on a uint8 batch already on the device;
* full: the two together, as the train stage's loop runs them;

and input / step: at 1.2 or more the input pipeline outruns the step and the device is not waiting for
data. Random uint8 images; a fixed number of timed steps after a warm-up; a Markdown table. Run on the
machine whose numbers you want to quote:

    python3 -m uv run python bench/throughput.py [--configs small_cnn@64 resnet18@64 resnet50@224] [--steps 20]

Ratios are only meaningful within one run (the numbers move with whatever else the machine is doing).
One process; N processes each run this loop on their share of the batch (README "Scaling out").
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mtl_core.config import load_config
from mtl_core.data.dataset import CachedMultiTaskDataset
from mtl_core.losses import task_losses
from mtl_core.models import build_model
from mtl_core.runtime import autocast, select_device
from mtl_core.transforms import normalize_on_device, train_transform
from mtl_core.weighting import StepContext, build_weighting

NUM_CLASSES = {"shape": 5, "color": 6, "size": 3, "position": 4}


def make_cache(folder: Path, n: int, size: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images, labels = folder / "images.npy", folder / "labels.npy"
    np.save(images, rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    np.save(labels, np.stack([rng.integers(0, c, n) for c in NUM_CLASSES.values()], 1))
    return images, labels


def loader_for(cache, cfg, batch: int, workers: int, device: torch.device) -> DataLoader:
    data = CachedMultiTaskDataset(*cache, train_transform(cfg.preprocess, normalize=False))  # uint8, as the train stage
    return DataLoader(
        data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
    )  # fmt: skip


def batches(loader: DataLoader):
    while True:
        yield from loader


def timed(n_warmup: int, n_steps: int, step, device: torch.device) -> float:
    """Seconds for `n_steps` calls of `step` after `n_warmup` untimed ones."""
    for _ in range(n_warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def trainer(backbone: str, weighting: str, cfg, device: torch.device):
    torch.manual_seed(0)
    model = build_model("hard_sharing", NUM_CLASSES, backbone).to(device).train()
    method = build_weighting(weighting, list(NUM_CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    shared, private = model.shared_parameters(), {t: list(model.task_parameters(t)) for t in NUM_CLASSES}

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = normalize_on_device(x, cfg.preprocess.mean, cfg.preprocess.std)  # as the step loop does
        with autocast(device, cfg.train.amp):
            z = model.encode(x)
            losses = task_losses(model.decode(z), y, list(NUM_CLASSES))
        opt.zero_grad(set_to_none=True)
        method.backward(losses, StepContext(shared, private, z, last_shared_layer=model.last_shared_layer()))
        opt.step()

    return train_step


def measure(backbone: str, workers: int, weighting: str, steps: int, batch: int, cache, cfg, device) -> dict[str, float]:
    """images/s of the input pipeline alone, the step alone, and both."""
    warmup = 3
    stream = batches(loader_for(cache, cfg, batch, workers, device))
    input_s = timed(warmup, steps, lambda: next(stream), device)
    train_step = trainer(backbone, weighting, cfg, device)
    x0, y0, _ = next(stream)
    x0, y0 = x0.to(device), y0.to(device)
    step_s = timed(warmup, steps, lambda: train_step(x0, y0), device)

    def full() -> None:
        x, y, _ = next(stream)
        train_step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))

    full_s = timed(warmup, steps, full, device)
    images = steps * batch
    return {"input": images / input_s, "step": images / step_s, "full": images / full_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small_cnn@64", "resnet18@64", "resnet50@224"],
                        help="backbone@image size")  # fmt: skip
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--weighting", default="equal")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    device = select_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch threads: {torch.get_num_threads()}, batch {args.batch_size}, "
          f"weighting {args.weighting}, {args.steps} timed steps, bf16: {cfg.train.amp and device.type == 'cuda'}\n")  # fmt: skip
    print("| backbone | image size | DataLoader workers | input images/s | step images/s | full loop images/s | input ÷ step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for config in args.configs:
        backbone, _, size = config.partition("@")
        size = int(size or cfg.preprocess.image_size)
        with tempfile.TemporaryDirectory() as tmp:
            cache = make_cache(Path(tmp), max(4 * args.batch_size, 512), size)
            for workers in args.workers:
                r = measure(backbone, workers, args.weighting, args.steps, args.batch_size, cache, cfg, device)
                print(f"| {backbone} | {size} | {workers} | {r['input']:.0f} | {r['step']:.0f} | {r['full']:.0f} | "
                      f"{r['input'] / r['step']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
