"""Why does a task lose in the multi-task model? Train it alone and with the others, measured alike.

Trains, with the train stage's own `fit` on the same data, backbone, budget and seed, the multi-task
model (all tasks) and a single-task model for each task named by `--single`, with the task-gradient
tracker on in both (every `--every` steps: per task |g_t|, the effective learning rate
-d.g_t/|g_t|^2 of the optimizer's actual step d, the step's alignment cos(-d, g_t), and the pairwise
task-gradient cosines; see mtl_core/training/gradient_cosine.py). Scores every model on the test split
and prints, per epoch, the focus task's validation accuracy and gradient statistics side by side;
writes everything to `--out`.json/.md.

    python3 -m uv run python bench/transfer.py                                   # params.yaml as is
    python3 -m uv run python bench/transfer.py --set train.epochs=12 --tag 12ep   # does more budget close the gap?

`--set section.key=value` (YAML value) overrides params.yaml, as `dvc exp run -S` would.
"""

from __future__ import annotations

import argparse
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
from bench.overrides import apply_overrides  # noqa: E402
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def prepare(workdir: Path, params: dict) -> None:
    """Ingest and preprocess once per data configuration (reused when the data params match)."""
    from mtl_core.pipeline import run_stage

    data_key = json.dumps([params["data"], params["preprocess"]["image_size"]], sort_keys=True)
    marker = workdir / "data_key.json"
    (workdir / "params.yaml").parent.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if marker.is_file() and marker.read_text() == data_key:
        return
    (workdir / "data" / "datasets").mkdir(parents=True, exist_ok=True)
    for stage in ("ingest", "preprocess"):
        run_stage(stage, root=workdir)
    marker.write_text(data_key)


def train_and_score(workdir: Path, label: str, single: str | None, subset: list[str] | None = None) -> dict:
    """One model (all tasks, `single` alone as the single-task baseline, or the multi-task model of
    the tasks in `subset`): its per-epoch history and test accuracy."""
    import mlflow
    import pandas as pd

    from mtl_core.config import load_config
    from mtl_core.evaluation.scoring import make_test_loader, score
    from mtl_core.models.io import load_model
    from mtl_core.paths import ProjectPaths
    from mtl_core.tasks import TaskSpec
    from mtl_core.stages.baselines import single_task_config
    from mtl_core.runtime import select_device
    from mtl_core.training.engine import fit
    from mtl_core.training.model_files import ModelFiles

    cfg = load_config(workdir / "params.yaml")
    paths = ProjectPaths(workdir)
    tasks = TaskSpec.load(paths.tasks_file)
    columns = None
    if single is not None:
        cfg = single_task_config(cfg)
        columns = [tasks.names.index(single)]
        tasks = TaskSpec({single: tasks.classes[single]})
    elif subset:
        columns = [tasks.names.index(t) for t in subset]
        tasks = TaskSpec({t: tasks.classes[t] for t in subset})
    folder = workdir / "runs" / label
    base = ModelFiles.in_folder(folder)
    files = ModelFiles(**{**base.__dict__, "gradient_cosine": folder / "gradient_cosine.json"})
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_experiment("bench-transfer")
    with mlflow.start_run(run_name=label):
        fit(cfg, paths, tasks, files, label_columns=columns)
    device = select_device(cfg.train.device)
    model, spec = load_model(files.spec, files.weights, device)
    per_task, *_ = score(model, make_test_loader(cfg, paths, columns, spec), device, cfg.train.amp)
    history = pd.read_csv(files.history)
    summary = json.loads(files.summary.read_text())
    cosine = json.loads(files.gradient_cosine.read_text())
    return {
        "label": label, "tasks": tasks.names, "test_accuracy": {t: v["accuracy"] for t, v in per_task.items()},
        "history": history.to_dict(orient="list"), "train_seconds": summary["train_seconds"],
        "best_epoch": summary["best_epoch"], "cosine": cosine["epochs"],
    }  # fmt: skip


def table(results: list[dict], focus: str) -> str:
    """Per epoch: the focus task's val accuracy and gradient statistics in every model that has it."""
    models = [r for r in results if focus in r["tasks"]]
    if not models:
        return f"(no model trained {focus})\n"
    cols = ["epoch"]
    for r in models:
        cols += [f"{r['label']} val acc", f"{r['label']} |g|", f"{r['label']} eff. lr", f"{r['label']} align"]
    mtl = next((r for r in models if len(r["tasks"]) > 1), None)
    if mtl is not None:
        cols.append("mean cos with others")
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    epochs = models[0]["history"]["epoch"]
    for i, e in enumerate(epochs):
        cells = [str(e)]
        for r in models:
            h = r["history"]
            g = lambda s: h.get(f"grad/{focus}/{s}", [np.nan] * len(epochs))[i]  # noqa: E731
            cells += [f"{h[f'val/{focus}/accuracy'][i]:.3f}", f"{g('grad_norm'):.3g}", f"{g('effective_lr'):.3g}", f"{g('step_alignment'):.3f}"]
        if mtl is not None:
            m = np.asarray(mtl["cosine"].get(str(e), np.full((len(mtl["tasks"]),) * 2, np.nan)))
            k = mtl["tasks"].index(focus)
            cells.append(f"{np.nanmean(np.delete(m[k], k)):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    test = ", ".join(f"{r['label']} {r['test_accuracy'][focus]:.3f} ({r['train_seconds']:.0f} s)" for r in models)
    return "\n".join(lines) + f"\n\ntest accuracy of {focus}: {test}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--single", nargs="*", default=["shape"], help="tasks to train alone too (default: shape)")
    parser.add_argument("--together", action="append", default=[], metavar="T1,T2",
                        help="also train a multi-task model of these tasks only (a group of a grouping)")
    parser.add_argument("--skip-all", action="store_true", help="do not train the all-task model")
    parser.add_argument("--focus", default="shape")
    parser.add_argument("--every", type=int, default=25, help="measure the task gradients every N steps")
    parser.add_argument("--tag", default="default")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the project here (reuses its data)")
    parser.add_argument("--out", type=Path, default=None, help="default: docs/transfer-<tag>")
    args = parser.parse_args()

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = apply_overrides(params, args.overrides)
    params["train"]["task_affinity_every"] = args.every
    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp) / "project").resolve()
        prepare(workdir, params)
        start = time.perf_counter()
        results = [] if args.skip_all else [train_and_score(workdir, f"{args.tag}/multi-task", None)]
        results += [train_and_score(workdir, f"{args.tag}/{t} alone", t) for t in args.single]
        results += [train_and_score(workdir, f"{args.tag}/{g}", None, g.split(",")) for g in args.together]
    header = (
        f"bench/transfer.py, params.yaml with {args.overrides or 'no overrides'}; "
        f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s"
    )
    text = header + "\n\n" + table(results, args.focus)
    for r in results:
        text += f"\n{r['label']}: test accuracy " + ", ".join(f"{t} {a:.3f}" for t, a in r["test_accuracy"].items())
    out = args.out or ROOT / "docs" / f"transfer-{args.tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"setup": header, "overrides": args.overrides, "results": results}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
