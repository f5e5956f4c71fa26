"""Does a training step cost more with more tasks? Step time at K = 4, 10, 40 tasks per weighting method.

One step is what the train stage's loop does (`training.loop.train_one_epoch`, run here on a list of
random batches): normalisation, forward, the per-task losses, the weighting method's backward, the
optimizer step (and FAMO's extra forward), the epoch statistics. Hard sharing on `small_cnn`, batch
64, 64 px, random uint8 images and 2-class labels (5 % missing), one process. The configurations run
interleaved (every repeat runs each configuration for a few steps, in turn), so a slow spell of a
shared machine hits them all alike; a configuration's figure is the median of its step times. Each
time is also a ratio to equal weighting at K = 4 of the same run:

    .venv/bin/python bench/task_scaling.py [--tasks 4 10 40] [--repeats 5] [--steps 3]

Ratios are meaningful within one run only (the numbers move with whatever else the machine does).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mtl_core.training.loop import EpochPlan, StepSettings, train_one_epoch
from mtl_core.training.state import TrainingState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

METHODS: dict[str, tuple[str, dict]] = {
    "equal": ("equal", {}),
    "famo": ("famo", {}),
    "pcgrad (on: params)": ("pcgrad", {"on": "params"}),
    "pcgrad (on: representation)": ("pcgrad", {"on": "representation"}),
}
"""Row label -> (train.weighting, train.weighting_options); `on` is set explicitly, so the large-K
default (`on: auto`) does not change what a row measures."""
REFERENCE = ("equal", 4)


def batches(num_tasks: int, n: int, batch: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 2, (batch, num_tasks), generator=g)
        y[torch.rand(batch, num_tasks, generator=g) < 0.05] = -1  # MISSING_LABEL
        out.append((x, y, torch.ones(batch)))
    return out


class Trainer:
    """One configuration: a model, method, optimizer and scheduler kept across repeats."""

    def __init__(self, method: str, num_tasks: int, cfg, backbone: str, batch: int, size: int) -> None:
        from mtl_core.losses import TaskLoss
        from mtl_core.models import build_model
        from mtl_core.training.optim import build_optimizer
        from mtl_core.weighting import build_weighting

        name, options = METHODS[method]
        tasks = {f"t{k:02d}": 2 for k in range(num_tasks)}
        torch.manual_seed(0)
        self.cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"weighting": name, "weighting_options": options})})
        self.model = build_model("hard_sharing", tasks, backbone)
        self.weighting = build_weighting(name, list(tasks), options)
        self.loss_fn = TaskLoss(list(tasks))
        self.optimizer = build_optimizer(self.model, self.weighting, self.cfg.train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.data = batches(num_tasks, 4, batch, size)
        self.step = 0

    @property
    def slow(self) -> bool:
        """K backward passes through the whole network per step (a gradient method on the parameters)."""
        return self.cfg.train.weighting_options.get("on") == "params"

    def run(self, steps: int) -> list[float]:
        """Seconds of each of `steps` training steps (the loop's own per-step timing)."""
        seconds: list[float] = []
        last = [0.0]

        def on_step(progress) -> None:
            seconds.append(progress.seconds - last[0])
            last[0] = progress.seconds

        data = [self.data[(self.step + i) % len(self.data)] for i in range(steps)]
        state = TrainingState(self.model, self.optimizer, self.scheduler, self.weighting)
        plan = EpochPlan(1, global_step=self.step, steps=steps)
        train_one_epoch(state, self.loss_fn, data, StepSettings.from_config(self.cfg), torch.device("cpu"), plan, on_step=on_step)
        self.step += steps
        return seconds


def head_times(task_counts: list[int], reps: int, batch: int = 64) -> dict[int, float]:
    """{K: seconds} of what grows with K in a step, without the backbone: `decode` of a fixed
    representation, `TaskLoss`, equal weighting's backward, AdamW on the heads (fastest of `reps`)."""
    from mtl_core.losses import TaskLoss
    from mtl_core.models import build_model
    from mtl_core.weighting import StepContext, build_weighting

    from mtl_core.losses import weighted_cross_entropy

    def separate(model) -> tuple[Callable, dict]:
        """The layout before the heads were fused: K nn.Linear, K weighted_cross_entropy calls."""
        heads = torch.nn.ModuleDict({t: torch.nn.Linear(model.heads.in_features, 2) for t in model.task_names})

        def losses(z, y, w):
            return {t: weighted_cross_entropy(h(z), y[:, i], w) for i, (t, h) in enumerate(heads.items())}

        return losses, {t: list(h.parameters()) for t, h in heads.items()}

    def fused(model) -> tuple[Callable, dict]:
        loss_fn = TaskLoss(model.task_names)
        return (lambda z, y, w: loss_fn(model.decode(z), y, w)), {t: list(model.task_parameters(t)) for t in model.task_names}

    setups = {}
    for k in task_counts:
        model = build_model("hard_sharing", {f"t{i:02d}": 2 for i in range(k)}, "small_cnn")
        _, y, w = batches(k, 1, batch, 8)[0]
        z0 = torch.randn(batch, model.heads.in_features)
        for layout, make in (("separate", separate), ("fused", fused)):
            losses, private = make(model)
            optimizer = torch.optim.AdamW(list({id(p): p for ps in private.values() for p in ps}.values()), lr=1e-3)
            setups[(layout, k)] = (losses, private, optimizer, build_weighting("equal", model.task_names), z0, y, w)
    best = {key: float("inf") for key in setups}
    for _ in range(reps):
        for key, (losses_of, private, optimizer, weighting, z0, y, w) in setups.items():
            start = time.perf_counter()
            z = z0.clone().requires_grad_()
            losses = losses_of(z, y, w)
            optimizer.zero_grad(set_to_none=True)
            weighting.backward(losses, StepContext(shared_params=[], task_params=private, shared_repr=z))
            optimizer.step()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def summarise(times: dict[tuple[str, int], list[float]]) -> dict[tuple[str, int], dict[str, float]]:
    """{(method, K): {median and fastest seconds, the median's ratio to equal at K=4 and to equal at
    the same K}}. The fastest step is the figure least moved by other processes on a shared machine."""
    med = {key: statistics.median(v) for key, v in times.items()}
    ref = med.get(REFERENCE)
    return {
        (m, k): {
            "median_s": s,
            "min_s": min(times[(m, k)]),
            "vs_equal_k4": s / ref if ref else float("nan"),
            "vs_equal_same_k": s / med[("equal", k)] if ("equal", k) in med else float("nan"),
        }
        for (m, k), s in med.items()
    }


def markdown(summary: dict[tuple[str, int], dict[str, float]]) -> str:
    """Rows: methods; columns: per K, the median step time in ms (× equal at K=4; × equal at this K),
    then the fastest step in ms."""
    methods = list(dict.fromkeys(m for m, _ in summary))
    ks = sorted({k for _, k in summary})
    lines = ["| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|" + " --- |" * (len(ks) + 1)]
    for m in methods:
        cells = []
        for k in ks:
            r = summary.get((m, k))
            cells.append(
                "—" if r is None
                else f"{1e3 * r['median_s']:.0f} ms ({r['vs_equal_k4']:.2f}×; {r['vs_equal_same_k']:.2f}×), fastest {1e3 * r['min_s']:.0f}"
            )  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from mtl_core.config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", type=int, default=[4, 10, 40])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration and repeat")
    parser.add_argument("--slow-steps", type=int, default=1, help="the same for the methods on: params (K backward passes)")
    parser.add_argument("--head-reps", type=int, default=30, help="repeats of the heads-only measurement (0: skip it)")
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = load_config(ROOT / "params.yaml")
    cfg = base.model_copy(update={"train": base.train.model_copy(update={"amp": False, "max_steps_per_epoch": None, "grad_clip": None})})
    configs = [(m, k) for k in args.tasks for m in args.methods]
    trainers = {c: Trainer(*c, cfg, args.backbone, args.batch_size, args.image_size) for c in configs}
    for t in trainers.values():
        t.run(1)  # warm-up: allocator, first-call dispatch, optimizer state
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    start = time.perf_counter()
    for r in range(args.repeats):
        for c in configs if r % 2 == 0 else reversed(configs):
            times[c] += trainers[c].run(args.slow_steps if trainers[c].slow else args.steps)
        print(f"repeat {r + 1}/{args.repeats} done, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(
        f"{args.backbone}, hard sharing, batch {args.batch_size}, {args.image_size} px, 2-class tasks, CPU "
        f"({os.cpu_count()} threads, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"{platform.processor() or platform.machine()}); {args.repeats} repeats x {args.steps} steps per configuration, "
        f"interleaved; median step time (x equal weighting at K = 4; x equal weighting at the same K), fastest step; "
        f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s\n"
    )
    print(markdown(summarise(times)))
    if args.head_reps:
        print("\nThe K-dependent part alone (equal weighting; heads, losses, backward into a fixed representation, "
              f"AdamW on the heads; fastest of {args.head_reps}, interleaved):\n")
        heads = head_times(args.tasks, args.head_reps)
        print("| heads + losses | " + " | ".join(f"K = {k}" for k in args.tasks) + " |\n|" + " --- |" * (len(args.tasks) + 1))
        for layout, label in (("separate", "K nn.Linear, K loss calls (before)"), ("fused", "fused heads, stacked losses (now)")):
            print(f"| {label} | " + " | ".join(f"{1e3 * heads[(layout, k)]:.2f} ms" for k in args.tasks) + " |")


if __name__ == "__main__":
    main()
