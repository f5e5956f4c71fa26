"""Which task grouping is best, and do the affinity signals find it? Every partition of the tasks, trained.

On the built-in data at a budget where every single-task model learns its task (the defaults below: a
small CNN, 6,000 images, 8 epochs, where `shape` alone ends well above 0.8), trains one network for
every non-empty subset of the tasks (15 for four tasks) with the train stage's own `fit`, scores each on
the test split, and composes the 15 partitions from them: a partition's accuracy on a task is that of
the network of the task's group (a group's network does not depend on the rest of the partition, so
15 trainings cover all 15 partitions). For every partition: the per-task test accuracy, Δm against the
single-task models, how many tasks are significantly worse than their single-task model (paired
bootstrap, evaluation/significance.py), the networks it costs; ranked by Δm.

Then the grouping stage's probe (stages/grouping.py: the all-in-one network for `--probe-epochs`
epochs, each length with each of `--probe-seeds`) measures both affinity signals, the lookahead affinity
and the gradient cosine; a table per training seed says where each probe's choice of each signal lands
(rank, Δm, tasks significantly worse) and what the probe cost with the lookahead and with the cosine
alone. More training seeds where time allows (`--seeds 0 1 2`): a ranking per seed.

    python3 -m uv run python bench/grouping.py --workdir gbench                 # about 1 h on 2 CPU cores
    python3 -m uv run python bench/grouping.py --workdir gbench --probe-epochs 1 2
    python3 -m uv run python bench/grouping.py --set train.epochs=4             # another budget

With `--workdir`, each subset's result is kept there as it finishes, and a rerun with the same budget
trains only the subsets still missing (a run of several hours can be stopped and continued).

`--set section.key=value` (YAML value) overrides the benchmark's params, as `dvc exp run -S` would.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.overrides import apply_overrides, prepared_project  # noqa: E402
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

BUDGET = [
    "model.backbone=small_cnn", "data.builtin.num_images=6000", "train.epochs=8", "train.batch_size=128",
    "train.num_workers=1", "train.task_affinity_every=0",
]  # fmt: skip


def subsets(tasks: list[str]) -> list[tuple[str, ...]]:
    return [c for r in range(1, len(tasks) + 1) for c in itertools.combinations(tasks, r)]


def partitions(items: list[str]) -> list[list[list[str]]]:
    from mtl_core.evaluation.task_grouping import _partitions

    index = {i: t for i, t in enumerate(items)}
    return [[[index[i] for i in g] for g in p] for p in _partitions(list(range(len(items))))]


def train_subset(workdir: Path, cfg, tasks, subset: tuple[str, ...], seed: int) -> dict:
    """One network of the tasks in `subset`: its per-task test metrics, test predictions, seconds."""
    from mtl_core.evaluation.scoring import read_test_predictions, score_folder
    from mtl_core.paths import ProjectPaths
    from mtl_core.stages.baselines import single_task_config
    from mtl_core.tasks import TaskSpec
    from mtl_core.training.engine import fit
    from mtl_core.training.model_files import ModelFiles
    from mtl_core.training.sink import LogSink

    paths = ProjectPaths(workdir)
    run_cfg = single_task_config(cfg) if len(subset) == 1 else cfg
    run_cfg = run_cfg.model_copy(update={"train": run_cfg.train.model_copy(update={"seed": seed})})
    columns = [tasks.names.index(t) for t in subset]
    folder = workdir / "runs" / str(seed) / "+".join(subset)
    spec = TaskSpec({t: tasks.classes[t] for t in subset})
    fit(run_cfg, paths, spec, ModelFiles.in_folder(folder), label_columns=columns, sink=LogSink())
    per_task = score_folder(run_cfg, paths, folder, columns)
    summary = json.loads((folder / "train_metrics.json").read_text())
    return {
        "tasks": list(subset), "metrics": per_task, "train_seconds": summary["train_seconds"],
        "predictions": read_test_predictions(folder / "test_predictions.csv", list(subset)).tolist(),
    }  # fmt: skip


def probe(workdir: Path, params: dict, lookahead: bool, probe_epochs: int, every: int, seed: int = 0) -> dict:
    """The grouping stage on the benchmark's data (its probe trained with `train.seed: seed`): its decision
    (and both signals' choices) and cost."""
    from mtl_core.pipeline import run_stage

    p = json.loads(json.dumps(params))
    p["model"]["task_groups"] = "auto"
    p["train"]["seed"] = seed
    p["grouping"] = {**p.get("grouping", {}), "probe_epochs": probe_epochs, "every": every}
    (workdir / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    if lookahead:
        start = time.perf_counter()
        report = run_stage("grouping", root=workdir)
        report["stage_seconds"] = time.perf_counter() - start
        return report
    # without the lookahead: the probe's training alone, measuring the gradient cosine only
    from mtl_core.config import load_config
    from mtl_core.paths import ProjectPaths
    from mtl_core.stages.grouping import probe_config
    from mtl_core.tasks import TaskSpec
    from mtl_core.training.engine import fit
    from mtl_core.training.model_files import ModelFiles
    from mtl_core.training.sink import LogSink

    cfg = load_config(workdir / "params.yaml")
    paths = ProjectPaths(workdir)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        fit(probe_config(cfg), paths, TaskSpec.load(paths.tasks_file), ModelFiles.in_folder(Path(tmp), gradient_cosine=True), sink=LogSink())
        return {"stage_seconds": time.perf_counter() - start}


def rank_partitions(results: dict[tuple[str, ...], dict], tasks: list[str], targets: np.ndarray, metric: str) -> list[dict]:
    """Every partition: per-task accuracy from its groups' networks, Δm against single-task, verdicts."""
    from mtl_core.evaluation.comparison import relative_difference
    from mtl_core.evaluation.selection import task_verdicts
    from mtl_core.evaluation.significance import WORSE

    single = np.stack([np.asarray(results[(t,)]["predictions"])[:, 0] for t in tasks], 1)
    rows = []
    for p in partitions(tasks):
        metrics, predicted, seconds = {}, np.zeros_like(single), 0.0
        for group in p:
            r = results[tuple(group)]
            seconds += r["train_seconds"]
            for i, t in enumerate(group):
                metrics[t] = r["metrics"][t][metric]
                predicted[:, tasks.index(t)] = np.asarray(r["predictions"])[:, i]
        rel = [relative_difference(metrics[t], results[(t,)]["metrics"][t][metric]) for t in tasks]
        verdicts = task_verdicts(targets, tasks, predicted, single, metric) if len(p) < len(tasks) else {}
        rows.append({
            "groups": p, "networks": len(p), metric: metrics, "delta_m_pct": float(np.mean(rel)), "train_seconds": seconds,
            "worse": [t for t, v in verdicts.items() if v["verdict"] == WORSE],
        })  # fmt: skip
    return sorted(rows, key=lambda r: (-r["delta_m_pct"], r["networks"]))


def partition_key(groups: list[list[str]]) -> str:
    """One string per partition, whatever the order of its groups and of the tasks in them."""
    return json.dumps(sorted(map(sorted, groups)))


def markdown(rows: list[dict], tasks: list[str], metric: str, marks: dict[str, list[str]]) -> str:
    """The ranked partitions; `marks`: for a partition (`partition_key`), the probes that chose it."""
    from mtl_core.evaluation.task_grouping import format_groups

    cols = ["rank", "partition", "networks", *tasks, "Δm %", "significantly worse", "train s", "chosen by"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for i, r in enumerate(rows, 1):
        chosen = "; ".join(marks.get(partition_key(r["groups"]), []))
        cells = [str(i), format_groups(r["groups"]), str(r["networks"]), *[f"{r[metric][t]:.3f}" for t in tasks],
                 f"{r['delta_m_pct']:+.2f}", ", ".join(r["worse"]) or "none", f"{r['train_seconds']:.0f}", chosen]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_table(probes: list[dict], rows: list[dict], seed: str) -> str:
    """Per probe (length, seed): each signal's choice, its rank of the partitions, Δm, the tasks it leaves
    significantly worse, networks; the probe's seconds with both signals and with the cosine alone."""
    from mtl_core.evaluation.task_grouping import format_groups

    lines = ["| probe epochs | probe seed | signal | choice | rank | networks | Δm % | significantly worse | probe s (both / cosine only) |",
             "|" + " --- |" * 9]  # fmt: skip
    for pr in probes:
        for signal, groups in pr["choices"].items():
            k = pr["ranks"][seed][signal]
            row = rows[k - 1]
            lines.append(f"| {pr['probe_epochs']} | {pr['probe_seed']} | {signal} | {format_groups(groups)} | {k} | {len(groups)} | "
                         f"{row['delta_m_pct']:+.2f} | {', '.join(row['worse']) or 'none'} | "
                         f"{pr['seconds_with_lookahead']:.0f} / {pr['seconds_cosine_only']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--probe-epochs", nargs="+", type=int, default=[2], help="probe lengths to measure (epochs)")
    parser.add_argument("--probe-seeds", nargs="+", type=int, default=[0, 1, 2], help="probe trainings' seeds")
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--metric", default="accuracy", choices=["accuracy", "balanced_accuracy"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmark-grouping")
    args = parser.parse_args()

    from mtl_core.config import load_config
    from mtl_core.paths import ProjectPaths
    from mtl_core.tasks import TaskSpec

    params = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), [*BUDGET, *args.overrides])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = prepared_project(args.workdir or Path(tmp) / "project", params)
        paths = ProjectPaths(workdir)
        cfg, tasks = load_config(workdir / "params.yaml"), TaskSpec.load(paths.tasks_file)
        targets = np.load(paths.labels_cache("test"))
        out = {"budget": [*BUDGET, *args.overrides], "metric": args.metric, "seeds": {}}
        for seed in args.seeds:
            results = {}
            for s in subsets(tasks.names):
                t0 = time.perf_counter()
                # each subset's result is kept in the work folder: a run stopped part-way (--workdir) goes
                # on where it stopped, and never mixes in a subset trained with another budget
                kept = workdir / "runs" / str(seed) / "+".join(s) / "bench_result.json"
                budget = [*BUDGET, *args.overrides]
                if kept.is_file() and json.loads(kept.read_text()).get("budget") == budget:
                    results[s] = json.loads(kept.read_text())["result"]
                else:
                    results[s] = train_subset(workdir, cfg, tasks, s, seed)
                    kept.write_text(json.dumps({"budget": budget, "result": results[s]}) + "\n")
                acc = ", ".join(f"{t} {results[s]['metrics'][t][args.metric]:.3f}" for t in s)
                print(f"seed {seed} {'+'.join(s)}: {acc} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            rows = rank_partitions(results, tasks.names, targets, args.metric)
            out["seeds"][seed] = {"partitions": rows, "subsets": {"+".join(k): {kk: vv for kk, vv in v.items() if kk != "predictions"} for k, v in results.items()}}
        (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        probes = []  # every probe length and seed: both signals' choices; the cost with and without the lookahead
        for epochs in args.probe_epochs:
            cosine_only = probe(workdir, params, False, epochs, args.every, args.probe_seeds[0])["stage_seconds"]
            for probe_seed in args.probe_seeds:
                both = probe(workdir, params, True, epochs, args.every, probe_seed)
                probes.append({
                    "probe_epochs": epochs, "probe_seed": probe_seed, "seconds_with_lookahead": both["stage_seconds"],
                    "seconds_cosine_only": cosine_only, "decision": both,
                    "choices": {both["signal"]: both["groups"], both["alternative"]["signal"]: both["alternative"]["groups"]},
                })  # fmt: skip
    out["probes"] = probes
    header = (
        f"bench/grouping.py, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s; budget: "
        f"{', '.join(out['budget'])}; metric: test {args.metric}; probes of {', '.join(map(str, args.probe_epochs))} "
        f"epoch(s), seeds {', '.join(map(str, args.probe_seeds))}, affinities every {args.every} steps"
    )
    text = header + "\n"
    for seed, r in out["seeds"].items():
        rows = r["partitions"]
        rank = {partition_key(row["groups"]): i for i, row in enumerate(rows, 1)}
        marks = {}
        for pr in probes:
            for signal, groups in pr["choices"].items():
                key = partition_key(groups)
                pr.setdefault("ranks", {}).setdefault(str(seed), {})[signal] = rank[key]
                marks.setdefault(key, []).append(f"{signal} {pr['probe_epochs']} ep. s{pr['probe_seed']}")
        text += f"\n## Seed {seed}\n\n" + markdown(rows, tasks.names, args.metric, marks) + "\n\n"
        text += "### Where each probe's choice lands\n\n" + probe_table(probes, rows, str(seed)) + "\n"
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(text)


if __name__ == "__main__":
    main()
