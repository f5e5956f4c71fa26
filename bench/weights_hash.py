"""Does a change of code leave training bit for bit the same? The sha256 of the trained weights.

Trains three fixed-seed small pipelines through the stages themselves (`mtl_core.pipeline.run_stage`:
ingest, preprocess, train) on the built-in data and prints the sha256 of each `models/model.safetensors`:

- `equal`: small_cnn, 600 built-in images, 2 epochs, equal weighting;
- `pcgrad`: the same with `train.weighting: pcgrad`;
- `groups`: the same with `model.task_groups: [[shape], [color, size, position]]`.

Run it before and after a refactor that must not change what training computes (issue #24 recorded
both sets in its note): equal hashes mean equal weights, to the last bit. A few minutes on 2 cores.

    python3 -m uv run python bench/weights_hash.py [--out hashes.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

BASE = {
    "data": {"builtin": {"num_images": 600, "seed": 0}},
    "model": {"backbone": "small_cnn"},
    "train": {"epochs": 2, "num_workers": 0, "seed": 0},
}
CASES: dict[str, dict] = {
    "equal": {"train": {"weighting": "equal"}},
    "pcgrad": {"train": {"weighting": "pcgrad"}},
    "groups": {"model": {"task_groups": [["shape"], ["color", "size", "position"]]}},
}


def deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_params(root: Path, overrides: dict) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_update(deep_update(params, BASE), overrides), sort_keys=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="also write the hashes to this JSON file")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()

    from mtl_core.pipeline import run_stage

    hashes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="mtl-weights-hash-") as tmp:
        data = Path(tmp) / "data-project"
        (data / "data" / "datasets").mkdir(parents=True)
        (data / "reports").mkdir()  # as in a clone of the repository, which has reports/ committed
        write_params(data, {})
        for stage in ("ingest", "preprocess"):
            run_stage(stage, root=data)
        for case in args.cases:
            root = Path(tmp) / case
            shutil.copytree(data, root)
            write_params(root, CASES[case])
            t0 = time.perf_counter()
            run_stage("train", root=root)
            hashes[case] = hashlib.sha256((root / "models" / "model.safetensors").read_bytes()).hexdigest()
            print(f"{case}: trained in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    print("| case | sha256 of models/model.safetensors |")
    print("|---|---|")
    for case, digest in hashes.items():
        print(f"| {case} | `{digest}` |")
    if args.out:
        args.out.write_text(json.dumps(hashes, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
