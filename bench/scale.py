"""How ingest and preprocess grow with the number of images: wall time, images/s and peak memory per stage.

For each size, generates the built-in shapes dataset (its files, timed on their own row), then runs the
two stages, each in a fresh process as `mtl <stage>` would, on its manifest as a user's CSV (so ingest
times the reading, hashing, decoding, duplicate search and split, not the generation), and prints a
Markdown table:

    python3 -m uv run python bench/scale.py [--sizes 6000 60000 300000] [--budget-s 600] \
        [--workdir /tmp/mtl-scale] [--out docs/benchmark-scale.md]

A size is skipped, with the reason printed, when its estimated time (linear in the images, from the
largest size run so far) would go past --budget-s, or its files would not fit on the disk.
The built-in images are generated in a process pool like the stages; the stages then find them in the
page cache (as a second run over a dataset would).

Memory, measured from outside the stage (Linux /proc, sampled every 50 ms over the stage's process and
its pool workers):
* private MB: the peak of the summed proportional anonymous memory (Pss_Anon) of all of them: what the
  stage itself holds, memory-mapped outputs, shared libraries and page cache aside (the issue's "peak
  memory, memory-mapped outputs aside"); flat as the images grow is the goal.
* max RSS MB: the resident high-water mark of the largest single process (getrusage via wait4),
  which counts the pages of the memory-mapped cache that process touched.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtl_core.data.disk import free_bytes, human_bytes  # noqa: E402
from mtl_core.data.parallel import available_cores  # noqa: E402

IMAGE_SIZE = 64
GENERATE = (
    "import sys; from pathlib import Path; from mtl_core.data.builtin.shapes import generate_shapes; "
    "from mtl_core.data.parallel import map_chunks; "
    "generate_shapes(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 0, "
    "mapper=lambda fn, chunks, n: map_chunks(fn, chunks, total=n, desc='generate', size=lambda c: c[2] - c[1]))"
)
STAGE = "import sys; from mtl_core.pipeline import run_stage; run_stage(sys.argv[1], root=sys.argv[2])"


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _pss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(command: list[str], cwd: Path) -> dict:
    """Run `command`; wall seconds, peak summed Pss_Anon of its process tree, its largest max RSS."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(_pss_anon_kb(p) for p in _tree(proc.pid)))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])}...: exit status {proc.returncode}")
    return {"wall_s": wall, "private_mb": peak / 1024, "max_rss_mb": usage.ru_maxrss / 1024}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[6000, 60000, 300000])
    parser.add_argument("--budget-s", type=float, default=600.0, help="skip a size whose estimated time is above this")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mtl-scale"))
    parser.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) here")
    args = parser.parse_args()

    project = args.workdir / "project"
    shutil.rmtree(args.workdir, ignore_errors=True)
    dataset = project / "data" / "datasets" / "shapes"
    project.mkdir(parents=True)
    bytes_per_image = IMAGE_SIZE * IMAGE_SIZE * 3  # upper bound of a PNG of noise; the cache holds this much
    sizes, notes = [], []
    for n in sorted(args.sizes):  # what fits the disk: the dataset once, the cache of one size at a time
        need = n * bytes_per_image * 2
        if need > free_bytes(args.workdir) * 0.9:
            free = human_bytes(free_bytes(args.workdir))
            notes.append(f"{n:,} images skipped: needs about {human_bytes(need)} of disk, {free} free")
        else:
            sizes.append(n)

    rows, seconds_per_image, last = [], None, 0  # generation + both stages, per image, at the last size run
    for n in sizes:
        if seconds_per_image is not None and n * seconds_per_image > args.budget_s:
            notes.append(
                f"{n:,} images skipped: about {n * seconds_per_image / 60:.0f} minutes estimated (generation and "
                f"both stages, linear from {last:,} images), over the {args.budget_s / 60:.0f}-minute budget"
            )
            continue
        started = time.perf_counter()
        shutil.rmtree(project / "data", ignore_errors=True)
        gen = measure([sys.executable, "-c", GENERATE, str(dataset), str(n), str(IMAGE_SIZE)], project)
        rows.append({"n": n, "stage": "generate (the built-in dataset's files)", **gen})
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["data"]["source"] = "data/datasets/shapes/labels.csv"  # as a user's CSV: ingest does not generate
        params["preprocess"]["image_size"] = IMAGE_SIZE
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for stage in ("ingest", "preprocess"):
            result = measure([sys.executable, "-c", STAGE, stage, str(project)], project)
            rows.append({"n": n, "stage": stage, **result})
        notes.append(
            f"{n:,} images: dataset {human_bytes(folder_bytes(dataset))}, "
            f"image cache {human_bytes(folder_bytes(project / 'data' / 'preprocessed'))}"
        )
        seconds_per_image = (time.perf_counter() - started) / n
        last = n
        print(f"{n} images done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    shutil.rmtree(project / "data", ignore_errors=True)

    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
        f"{available_cores()} cores, Python {platform.python_version()}; {IMAGE_SIZE}x{IMAGE_SIZE} PNGs; "
        "`python bench/scale.py`.",
        "",
        "| images | stage | wall s | images/s | private MB (all processes) | max RSS MB (largest process) |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['stage']} | {r['wall_s']:.1f} | {r['n'] / r['wall_s']:,.0f} | "
            f"{r['private_mb']:.0f} | {r['max_rss_mb']:.0f} |"
        )
    lines += ["", *[f"* {note}" for note in notes]]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
