"""How many wrong labels does `mtl audit-labels` find, and how many of its suspects are wrong labels?

On the built-in data (whose labels are right by construction: each image is drawn from them), flips a
known share of the training split's labels on purpose, per task to another class chosen at random
(seeded), between ingest and preprocess; then runs the k-fold audit (mtl_core/stages/audit_labels.py)
and compares its suspects with the flipped rows: recall (flipped rows found / flipped rows) and
precision (flipped rows among the suspects / suspects), per task.

    python3 -m uv run python bench/label_audit.py                       # 5 % flipped, 3 folds
    python3 -m uv run python bench/label_audit.py --share 0.1 --folds 5

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
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.overrides import apply_overrides  # noqa: E402
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

BUDGET = [
    "model.backbone=small_cnn", "data.builtin.num_images=3000", "train.epochs=6", "train.batch_size=64",
    "train.num_workers=1", "train.task_affinity_every=0",
]  # fmt: skip


def flip(manifest: Path, share: float, seed: int) -> dict[str, set[str]]:
    """Flip `share` of the training rows' labels of every task to another class; return the flipped rows."""
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    tasks = [c for c in frame.columns if c not in ("row", "path", "split")]
    train = np.flatnonzero(frame["split"] == "train")
    flipped = {}
    for task in tasks:
        classes = sorted(set(frame[task]) - {""})
        chosen = rng.choice(train, size=int(round(share * len(train))), replace=False)
        for i in chosen:
            others = [c for c in classes if c != frame.at[i, task]]
            frame.at[i, task] = others[rng.integers(len(others))]
        flipped[task] = set(frame.loc[chosen, "row"])
    frame.to_csv(manifest, index=False)
    return flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--share", type=float, default=0.05, help="share of each task's training labels flipped")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmark-label-audit")
    args = parser.parse_args()

    from mtl_core.config import load_config
    from mtl_core.pipeline import run_stage
    from mtl_core.stages.audit_labels import run_audit_labels

    params = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), [*BUDGET, *args.overrides])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.workdir or Path(tmp) / "project").resolve()
        (root / "data" / "datasets").mkdir(parents=True, exist_ok=True)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run_stage("ingest", root=root)
        flipped = flip(root / "data" / "ingested" / "manifest.csv", args.share, args.seed)
        run_stage("preprocess", root=root)
        summary = run_audit_labels(load_config(root / "params.yaml"), root, args.folds)
        rows = []
        for task, truth in flipped.items():
            found = set(pd.read_csv(root / "reports" / "label_audit" / f"{task}.csv", dtype=str, keep_default_na=False)["row"])
            hits = len(found & truth)
            rows.append({
                "task": task, "out_of_fold_accuracy": summary["tasks"][task]["out_of_fold_accuracy"],
                "flipped": len(truth), "suspects": len(found), "found": hits,
                "recall": hits / len(truth) if truth else float("nan"), "precision": hits / len(found) if found else float("nan"),
            })  # fmt: skip
    header = (
        f"bench/label_audit.py, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s; budget: "
        f"{', '.join([*BUDGET, *args.overrides])}; {args.share:.0%} of each task's training labels flipped (seed "
        f"{args.seed}); mtl audit-labels --folds {args.folds}"
    )
    lines = [
        header, "",
        "| task | out-of-fold accuracy (flipped labels count as wrong) | flipped | suspects | flipped found | recall | precision |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    lines += [
        f"| {r['task']} | {r['out_of_fold_accuracy']:.3f} | {r['flipped']} | {r['suspects']} | {r['found']} | {r['recall']:.3f} | {r['precision']:.3f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"setup": header, "results": rows}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
