"""Kill-anywhere soak: a small built-in pipeline killed N times at random moments, each time run again to
completion, and checked to have lost nothing.

Each kill starts from a fresh clone of the working tree (a git repository with DVC, its own MLflow
store): `dvc repro` runs and is SIGKILLed, its whole process group (DVC, the stage, its workers), either
by a timer (a random stage, a random moment within that stage's duration in the uninterrupted run) or by
the stage itself at a named fault point (mtl_core/faults.py: inside a checkpoint write, between a
checkpoint and its epoch's metrics, after `register` created its version), chosen at random. Then
`dvc repro` runs again, uninterrupted, and the result is checked:

* the final model's weights (models/model.safetensors) equal, by sha256, those of an uninterrupted run;
* the registry has one version per training run that reached it, and none twice, and alias `champion`
  where the uninterrupted run's gate put it (reports/registry.json's champion version);
* no MLflow run is RUNNING;
* `dvc status` is clean;
* no temporary file is left (`*.tmp`, `.*.tmp-*`, the ingest spool, a store probe).

    python3 -m uv run python bench/soak.py --weighting equal --kills 20 [--seed 0] [--out docs/...json]

Not a test (minutes per kill on 2 cores); its table is docs/benchmark-soak.md. Results are written after
every kill, so a run stopped early keeps its rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"Running stage '(\w+)'")
KILLABLE = ("ingest", "preprocess", "train", "evaluate", "register", "compare")
PARAMS = {
    "data": {"builtin": {"num_images": 240, "seed": 0}},
    "preprocess": {"augment": [{"name": "Affine", "translate_percent": [-0.03, 0.03], "p": 0.5}]},
    "model": {"backbone": "small_cnn"},
    "train": {"epochs": 2, "batch_size": 32, "num_workers": 0, "lr": 0.003, "checkpoint_every_steps": 2, "task_affinity_every": 3},
}
TEMPORARY = (re.compile(r".*\.tmp$"), re.compile(r"^\..*\.tmp-\d+$"), re.compile(r".*\.tmp-\d+$"),
             re.compile(r"^\.ingest-spool\.csv$"), re.compile(r".*\.probe-\d+$"), re.compile(r"^\..*\.creating-\d+$"))  # fmt: skip


def deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_template(dest: Path, weighting: str) -> Path:
    """A git repository of the working tree (tracked and untracked-not-ignored files), tiny params."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params = deep_update(params, deep_update(PARAMS, {"train": {"weighting": weighting}}))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=soak@example.com", "-c", "user.name=soak"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "soak"], cwd=dest, check=True)
    return dest


def env_for(project: Path, fault: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MTL_FAULT", None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # the clone's own mtl_core, not the working tree's that the virtual environment points at (an
    # editable install): each kill runs the code as it was when the soak started
    env["PYTHONPATH"] = str(project)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    if fault:
        env["MTL_FAULT"] = fault
        env["MTL_FAULT_ONCE"] = str(project / ".fault-fired")
    return env


class Repro:
    """`dvc repro` in its own process group, its output read as it comes, the stage it runs and when."""

    def __init__(self, project: Path, fault: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"], cwd=project, env=env_for(project, fault),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.stages: list[tuple[str, float]] = []  # (stage, monotonic time it started)
        self.started = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := STAGE_LINE.search(line):
                self.stages.append((m.group(1), time.monotonic()))

    def current(self) -> tuple[str | None, float]:
        if not self.stages:
            return None, 0.0
        stage, since = self.stages[-1]
        return stage, time.monotonic() - since

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 3600) -> int:
        code = self.proc.wait(timeout=timeout)
        self.kill_group()  # a fault kills only the stage: leave no worker behind
        self.reader.join(timeout=30)
        return code

    def durations(self) -> dict[str, float]:
        ends = [t for _, t in self.stages[1:]] + [time.monotonic()]
        return {s: end - t for (s, t), end in zip(self.stages, ends)}


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def store_state(project: Path) -> dict:
    """Runs by status, train runs, registry versions (run, alias) of the project's SQLite store, read with
    sqlite3 (no MLflow import: the soak's own process stays light)."""
    db = project / "mlflow.db"
    if not db.is_file():
        return {"running": [], "train_runs": [], "versions": [], "champion": None}
    con = sqlite3.connect(db)
    try:
        running = [r[0] for r in con.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING' AND lifecycle_stage = 'active'")]
        train_runs = [r[0] for r in con.execute(
            "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'mtl.stage' AND t.value = 'train' AND r.lifecycle_stage = 'active'"
        )]  # fmt: skip
        versions = [(str(v), rid) for v, rid in con.execute("SELECT version, run_id FROM model_versions ORDER BY version")]
        alias = con.execute("SELECT version FROM registered_model_aliases WHERE alias = 'champion'").fetchone()
    finally:
        con.close()
    return {"running": running, "train_runs": train_runs, "versions": versions, "champion": str(alias[0]) if alias else None}


def temporary_files(project: Path) -> list[str]:
    found = []
    for path in project.rglob("*"):
        rel = path.relative_to(project)
        if rel.parts[0] in (".dvc", ".git") or not path.is_file():
            continue
        if any(p.match(path.name) for p in TEMPORARY):
            found.append(str(rel))
    return found


def dvc_status_clean(project: Path) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=project, env=env_for(project), capture_output=True, text=True
    )  # fmt: skip
    return out.returncode == 0 and json.loads(out.stdout or "{}") == {}


@dataclass
class Row:
    kill: int
    how: str  # "timer" or "fault"
    target: str  # the stage aimed at, or the fault point
    stage: str | None  # the stage running when the kill came
    at_s: float  # seconds into that stage
    killed_rc: int
    rerun_rc: int = 0
    rerun_s: float = 0.0
    weights_equal: bool = False
    train_runs: int = 0
    versions: int = 0
    one_version_per_run: bool = False
    champion: str | None = None
    champion_ok: bool = False
    running: int = 0
    dvc_clean: bool = False
    temporary: list[str] = field(default_factory=list)
    outcome: str = ""


def checkpoint_saves(params: dict) -> int:
    """Checkpoint writes of the uninterrupted training: every checkpoint_every_steps steps, and each epoch's end."""
    train = params["train"]
    steps = -(-int(params["data"]["builtin"]["num_images"] * 0.7) // train["batch_size"])
    every = train["checkpoint_every_steps"]
    per_epoch = len([s for s in range(1, steps) if every and s % every == 0]) + 1
    return per_epoch * train["epochs"]


def plan_kill(rng: random.Random, durations: dict[str, float], saves: int, epochs: int) -> tuple[str, str, float]:
    """(how, target, delay): a fault point one time in three, else a timer in a random stage."""
    if rng.random() < 1 / 3:
        fault = rng.choice([
            f"checkpoint.before_rename:{rng.randint(1, saves)}",
            f"train.after_epoch_checkpoint:{rng.randint(1, epochs)}",
            "register.after_create_version",
        ])  # fmt: skip
        return "fault", fault, 0.0
    stage = rng.choice(KILLABLE)
    return "timer", stage, rng.uniform(0.0, max(0.5, durations.get(stage, 5.0)))


def one_kill(index: int, template: Path, work: Path, rng: random.Random, reference: dict, saves: int, epochs: int) -> Row:
    project = work / f"kill-{index:02d}"
    shutil.copytree(template, project, symlinks=True)
    how, target, delay = plan_kill(rng, reference["durations"], saves, epochs)
    repro = Repro(project, target if how == "fault" else None)
    stage, at = None, 0.0
    if how == "timer":
        while repro.proc.poll() is None:
            current, since = repro.current()
            seen = [s for s, _ in repro.stages]
            if current == target and since >= delay or (target in seen and current != target):
                stage, at = current, since  # past the aimed stage (it ended first): kill where we are
                repro.kill_group()
                break
            time.sleep(0.05)
        killed_rc = repro.wait()
        if stage is None:
            stage = "(finished first)"
    else:
        killed_rc = repro.wait()
        stage, at = repro.current()
    row = Row(index, how, target, stage, round(at, 2), killed_rc)

    start = time.monotonic()
    rerun = Repro(project)
    row.rerun_rc = rerun.wait()
    row.rerun_s = round(time.monotonic() - start, 1)
    state = store_state(project)
    row.weights_equal = sha256(project / "models" / "model.safetensors") == reference["weights"]
    row.train_runs = len(state["train_runs"])
    row.versions = len(state["versions"])
    version_runs = [rid for _, rid in state["versions"]]
    final_run = json.loads((project / "models" / "mlflow_run.json").read_text())["run_id"] if (project / "models" / "mlflow_run.json").is_file() else None
    row.one_version_per_run = len(set(version_runs)) == len(version_runs) and version_runs.count(final_run) == 1
    row.champion = state["champion"]
    report = json.loads((project / "reports" / "registry.json").read_text()) if (project / "reports" / "registry.json").is_file() else {}
    # where the gate puts it: on the final version when the uninterrupted run's gate made it champion
    expected = report.get("version") if reference["champion"] is not None else None
    row.champion_ok = state["champion"] == expected
    row.running = len(state["running"])
    row.dvc_clean = dvc_status_clean(project)
    row.temporary = temporary_files(project)
    ok = (row.rerun_rc == 0 and row.weights_equal and row.one_version_per_run and row.champion_ok and row.running == 0
          and row.dvc_clean and not row.temporary)  # fmt: skip
    row.outcome = "equal" if ok else "FAILED"
    if not ok:
        (work / f"kill-{index:02d}.log").write_text("".join(repro.lines) + "\n----- rerun -----\n" + "".join(rerun.lines))
    else:
        shutil.rmtree(project, ignore_errors=True)
    return row


def table(rows: list[Row], weighting: str) -> str:
    head = (
        "| # | kill | target | stage at the kill | s into it | rerun s | weights | train runs | versions | "
        "one per run | champion | RUNNING runs | dvc status | temp files | outcome |\n"
        + "|" + " --- |" * 15
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.kill} | {r.how} | `{r.target}` | {r.stage} | {r.at_s} | {r.rerun_s} | "
            f"{'equal' if r.weights_equal else 'DIFFER'} | {r.train_runs} | {r.versions} | "
            f"{'yes' if r.one_version_per_run else 'NO'} | {r.champion or '-'}{'' if r.champion_ok else ' (WRONG)'} | "
            f"{r.running} | {'clean' if r.dvc_clean else 'CHANGED'} | {', '.join(r.temporary) or 'none'} | {r.outcome} |"
        )
    done = sum(r.outcome == "equal" for r in rows)
    lines.append(f"\n`{weighting}`: {done} of {len(rows)} kills ended equal.")
    return "\n".join(lines)


def render(results: list[Path]) -> str:
    """The docs page's tables, one per JSON file that --out wrote (a weighting method each)."""
    parts = []
    for path in results:
        data = json.loads(path.read_text())
        rows = [Row(**r) for r in data["rows"]]
        ref = data["reference"]
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in ref["durations"].items())
        parts.append(
            f"## `{data['weighting']}` (seed {data['seed']})\n\nUninterrupted run: {ref['seconds']:.0f} s ({stages}); "
            f"weights sha256 `{ref['weights'][:16]}…`, champion version {ref['champion']}.\n\n{table(rows, data['weighting'])}\n"
        )
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weighting", default="equal")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder for the clones (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the rows (written after every kill)")
    parser.add_argument("--render", type=Path, nargs="+", default=None, metavar="JSON",
                        help="print the tables of these --out files as markdown, and run nothing")  # fmt: skip
    args = parser.parse_args()
    if args.render:
        print(render(args.render))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix=f"soak-{args.weighting}-"))
    work.mkdir(parents=True, exist_ok=True)
    template = make_template(work / "template", args.weighting)
    params = yaml.safe_load((template / "params.yaml").read_text())
    rng = random.Random(args.seed)

    ref_dir = work / "reference"
    shutil.copytree(template, ref_dir, symlinks=True)
    start = time.monotonic()
    ref = Repro(ref_dir)
    if ref.wait() != 0:
        raise SystemExit("the uninterrupted run failed:\n" + "".join(ref.lines)[-5000:])
    reference = {
        "weights": sha256(ref_dir / "models" / "model.safetensors"),
        "champion": json.loads((ref_dir / "reports" / "registry.json").read_text())["champion_version"],
        "durations": ref.durations(),
        "seconds": round(time.monotonic() - start, 1),
    }
    print(f"reference ({args.weighting}): {reference}", flush=True)
    rows: list[Row] = []
    for i in range(1, args.kills + 1):
        row = one_kill(i, template, work, rng, reference, checkpoint_saves(params), params["train"]["epochs"])
        rows.append(row)
        print(table([row], args.weighting).splitlines()[2], flush=True)
        if args.out:
            args.out.write_text(json.dumps({"weighting": args.weighting, "seed": args.seed, "reference": reference,
                                            "params": PARAMS, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")  # fmt: skip
    print(table(rows, args.weighting))


if __name__ == "__main__":
    main()
