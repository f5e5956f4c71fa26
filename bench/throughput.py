"""Is training input-bound? Three figures per backbone, image size and DataLoader workers, in one run.

* input: images/s out of the DataLoader alone (preprocessed-cache Dataset, the Albumentations pipeline
  of params.yaml, uint8 batches collated and, on CUDA, pinned), no model;
* step: images/s of the train stage's own step loop (`training.loop.train_one_epoch`: layout,
  normalisation on the device, forward, the weighting method's backward, the finiteness checks, AdamW)
  on one uint8 batch already on the device, again and again;
* full: the two together, as the train stage's loop runs them;

and input / step: at 1.2 or more the input pipeline outruns the step and the device is not waiting for
data. Random uint8 images; a fixed number of timed steps after a warm-up; a Markdown table. Run on the
machine whose numbers you want to quote:

    python3 -m uv run python bench/throughput.py [--configs small_cnn@64 resnet18@64 resnet50@224] [--steps 20]

    python3 -m uv run python bench/throughput.py --nproc 1 2 --channels-last false true --compile false true

`--nproc N`: N processes (gloo on CPU, NCCL on CUDA, one GPU each), as `train.distributed.nproc_per_node`
starts them: each takes batch / N of every global batch, with its own DataLoader and workers, the step
runs through DistributedDataParallel, and the figures are images/s of all processes together (the
global batch over the slowest process's time). `--channels-last` and `--compile` are
`train.channels_last` and `train.compile` (`auto` resolves per device; the compiled step's timing starts
after its warm-up steps, so the compilation itself is not in it).

Ratios are only meaningful within one run (the numbers move with whatever else the machine is doing).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mtl_core import runtime
from mtl_core.config import load_config
from mtl_core.training.normalisation import resolve_normalisation
from mtl_core.data.dataset import CachedMultiTaskDataset
from mtl_core.losses import TaskLoss
from mtl_core.models import build_model
from mtl_core.runtime import memory_format, place_model, select_device
from mtl_core.training import ddp as ddp_runtime
from mtl_core.training.loop import EpochPlan, StepSettings, train_one_epoch
from mtl_core.training.state import TrainingState
from mtl_core.transforms import train_transform
from mtl_core.weighting import build_weighting

NUM_CLASSES = {"shape": 5, "color": 6, "size": 3, "position": 4}


def make_cache(folder: Path, n: int, size: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images, labels = folder / "images.npy", folder / "labels.npy"
    np.save(images, rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    np.save(labels, np.stack([rng.integers(0, c, n) for c in NUM_CLASSES.values()], 1))
    return images, labels


def loader_for(cache, cfg, batch: int, workers: int, device: torch.device, dist: runtime.Distributed) -> DataLoader:
    data = CachedMultiTaskDataset(*cache, train_transform(cfg.preprocess, normalize=False))  # uint8, as the train stage
    sampler = torch.utils.data.DistributedSampler(data, dist.world_size, dist.rank, seed=0) if dist.enabled else None
    return DataLoader(
        data, batch_size=batch, shuffle=sampler is None, sampler=sampler, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
    )  # fmt: skip


def batches(loader: DataLoader):
    while True:
        yield from loader


def timed(run, n_warmup: int, n_steps: int, device: torch.device, dist: runtime.Distributed = runtime.SINGLE) -> float:
    """Seconds of `run(n_steps)` after an untimed `run(n_warmup)`; with several processes, the slowest
    one's (they start together after a barrier)."""
    run(n_warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    run(n_steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = torch.tensor([time.perf_counter() - start], device=dist.device)
    if dist.enabled:
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    return float(seconds.item())


def trainer(backbone: str, weighting: str, cfg, device: torch.device, dist: runtime.Distributed):
    """`train(batches, n)`: n steps of the train stage's own step loop (training.loop.train_one_epoch:
    layout, normalisation on the device, forward through DDP with several processes, the method's
    backward, the finiteness checks, AdamW) on a model set up as `fit` sets it up."""
    torch.manual_seed(0)
    model = place_model(build_model("hard_sharing", NUM_CLASSES, backbone), device, cfg.train.channels_last, cfg.train.compile)
    method = build_weighting(weighting, list(NUM_CLASSES)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_fn = TaskLoss(list(NUM_CLASSES)).to(device)
    ddp = ddp_runtime.wrap(model, device, dist)
    state, settings = TrainingState(model, optimizer, constant, method), StepSettings.from_config(cfg)

    def train(batches, n: int) -> None:
        train_one_epoch(state, loss_fn, batches, settings, device, EpochPlan(1, steps=n), ddp=ddp)

    return train


def measure(backbone: str, workers: int, weighting: str, steps: int, batch: int, cache, cfg, device,
            dist: runtime.Distributed = runtime.SINGLE) -> dict[str, float]:  # fmt: skip
    """images/s of the input pipeline alone, the step alone, and both; with several processes, of all
    of them together (each takes batch / N of the global batch)."""
    warmup = 3
    local = batch // dist.world_size
    stream = batches(loader_for(cache, cfg, local, workers, device, dist))
    input_s = timed(lambda n: [next(stream) for _ in range(n)], warmup, steps, device, dist)
    train = trainer(backbone, weighting, cfg, device, dist)
    x0, y0, w0 = next(stream)
    on_device = (x0.to(device), y0, w0)  # the labels stay on the host, where the loop reads which are labelled
    step_s = timed(lambda n: train(itertools.repeat(on_device, n), n), warmup, steps, device, dist)
    full_s = timed(lambda n: train(itertools.islice(stream, n), n), warmup, steps, device, dist)
    images = steps * local * dist.world_size
    return {"input": images / input_s, "step": images / step_s, "full": images / full_s}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job: dict, results) -> None:
    """One of `world` processes, joined as torchrun's workers are (env:// rendezvous on 127.0.0.1)."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})  # fmt: skip
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist = runtime.init_distributed(job["cfg"].train.device)
    try:
        r = measure(**job, device=select_device(job["cfg"].train.device), dist=dist)
        if dist.is_main:
            results.put(r)
    finally:
        runtime.shutdown_distributed()


def measure_processes(nproc: int, **job) -> dict[str, float]:
    if nproc == 1:
        return measure(**job, device=select_device(job["cfg"].train.device))
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_rank_main, args=(nproc, _free_port(), job, results), nprocs=nproc, start_method="spawn")
    return results.get()


def _setting(value: str) -> bool | str:
    return {"true": True, "false": False}.get(value.lower(), value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small_cnn@64", "resnet18@64", "resnet50@224"],
                        help="backbone@image size")  # fmt: skip
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="DataLoader workers per process")
    parser.add_argument("--nproc", nargs="+", type=int, default=[1], help="processes (DDP), each with batch / N")
    parser.add_argument("--channels-last", nargs="+", default=["auto"], help="train.channels_last: auto, true, false")
    parser.add_argument("--compile", nargs="+", default=["false"], help="train.compile: false, true or a mode")
    parser.add_argument("--weighting", default="equal")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    base = resolve_normalisation(load_config(Path(__file__).resolve().parents[1] / "params.yaml"))  # mean/std: auto
    device = select_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, {os.cpu_count()} CPU threads, global batch "
          f"{args.batch_size}, weighting {args.weighting}, {args.steps} timed steps, "
          f"bf16: {base.train.amp and device.type == 'cuda'}, {time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    print("| backbone | image size | processes | DataLoader workers per process | channels_last | compile "
          "| input images/s | step images/s | full loop images/s | input ÷ step |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for config in args.configs:
        backbone, _, size = config.partition("@")
        size = int(size or base.preprocess.image_size)
        with tempfile.TemporaryDirectory() as tmp:
            cache = make_cache(Path(tmp), max(4 * args.batch_size, 512), size)
            for nproc in args.nproc:
                for workers in args.workers:
                    for layout in map(_setting, args.channels_last):
                        for compiled in map(_setting, args.compile):
                            train = {"device": args.device, "channels_last": layout, "compile": compiled}
                            cfg = base.model_copy(update={"train": base.train.model_copy(update=train)})
                            r = measure_processes(nproc, backbone=backbone, workers=workers, weighting=args.weighting,
                                                  steps=args.steps, batch=args.batch_size, cache=cache, cfg=cfg)  # fmt: skip
                            nhwc = memory_format(device, layout) == torch.channels_last
                            print(f"| {backbone} | {size} | {nproc} | {workers} | {'yes' if nhwc else 'no'} | {compiled} | "
                                  f"{r['input']:.0f} | {r['step']:.0f} | {r['full']:.0f} | {r['input'] / r['step']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
