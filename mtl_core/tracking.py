"""MLflow plumbing shared by the stages: where the store is, and which run a model belongs to.

One trained model has one MLflow run. `train` opens it and writes its id next to the model
(`models/mlflow_run.json`); `evaluate` and `register` reopen that run, so when DVC skips a cached stage,
the later stages still log into the run of the model they actually handle.

A DVC experiment queued with `dvc exp run --queue` runs its stages in a temporary copy of the project
(`.dvc/tmp/exps/...`); its runs go into the store of the project it came from (`$DVC_ROOT`), not into a
store inside that copy, which DVC deletes afterwards.

Several processes may share one SQLite store (two pipelines started at once, a DVC queue with several
workers, clones pointing `mlflow.tracking_uri` at one file). MLflow creates and migrates a fresh SQLite
store in whichever process touches it first, without a lock between processes, and two processes doing it
at once break the store (`table _alembic_tmp_experiments already exists`). `setup_mlflow` therefore opens a
SQLite store, and looks up or creates the experiment, under a file lock next to the database
(`mlflow.db.lock`). After that, concurrent writes are left to SQLite: MLflow sets `PRAGMA busy_timeout =
20000` on each of its sessions, so a writer waits up to 20 s for another one instead of failing with
"database is locked". Several machines (or clones that should not write artifacts into one another's
folders) need an MLflow server instead, see README "Several pipelines, one store".

MLflow is imported where it is used, not with this module: `mtl predict` resolves the project's store here
and reads a local champion without MLflow's two seconds of imports (registry/prediction.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mtl_core.paths import ProjectPaths

if TYPE_CHECKING:
    import mlflow

    from mtl_core.config import PipelineConfig

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# How long a process waits for another one to create / migrate a SQLite store (a fresh store takes a few
# seconds, a migration of a large one can take minutes).
STORE_LOCK_TIMEOUT_S = 600.0

# How the MLflow UI (3.x) shows the experiment. Its GenAI / "Model training" switch is a setting of each
# browser (default GenAI) that `?workflowType=machine_learning` in a URL overrides; MLflow UIs that pick
# the view from the experiment read the experiment-kind tag instead, so both are set (README: MLflow).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" / "Model training" experiments
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"  # the chart view leads with it
# the default decision metric (compare.metrics[0], config.CompareConfig): a head that always answers its
# majority class scores chance on it, where its accuracy looks good
PRIMARY_METRIC = "test/mean/balanced_accuracy"
NOTE_TAG = "mlflow.note.content"  # the description of an experiment or a run (markdown)
# A saved view of the runs table is an experiment tag `mlflow.sharedViewState.<key>` (the UI's Views menu,
# and the URL `...#/experiments/<id>/runs?viewStateShareKey=<key>`): the runs table, by default, shows no
# metric column at all; this view shows the test accuracies and Δm, best run first.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RESULTS_VIEW = "mtl-results"
RESULTS_VIEW_NAME = "Results"
EXPERIMENT_NOTE = """Runs of the mtl-pipeline, named after what they trained:

* `mtl-<weighting>-<backbone>`: a multi-task model (`mtl-famo-resnet18`; the architecture is named when it is
  not hard sharing, `-groups` marks a model of task groups); its description has the per-task test table;
* `stl-<task>-<backbone>`: the single-task baseline of one task, for Δm (`compare/delta_m_pct/<metric>`).

The saved view *Results* (Views menu) shows the mean test balanced accuracy and accuracy, the balanced
accuracy of every task and Δm, best run first (balanced accuracy: a head that always answers the majority
class scores chance, 1/classes, however imbalanced the task).
"""


def store_root(root: Path) -> Path:
    """Where the project's local MLflow store lives: `root`, or, when `root` is the temporary copy a queued
    DVC experiment runs in (inside `$DVC_ROOT/.dvc/tmp`), the project DVC copied it from."""
    root = root.resolve()
    dvc_root = os.environ.get("DVC_ROOT")
    if dvc_root and root.is_relative_to(Path(dvc_root).resolve() / ".dvc" / "tmp"):
        return Path(dvc_root).resolve()
    return root


def tracking_uri(cfg: PipelineConfig, root: Path) -> str:
    """$MLFLOW_TRACKING_URI, else params' mlflow.tracking_uri, else the project's SQLite file."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or cfg.mlflow.tracking_uri
        or f"sqlite:///{(store_root(root) / DEFAULT_DB).as_posix()}"
    )


def experiment_tags(cfg: PipelineConfig) -> dict[str, str]:
    """The method of a run as tags (`mtl.weighting`, `mtl.arch`, `mtl.backbone`), and the DVC experiment
    it belongs to when there is one: `dvc.exp_name` and `dvc.exp_baseline_rev` (the commit the experiment
    started from), from the `$DVC_EXP_NAME` and `$DVC_EXP_BASELINE_REV` that `dvc exp run` sets."""
    tags = {"mtl.weighting": cfg.train.weighting, "mtl.arch": cfg.model.arch, "mtl.backbone": cfg.model.backbone}
    for tag, var in (("dvc.exp_name", "DVC_EXP_NAME"), ("dvc.exp_baseline_rev", "DVC_EXP_BASELINE_REV")):
        if value := os.environ.get(var):
            tags[tag] = value
    return tags


def run_name(cfg: PipelineConfig, kind: str = "mtl", task: str | None = None) -> str:
    """A run's name in the MLflow UI: what it trained, short enough for the runs table's name column.

    * `mtl`: the multi-task model, `mtl-<weighting>-<backbone>` (`mtl-famo-resnet18`), with the architecture
      when it is not hard sharing (`mtl-famo-mmoe-resnet18`) and `-groups` for a grouped model;
    * `stl`: the single-task baseline of `task`, `stl-<task>-<backbone>` (`stl-shape-resnet18`);
    * `all_in_one`: the ungrouped multi-task reference of a grouped model, `mtl-...-all-in-one`.
    """
    arch = "" if cfg.model.arch == "hard_sharing" else f"-{cfg.model.arch}"
    method = f"mtl-{cfg.train.weighting}{arch}-{cfg.model.backbone}"
    if kind == "mtl":
        return method + ("-groups" if cfg.model.task_groups else "")
    if kind == "stl":
        if not task:
            raise ValueError("a single-task run name needs its task")
        return f"stl-{task}-{cfg.model.backbone}"
    if kind == "all_in_one":
        return f"{method}-all-in-one"
    raise ValueError(f"unknown run kind {kind!r}: expected mtl, stl or all_in_one")


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a `sqlite:` tracking URI (absolute); None for other stores and in-memory SQLite."""
    if not uri.startswith("sqlite:///"):  # `sqlite://` is an in-memory database
        return None
    database = uri.removeprefix("sqlite:///").split("?", 1)[0]  # `sqlite:////abs/db`, `sqlite:///rel/db`
    if not database or database == ":memory:":
        return None
    return Path(database).absolute()


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold `<db>.lock`, the inter-process lock of a SQLite store, for the body; a no-op for other stores."""
    db = sqlite_db_path(uri)
    if db is None:
        yield
        return
    import filelock

    db.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(f"{db}.lock", timeout=STORE_LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RuntimeError(
            f"{lock.lock_file}: another process has been initialising the MLflow store {db} for more than "
            f"{STORE_LOCK_TIMEOUT_S:.0f} s. If no such process is running, the lock is stale (a network file "
            "system?); for pipelines on several machines use an MLflow server (README: Several pipelines, "
            "one store) instead of one SQLite file."
        ) from None
    try:
        yield
    finally:
        lock.release()


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: for a SQLite store, `mlartifacts/` next to the database
    (the project's own store: inside the project; a store shared by several clones: beside the shared file,
    not in whichever clone created the experiment); for a server, None, i.e. the server's artifact root
    (with `mlflow server --artifacts-destination`, its artifact proxy)."""
    db = sqlite_db_path(uri)
    return (db.parent / DEFAULT_ARTIFACTS).as_uri() if db is not None else None


def _initialise_store(uri: str) -> None:
    """Make MLflow create / migrate the tables of the store now (it does so lazily, on the first use of its
    tracking store and, separately, of its registry store, both in the same SQLite file)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    client.search_experiments(max_results=1)
    if mlflow.get_registry_uri() == uri:
        client.search_registered_models(max_results=1)


def _experiment_id(name: str, location: str | None) -> str:
    """The id of experiment `name`, created when missing. Another process may create it between our look-up
    and our create (a server store, where no lock of ours applies): then read it again."""
    import mlflow
    from mlflow.exceptions import MlflowException

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        _complete_experiment_tags(exp.experiment_id, exp.tags)
        return exp.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags=ui_experiment_tags())
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := mlflow.get_experiment_by_name(name)) is None:
            raise
        return exp.experiment_id


def results_view_state(tasks: list[str] | tuple[str, ...] = (), keep: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The runs table of the saved view *Results*: the mean test balanced accuracy, the mean accuracy, the
    per-task balanced accuracy, Δm on both and the registered model as columns (then those of `keep` not
    among them), sorted by the mean test balanced accuracy, best first."""
    metrics = [
        PRIMARY_METRIC, "test/mean/accuracy", *(f"test/{t}/balanced_accuracy" for t in tasks),
        "compare/delta_m_pct/balanced_accuracy", "compare/delta_m_pct/accuracy",
    ]  # fmt: skip
    ours = [f"metrics.`{m}`" for m in metrics] + ["attributes.`Models`", "attributes.`Dataset`"]
    columns = list(dict.fromkeys([*ours, *keep]))
    return {
        "orderByKey": f"metrics.`{PRIMARY_METRIC}`", "orderByAsc": False,
        "selectedColumns": columns, "columnOrder": columns,
    }  # fmt: skip


def results_view_tag(tasks: list[str] | tuple[str, ...] = (), keep: list[str] | tuple[str, ...] = ()) -> tuple[str, str]:
    """(tag key, value) of the saved view: the UI's envelope {name, createdAt, updatedAt, state}, whose
    `state` is the JSON of the view (the UI saves it compressed, and reads it either way)."""
    now_ms = int(time.time() * 1000)
    state = json.dumps(results_view_state(tasks, keep))
    value = {"name": RESULTS_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": state}
    return VIEW_TAG_PREFIX + RESULTS_VIEW, json.dumps(value)


def results_view_path(experiment_id: str) -> str:
    """The UI path (after the server's address) that opens the experiment's runs on the *Results* view,
    in the "Model training" mode whatever the browser had chosen."""
    return f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={RESULTS_VIEW}"


def ui_experiment_tags() -> dict[str, str]:
    """The tags a new experiment gets: opens on training runs, leads with the mean test accuracy, says what
    its runs are, and has the *Results* view (without per-task columns until a model is evaluated)."""
    key, view = results_view_tag()
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, PRIMARY_METRIC_TAG: PRIMARY_METRIC, NOTE_TAG: EXPERIMENT_NOTE, key: view}


def _complete_experiment_tags(experiment_id: str, tags: dict[str, str]) -> None:
    """Give an experiment created before these settings the missing ones; what is set is left alone (a
    user may have chosen another kind, written another description or changed the view in the UI)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in ui_experiment_tags().items():
        if key not in tags:
            client.set_experiment_tag(experiment_id, key, value)


def publish_results_view(experiment_id: str, tasks: list[str]) -> None:
    """Give the *Results* view a test balanced-accuracy column for each of `tasks` (the evaluate stage knows them),
    keeping the columns it has (another project's tasks in the same experiment).

    A view saved from the UI (its state compressed, which this does not read) is the user's: left alone."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    key, _ = results_view_tag()
    current = client.get_experiment(experiment_id).tags.get(key)
    shown: list[str] = []
    if current is not None:
        try:
            shown = list(json.loads(json.loads(current)["state"])["selectedColumns"])
        except (ValueError, KeyError, TypeError):
            return
    wanted = results_view_state(tasks, keep=shown)["selectedColumns"]
    if wanted != shown:
        client.set_experiment_tag(experiment_id, key, results_view_tag(tasks, keep=shown)[1])


def setup_mlflow(cfg: PipelineConfig, root: Path) -> str:
    """Point MLflow at the store and experiment; return the experiment id.

    A SQLite store is created or migrated, and the experiment looked up or created, under the store's file
    lock, so several processes can start on one fresh store at the same moment.
    """
    import mlflow

    uri = tracking_uri(cfg, root)
    user_setting = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow 3 also exports the URI as $MLFLOW_TRACKING_URI; restore the user's own setting, or the next
    # project handled in this process (a flow, a test session) would silently log into this store.
    if user_setting is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_setting
    with store_lock(uri):
        if sqlite_db_path(uri) is not None:
            _initialise_store(uri)
        exp_id = _experiment_id(cfg.mlflow.experiment, artifact_location(uri))
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


# --------------------------------------------------------------------- per-task results in the UI
# A mean over tasks hides a task the model does not learn, so the run's and the model version's
# descriptions lead with the table of all tasks, each beside its majority-class rate (what always
# answering the test split's most frequent class scores: an accuracy at or below it is chance); the same
# table is logged with the run as an MLflow table, which the UI sorts.

TABLE_FILE = "metrics/test_per_task.json"  # run artifact of mlflow.log_table
# the columns of the table (evaluation/metrics.py; auroc and average_precision: two-class tasks, else null)
TABLE_METRICS = (
    "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc", "average_precision",
)  # fmt: skip


def per_task_rows(per_task: Mapping[str, Mapping[str, float]], majority: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per task: its test metrics, labelled test images (`support`) and majority-class rate."""
    rows = []
    for task, values in per_task.items():
        row: dict[str, Any] = {"task": task}
        row.update({m: _number(values.get(m)) for m in TABLE_METRICS})
        row["support"] = int(values.get("support", 0))
        row["majority_rate"] = _number((majority or {}).get(task))
        rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def task_table_markdown(
    per_task: Mapping[str, Mapping[str, float]], mean: Mapping[str, float], majority: Mapping[str, float] | None = None
) -> str:
    """The markdown table: a row per task (accuracy, balanced accuracy, macro F1, AUROC of a two-class
    task, labelled test images, majority-class rate, a mark where the accuracy is no better than that
    rate), then the mean over tasks (AUROC: over the two-class tasks)."""
    lines = [
        "| task | accuracy | balanced acc. | macro F1 | AUROC | test images | majority class |",
        "|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for row in per_task_rows(per_task, majority):
        accuracy, chance, n = row["accuracy"], row["majority_rate"], row["support"]
        # compared as counts of test images, as the champion gate does: a float32 accuracy of 1/3 is above 1/3
        at_chance = accuracy is not None and chance is not None and n and round(accuracy * n) <= round(chance * n)
        mark = " (chance)" if at_chance else ""
        lines.append(
            f"| {row['task']} | {_cell(accuracy)}{mark} | {_cell(row['balanced_accuracy'])} | {_cell(row['f1_macro'])} "
            f"| {_cell(row['auroc'])} | {row['support']} | {_cell(chance)} |"
        )
    means = [_cell(_number(mean.get(m))) for m in ("accuracy", "balanced_accuracy", "f1_macro", "auroc")]
    lines.append(f"| **mean** | **{means[0]}** | **{means[1]}** | {means[2]} | {means[3]} | | |")
    return "\n".join(lines)


def run_description(
    name: str, what: str, per_task: Mapping[str, Mapping[str, float]], mean: Mapping[str, float],
    majority: Mapping[str, float] | None = None,
) -> str:
    """The run's description (`mlflow.note.content`): what it trained, then its per-task test table."""
    return (
        f"**{name}**: {what}\n\n"
        f"Test split, per task:\n\n{task_table_markdown(per_task, mean, majority)}\n\n"
        f"(Sortable: artifact `{TABLE_FILE}`; *(chance)*: no better than always answering the test split's "
        "most frequent class.)\n"
    )


def version_description(
    run_name: str, run_id: str, gate: str, per_task: Mapping[str, Mapping[str, float]], mean: Mapping[str, float],
    majority: Mapping[str, float] | None = None,
) -> str:
    """The model version's description: its run, the champion gate's verdict, the per-task test table."""
    return (
        f"Trained by run **{run_name}** (`{run_id}`). Champion gate: {gate}.\n\n"
        f"Test split, per task:\n\n{task_table_markdown(per_task, mean, majority)}\n"
    )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in 1 MiB blocks (model weights, data caches)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ingested_data_hash(root: Path) -> dict[str, str]:
    """The DVC hash of the ingested manifest as recorded in dvc.lock, plus its content hash.

    The DVC hash ties the run to `dvc.lock`; the manifest hash also works when a stage runs outside DVC.
    """
    paths = ProjectPaths(root)
    tags: dict[str, str] = {}
    if paths.manifest.is_file():
        tags["data.manifest_sha256"] = hashlib.sha256(paths.manifest.read_bytes()).hexdigest()
    lock = root / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("ingest", {}).get("outs", []):
            if out.get("path") == "data/ingested/manifest.csv" and "md5" in out:
                tags["dvc.data_md5"] = out["md5"]
    return tags


def write_run_info(paths: ProjectPaths, run_id: str, experiment_id: str) -> None:
    paths.run_info.write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id}, indent=2) + "\n")


def read_run_info(paths: ProjectPaths) -> dict[str, str]:
    if not paths.run_info.is_file():
        raise FileNotFoundError(f"{paths.run_info}: no MLflow run recorded for this model; run the train stage first")
    return json.loads(paths.run_info.read_text())


@contextmanager
def model_run(cfg: PipelineConfig, root: Path) -> Iterator[mlflow.ActiveRun]:
    """Reopen the MLflow run of the model in `models/`."""
    import mlflow

    setup_mlflow(cfg, root)
    info = read_run_info(ProjectPaths(root))
    with mlflow.start_run(run_id=info["run_id"]) as run:
        yield run
