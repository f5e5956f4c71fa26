"""The cost of resumable checkpoints: one atomic save (training/checkpoint.py) against one training step.

For each backbone: the time of a training step (forward, backward, AdamW step; batch and image size as
params.yaml's defaults, random images), the size of the checkpoint the train stage writes (model,
optimizer moments, best-so-far weights, RNGs, history), the time of `checkpoint.save` (write, fsync,
rename) and of loading it back, and the overhead of `train.checkpoint_every_steps: N` = save / (N x step).

    python3 -m uv run python bench/checkpoint.py [--backbones small_cnn resnet18] [--steps 10] [--out docs/...md]

Ratios are only meaningful within one run; the save time depends on the disk (here: the folder of --dir).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from mtl_core.losses import TaskLoss
from mtl_core.models import build_model
from mtl_core.training import checkpoint
from mtl_core.runtime import select_device
from mtl_core.weighting import StepContext, build_weighting

NUM_CLASSES = {"shape": 5, "color": 6, "size": 3, "position": 4}
EVERY = (1, 10, 100)


def state_of(model, optimizer, weighting) -> dict:
    """What fit() saves, at the size it has: the model twice (current and best), the optimizer's moments."""
    cpu = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "fingerprint": {"params": {}, "code": checkpoint.code_version()}, "run_id": "bench", "epoch": 1,
        "progress": None, "model": cpu, "optimizer": optimizer.state_dict(), "scheduler": {},
        "weighting": weighting.state_dict(), "tracker": None, "rng": checkpoint.rng_state(),
        "history": [{"epoch": 1, "val/mean/accuracy": 0.5}] * 20, "cosines": {}, "best": {"score": 0.5, "epoch": 1},
        "best_weights": cpu, "totals": {"images": 0, "seconds": 0.0, "skipped": 0},
    }  # fmt: skip


def measure(backbone: str, steps: int, batch: int, size: int, folder: Path, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model("hard_sharing", NUM_CLASSES, backbone).to(device).train()
    weighting = build_weighting("equal", list(NUM_CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = TaskLoss(list(NUM_CLASSES))
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.stack([torch.randint(0, c, (batch,)) for c in NUM_CLASSES.values()], 1).to(device)
    shared, private = model.shared_parameters(), {t: list(model.task_parameters(t)) for t in NUM_CLASSES}

    def step(i: int) -> None:
        z = model.encode(x)
        losses = loss_fn(model.decode(z), y, torch.ones(batch, device=device))
        optimizer.zero_grad(set_to_none=True)
        weighting.backward(losses, StepContext(shared_params=shared, task_params=private, shared_repr=z, step=i, epoch=1))
        optimizer.step()

    step(0)  # warm-up; the optimizer now has its moments
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps

    path = folder / backbone / "last.pt"
    saves, loads = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        checkpoint.save(path, state_of(model, optimizer, weighting))  # includes the copy to the CPU
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.load(path, map_location="cpu", weights_only=True)
        loads.append(time.perf_counter() - t0)
    save_s, load_s = sorted(saves)[1], sorted(loads)[1]  # medians of 3
    return {
        "backbone": backbone, "step_s": step_s, "mb": path.stat().st_size / 2**20, "save_s": save_s, "load_s": load_s,
        **{f"every_{n}": 100 * save_s / (n * step_s) for n in EVERY},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    device = select_device(args.device)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = [measure(b, args.steps, args.batch, args.size, Path(tmp), device) for b in args.backbones]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        f"Checkpoint cost on {device} ({where}), batch {args.batch}, {args.size} px, {time.strftime('%Y-%m-%d')}",
        "",
        "| backbone | step (s) | checkpoint (MiB) | save (s) | load (s) | "
        + " | ".join(f"overhead every {n} steps" for n in EVERY) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in EVERY) + " |",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['step_s']:.3f} | {r['mb']:.1f} | {r['save_s']:.3f} | {r['load_s']:.3f} | "
            + " | ".join(f"{r[f'every_{n}']:.1f} %" for n in EVERY) + " |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
