"""Training throughput (images/s) of the train stage's inner loop, per backbone and DataLoader workers.

Uses the real pieces (preprocessed-cache Dataset, Albumentations pipeline from params.yaml, the model
registry, a weighting method, AdamW) on random 64x64 images, times a fixed number of steps after a
warm-up, and prints a Markdown table. Run on the machine whose numbers you want to quote:

    python3 -m uv run python bench/throughput.py [--backbones resnet18 small_cnn] [--steps 20]

Ratios are only meaningful within one run (the numbers move with whatever else the machine is doing).
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
from mtl_core.transforms import train_transform
from mtl_core.weighting import StepContext, build_weighting

NUM_CLASSES = {"shape": 5, "color": 6, "size": 3, "position": 4}


def make_cache(folder: Path, n: int, size: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images, labels = folder / "images.npy", folder / "labels.npy"
    np.save(images, rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    np.save(labels, np.stack([rng.integers(0, c, n) for c in NUM_CLASSES.values()], 1))
    return images, labels


def measure(backbone: str, workers: int, weighting: str, steps: int, batch: int, cache, cfg, device) -> float:
    torch.manual_seed(0)
    model = build_model("hard_sharing", NUM_CLASSES, backbone).to(device).train()
    method = build_weighting(weighting, list(NUM_CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = CachedMultiTaskDataset(*cache, train_transform(cfg.preprocess))
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    shared, private = model.shared_parameters(), {t: list(model.task_parameters(t)) for t in NUM_CLASSES}
    seen, start, it = 0, None, iter(loader)
    warmup = 3
    for step in range(warmup + steps):
        try:
            x, y, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, y, _ = next(it)
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = x.to(device), y.to(device)
        with autocast(device, cfg.train.amp):
            z = model.encode(x)
            losses = task_losses(model.decode(z), y, list(NUM_CLASSES))
        opt.zero_grad(set_to_none=True)
        method.backward(losses, StepContext(shared, private, z, last_shared_layer=model.last_shared_layer()))
        opt.step()
        if step >= warmup:
            seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "small_cnn", "mobilenet_v3_small"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--weighting", default="equal")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    device = select_device(args.device)
    size = cfg.preprocess.image_size
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_cache(Path(tmp), max(4 * args.batch_size, 512), size)
        print(f"device: {device}, torch threads: {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
              f"{size}x{size} images, batch {args.batch_size}, weighting {args.weighting}, {args.steps} timed steps\n")
        print("| backbone | DataLoader workers | images/s |")
        print("| --- | --- | --- |")
        for backbone in args.backbones:
            for workers in args.workers:
                ips = measure(backbone, workers, args.weighting, args.steps, args.batch_size, cache, cfg, device)
                print(f"| {backbone} | {workers} | {ips:.1f} |", flush=True)


if __name__ == "__main__":
    main()
