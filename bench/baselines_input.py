"""What sharing the input pipeline saves the single-task baselines (`compare.shared_input`), in one run.

A project on the built-in data is ingested and preprocessed once; then the `baselines` stage runs with
`compare.shared_input: true` (the first task's training records its augmented batches, the others
replay them) and `false` (every task decodes and augments the data itself), alternating, `--repeats`
times each. The table gives, per mode, the median wall time of the stage and the summed training seconds
of its K models (train_metrics.json, what `compare` reports as the baselines' cost), and the ratio
shared / separate. The weights are the same either way (tests/test_baselines_compare.py).

    python3 -m uv run python bench/baselines_input.py [--dataset shapes|shape_attributes] [--images 1200]
        [--epochs 2] [--backbone small_cnn] [--workers auto] [--repeats 2]

With `shape_attributes` (40 yes/no tasks) there are 40 baselines: the saving grows with K.
Ratios are only meaningful within one run (the numbers move with whatever else the machine is doing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_params(project: Path, args: argparse.Namespace, shared: bool) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = f"builtin:{args.dataset}"
    params["data"]["builtin"].update({"num_images": args.images, "seed": 0})
    params["model"].update({"backbone": args.backbone})
    params["train"].update({"epochs": args.epochs, "num_workers": args.workers, "task_affinity_every": 0})
    params["compare"].update({"single_task": True, "shared_input": shared})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="shapes", choices=["shapes", "shape_attributes"])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.workers != "auto":
        args.workers = int(args.workers)

    from mtl_core.pipeline import run_stage

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        (project / "data" / "datasets").mkdir(parents=True)
        write_params(project, args, shared=True)
        for stage in ("ingest", "preprocess"):
            run_stage(stage, root=project)
        k = len(json.loads((project / "data" / "preprocessed" / "tasks.json").read_text())["tasks"])
        wall: dict[bool, list[float]] = {True: [], False: []}
        train: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for shared in (True, False):
                write_params(project, args, shared)
                t0 = time.perf_counter()
                run_stage("baselines", root=project)
                wall[shared].append(time.perf_counter() - t0)
                report = json.loads((project / "reports" / "single_task_metrics.json").read_text())
                train[shared].append(report["cost"]["train_seconds"])

    med = {s: (statistics.median(wall[s]), statistics.median(train[s])) for s in (True, False)}
    print(f"# baselines stage, {k} tasks: {args.dataset}, {args.images} images, {args.backbone}, {args.epochs} epochs, "
          f"num_workers {args.workers}; {platform.node()} ({platform.processor() or platform.machine()}), "
          f"median of {args.repeats}\n")  # fmt: skip
    print("| compare.shared_input | stage wall s | sum of K training s |")
    print("| --- | --: | --: |")
    for shared in (True, False):
        print(f"| {str(shared).lower()} | {med[shared][0]:.1f} | {med[shared][1]:.1f} |")
    print(f"| ratio true / false | {med[True][0] / med[False][0]:.2f} | {med[True][1] / med[False][1]:.2f} |")


if __name__ == "__main__":
    main()
