"""Every loss-weighting / gradient-balancing method against single-task baselines on the built-in data.

Trains with the train stage's own `fit` (same data, backbone, epochs and batch for every method) over
several seeds, scores each model on the test split, and writes a Markdown and a JSON table:

* per-task test accuracy, mean ± std over seeds;
* Δm (Maninis et al. 2019) against the single-task baselines of the same seed, mean ± std;
* seconds per training epoch, relative to equal weighting;
* peak memory growth during training, relative to equal weighting: GPU `max_memory_allocated` on CUDA,
  else the growth of the process's peak resident set size over its size before training.

Each method runs (all its seeds) in a fresh child process, so peak-memory figures do not leak from one
method to the next.
The single-task row is K models; its time is their sum (what a user pays for K separate networks).

    python3 -m uv run python bench/methods.py                    # everything, 3 seeds (about 45 min on 2 CPU cores)
    python3 -m uv run python bench/methods.py --methods equal famo pcgrad --seeds 0

Ratios are meaningful within one run only: the numbers move with whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SINGLE_TASK = "single_task"
# `fixed` needs weights: up-weight the hard task (shape), down-weight the two easy ones.
OPTIONS: dict[str, dict] = {"fixed": {"weights": {"shape": 2.0, "color": 0.5, "size": 1.0, "position": 0.5}}}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_method(workdir: Path, method: str, seeds: list[int]) -> list[dict]:
    """Child process: per seed, one training (one multi-task model, or the K single-task models) and
    its test scores."""
    import mlflow
    import torch

    from mtl_core.config import load_config
    from mtl_core.paths import ProjectPaths
    from mtl_core.tasks import TaskSpec
    from mtl_core.evaluation.scoring import score_folder
    from mtl_core.runtime import select_device
    from mtl_core.stages.baselines import single_task_config
    from mtl_core.training.engine import fit
    from mtl_core.training.model_files import ModelFiles

    base = load_config(workdir / "params.yaml")
    paths = ProjectPaths(workdir)
    tasks = TaskSpec.load(paths.tasks_file)
    device = select_device(base.train.device)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_experiment("bench-methods")
    jobs = [(t, TaskSpec({t: tasks.classes[t]}), [k]) for k, t in enumerate(tasks.names)] if method == SINGLE_TASK else [(None, tasks, None)]

    rss_before = _rss_mib()
    results = []
    for seed in seeds:
        if method == SINGLE_TASK:
            cfg = single_task_config(base)
        else:
            cfg = base.model_copy(update={"train": base.train.model_copy(update={"weighting": method, "weighting_options": OPTIONS.get(method, {})})})
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        accuracy: dict[str, float] = {}
        seconds = 0.0
        for task, spec, columns in jobs:
            folder = workdir / "runs" / method / str(seed) / (task or "all")
            with mlflow.start_run(run_name=f"{method} seed {seed} {task or ''}".strip()):
                fit(cfg, paths, spec, ModelFiles.in_folder(folder), label_columns=columns)
                per_task = score_folder(cfg, paths, folder, columns)
            seconds += json.loads((folder / "train_metrics.json").read_text())["train_seconds"]
            accuracy.update({t: v["accuracy"] for t, v in per_task.items()})
        memory = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mib() - rss_before
        results.append({
            "method": method, "seed": seed, "accuracy": accuracy, "seconds_per_epoch": seconds / cfg.train.epochs,
            "peak_memory_mib": memory, "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS growth",
            "device": str(device),
        })  # fmt: skip
        print(f"{method:>16} seed {seed}: mean acc {np.mean(list(accuracy.values())):.3f}, "
              f"{results[-1]['seconds_per_epoch']:.1f} s/epoch, {memory:.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
    return results


def prepare(workdir: Path, args: argparse.Namespace) -> None:
    """Ingest and preprocess the built-in dataset once, with the benchmark's budget in params.yaml."""
    from mtl_core.pipeline import run_stage

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["builtin"].update({"num_images": args.num_images})
    params["model"]["backbone"] = args.backbone
    params["train"].update(
        {"epochs": args.epochs, "batch_size": args.batch_size, "num_workers": args.workers, "task_affinity_every": 0}
    )
    (workdir / "data" / "datasets").mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("ingest", "preprocess"):
        run_stage(stage, root=workdir)


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarise(results: list[dict], tasks: list[str]) -> list[dict]:
    """One row per method: accuracies and Δm (against the same seed's single-task models), mean ± std."""
    from mtl_core.evaluation.comparison import compare_tasks

    by_method: dict[str, list[dict]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    baselines = {r["seed"]: r for r in by_method.get(SINGLE_TASK, [])}
    equal = by_method.get("equal", [])
    ref_sec = np.mean([r["seconds_per_epoch"] for r in equal]) if equal else np.nan
    ref_mem = np.mean([r["peak_memory_mib"] for r in equal]) if equal else np.nan
    rows = []
    for method, runs in by_method.items():
        row: dict = {"method": method, "seeds": sorted(r["seed"] for r in runs)}
        for t in tasks:
            row[t] = _mean_std([r["accuracy"][t] for r in runs])
        row["mean_accuracy"] = _mean_std([np.mean([r["accuracy"][t] for t in tasks]) for r in runs])
        deltas = [
            compare_tasks({t: {"accuracy": r["accuracy"][t]} for t in tasks},
                          {t: {"accuracy": baselines[r["seed"]]["accuracy"][t]} for t in tasks}, ["accuracy"])["delta_m_pct"]["accuracy"]
            for r in runs if r["seed"] in baselines
        ]  # fmt: skip
        row["delta_m_pct"] = _mean_std(deltas) if deltas else None
        row["seconds_per_epoch"] = float(np.mean([r["seconds_per_epoch"] for r in runs]))
        row["time_vs_equal"] = row["seconds_per_epoch"] / ref_sec if equal else None
        row["peak_memory_mib"] = float(np.mean([r["peak_memory_mib"] for r in runs]))
        row["memory_vs_equal"] = row["peak_memory_mib"] / ref_mem if equal and ref_mem > 0 else None
        rows.append(row)
    return rows


def markdown(rows: list[dict], tasks: list[str], header: str) -> str:
    fmt = lambda ms: f"{ms[0]:.3f} ± {ms[1]:.3f}"  # noqa: E731
    cols = ["method", *tasks, "mean acc.", "Δm % vs single-task", "s / epoch", "time vs equal", "peak mem. (MiB)", "mem. vs equal"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        dm = f"{r['delta_m_pct'][0]:+.2f} ± {r['delta_m_pct'][1]:.2f}" if r["delta_m_pct"] else "—"
        mem_ratio = f"{r['memory_vs_equal']:.2f}×" if r["memory_vs_equal"] is not None else "—"
        time_ratio = f"{r['time_vs_equal']:.2f}×" if r["time_vs_equal"] is not None else "—"
        cells = [r["method"], *[fmt(r[t]) for t in tasks], fmt(r["mean_accuracy"]), dm, f"{r['seconds_per_epoch']:.1f}",
                 time_ratio, f"{r['peak_memory_mib']:.0f}", mem_ratio]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from mtl_core.tasks import TaskSpec
    from mtl_core.weighting import WEIGHTINGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=[SINGLE_TASK, *sorted(WEIGHTINGS, key=lambda m: m != "equal")])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-images", type=int, default=1600)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmark-methods")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the project here (default: a temp folder)")
    parser.add_argument("--run-method", metavar="METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_method:
        print("RESULT " + json.dumps(run_method(args.workdir, args.run_method, args.seeds)))
        return
    unknown = [m for m in args.methods if m != SINGLE_TASK and m not in WEIGHTINGS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {SINGLE_TASK}, {', '.join(sorted(WEIGHTINGS))}")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp) / "project").resolve()
        prepare(workdir, args)
        tasks = TaskSpec.load(workdir / "data" / "preprocessed" / "tasks.json").names
        results, start = [], time.perf_counter()
        for method in args.methods:
            proc = subprocess.run(
                [sys.executable, __file__, "--workdir", str(workdir), "--run-method", method,
                 "--seeds", *map(str, args.seeds)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip  # stderr passes through: per-seed progress
            if proc.returncode != 0:
                sys.exit(f"{method} failed (its traceback is above)")
            results += json.loads(next(ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")))

    rows = summarise(results, tasks)
    device = results[0]["device"]
    header = (
        f"Built-in shapes, {args.num_images} images (70/15/15 split), {args.backbone}, {args.epochs} epochs, batch "
        f"{args.batch_size}, seeds {args.seeds}; {device} on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPU threads, {platform.processor() or platform.machine()}); memory: "
        f"{results[0]['memory_kind']}; run {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s in all."
    )
    text = markdown(rows, tasks, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"setup": header, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "runs": results}, indent=2) + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
