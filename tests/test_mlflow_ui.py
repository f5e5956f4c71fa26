"""What the MLflow UI opens on: run names, the experiment's settings and its *Results* view, the per-task
table, read back from a real SQLite store (and from the UI bundle MLflow ships, for the tags it reads)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mtl_core.config import config_from_dict
from mtl_core.tracking.views import log_table_replacing
from mtl_core.tracking.runs import run_name
from mtl_core.tracking.store import setup_mlflow
from mtl_core.tracking.views import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, NOTE_TAG, PRIMARY_METRIC_TAG, publish_results_view, RESULTS_VIEW, results_view_path, task_table_markdown, VIEW_TAG_PREFIX

VIEW_TAG = VIEW_TAG_PREFIX + RESULTS_VIEW


def test_runs_are_named_after_what_they_trained():
    cfg = config_from_dict({"train": {"weighting": "famo"}, "model": {"backbone": "resnet18"}})
    assert run_name(cfg) == "mtl-famo-resnet18"
    assert run_name(cfg, "stl", task="shape") == "stl-shape-resnet18"
    assert run_name(cfg, "all_in_one") == "mtl-famo-resnet18-all-in-one"
    mmoe = config_from_dict({"train": {"weighting": "pcgrad"}, "model": {"arch": "mmoe", "backbone": "small_cnn"}})
    assert run_name(mmoe) == "mtl-pcgrad-mmoe-small_cnn"
    with pytest.raises(ValueError, match="needs its task"):
        run_name(cfg, "stl")


def _view(tags: dict[str, str]) -> dict:
    envelope = json.loads(tags[VIEW_TAG])
    assert envelope["name"] == "Results" and isinstance(envelope["createdAt"], int)  # the UI's envelope
    return json.loads(envelope["state"])


def test_a_new_experiment_opens_on_training_runs_with_the_results_view(tmp_path: Path):
    exp_id = setup_mlflow(config_from_dict({}), tmp_path)
    tags = MlflowClient().get_experiment(exp_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    # led and sorted by the default decision metric (compare.metrics[0]): balanced accuracy
    assert tags[PRIMARY_METRIC_TAG] == "test/mean/balanced_accuracy" and "mtl-<weighting>-<backbone>" in tags[NOTE_TAG]
    view = _view(tags)
    assert view["orderByKey"] == "metrics.`test/mean/balanced_accuracy`" and view["orderByAsc"] is False
    # after the run's name: Δm and the mean balanced accuracy, rounded, under headers a column shows whole
    assert view["selectedColumns"][:6] == [
        "metrics.`delta_m`", "metrics.`mean_bal_acc`", "metrics.`test/mean/accuracy`",
        "metrics.`compare/delta_m_pct/balanced_accuracy`", "metrics.`compare/delta_m_pct/accuracy`",
        "metrics.`test/mean/balanced_accuracy`",
    ]  # fmt: skip
    assert results_view_path(exp_id) == (
        f"/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={RESULTS_VIEW}"
    )

    # the evaluate stage adds a column per task, once; a second project's tasks come after them
    publish_results_view(exp_id, ["shape", "color"])
    first = MlflowClient().get_experiment(exp_id).tags[VIEW_TAG]
    columns = _view({VIEW_TAG: first})["selectedColumns"]
    assert columns[:6] == ["metrics.`delta_m`", "metrics.`mean_bal_acc`", "metrics.`test/mean/accuracy`"] + [
        f"metrics.`test/{t}/balanced_accuracy`" for t in ("shape", "color")
    ] + ["metrics.`compare/delta_m_pct/balanced_accuracy`"]
    publish_results_view(exp_id, ["shape", "color"])
    assert MlflowClient().get_experiment(exp_id).tags[VIEW_TAG] == first  # nothing to add: not rewritten
    publish_results_view(exp_id, ["digit"])
    columns = _view(MlflowClient().get_experiment(exp_id).tags)["selectedColumns"]
    assert "metrics.`test/shape/balanced_accuracy`" in columns and columns.index("metrics.`test/digit/balanced_accuracy`") == 3


def test_an_older_experiment_gets_the_missing_settings_and_keeps_the_users(tmp_path: Path):
    """An experiment created before these settings (or changed by its user in the UI) gets only what it
    lacks; a view saved from the UI (compressed state) is never rewritten."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("mtl-pipeline", tags={NOTE_TAG: "my notes"})
    user_view = json.dumps({"name": "Results", "createdAt": 1, "updatedAt": 1, "state": "H4sIAAAA-compressed"})
    client.set_experiment_tag(exp_id, VIEW_TAG, user_view)
    assert setup_mlflow(config_from_dict({"mlflow": {"tracking_uri": uri}}), tmp_path) == exp_id
    publish_results_view(exp_id, ["shape"])
    tags = client.get_experiment(exp_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND and tags[PRIMARY_METRIC_TAG] == "test/mean/balanced_accuracy"
    assert tags[NOTE_TAG] == "my notes" and tags[VIEW_TAG] == user_view


def test_the_mlflow_ui_reads_the_tags_and_url_parameters_we_set():
    """The view, the experiment kind and the workflow switch are settings of MLflow's UI, read in its
    JavaScript bundle: an MLflow upgrade that renames one fails here, not silently in users' browsers."""
    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    code = "\n".join(p.read_text(errors="ignore") for p in bundle.glob("*.js"))
    for name in (VIEW_TAG_PREFIX, "viewStateShareKey", "workflowType", "machine_learning", EXPERIMENT_KIND_TAG,
                 EXPERIMENT_KIND, PRIMARY_METRIC_TAG, '"selectedColumns"', '"columnOrder"'):  # fmt: skip
        assert name in code, name


def test_the_per_task_table_is_replaced_not_appended_when_evaluate_reruns(tmp_path: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run(experiment_id=mlflow.create_experiment("tables")) as run:
        log_table_replacing(pd.DataFrame({"task": ["a", "b"], "accuracy": [0.5, 0.75]}), "metrics/t.json")
        log_table_replacing(pd.DataFrame({"task": ["a", "b"], "accuracy": [0.25, 1.0]}), "metrics/t.json")
    table = MlflowClient().load_table(run.info.experiment_id, "metrics/t.json", run_ids=[run.info.run_id])
    assert list(table["accuracy"]) == [0.25, 1.0]  # mlflow.log_table alone would hold four rows
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [{"path": "metrics/t.json", "type": "table"}]


def test_the_task_table_marks_chance_by_counts_of_test_images():
    """`size` at exactly its majority rate, as a float32 accuracy of 1/3 writes it (above 1/3 as a float)."""
    per_task = {
        "size": {"accuracy": 0.3333333432674408, "balanced_accuracy": 0.3333, "f1_macro": 0.2, "support": 3},
        "color": {"accuracy": 1.0, "balanced_accuracy": 1.0, "f1_macro": 1.0, "auroc": 1.0, "support": 3},
    }
    mean = {"accuracy": 0.6667, "balanced_accuracy": 0.6667, "f1_macro": 0.6, "auroc": 1.0}
    table = task_table_markdown(per_task, mean, {"size": 1 / 3, "color": 1 / 3})
    assert "| size | 0.333 (chance) | 0.333 | 0.200 | n/a | 3 | 0.333 |" in table  # three classes: no AUROC
    assert "| color | 1.000 | 1.000 | 1.000 | 1.000 | 3 | 0.333 |" in table
    assert "| **mean** | **0.667** | **0.667** | 0.600 | 1.000 | | |" in table


def test_the_per_task_mlflow_table_has_the_imbalance_proof_metrics_as_columns():
    """The table logged with the run (TABLE_FILE): balanced accuracy for every task, AUROC and average
    precision for a two-class task and empty (null) for a three-class one, beside the majority rate."""
    from mtl_core.tracking.views import per_task_rows

    per_task = {
        "smiling": {"accuracy": 0.9, "balanced_accuracy": 0.5, "auroc": 0.5, "average_precision": 0.1, "support": 100},
        "size": {"accuracy": 0.6, "balanced_accuracy": 0.55, "support": 10},
    }
    rows = per_task_rows(per_task, {"smiling": 0.9, "size": 0.4})
    assert rows[0]["balanced_accuracy"] == 0.5 and rows[0]["auroc"] == 0.5 and rows[0]["average_precision"] == 0.1
    assert rows[1]["balanced_accuracy"] == 0.55 and rows[1]["auroc"] is None and rows[1]["average_precision"] is None
    frame = pd.DataFrame(rows)
    assert {"task", "accuracy", "balanced_accuracy", "auroc", "average_precision", "support", "majority_rate"} <= set(frame.columns)


def test_a_description_section_is_replaced_in_place_and_added_once():
    """The compare stage rewrites its section of a run's description each time it runs (evaluate wrote the
    rest): the section is replaced, not repeated, and what follows it is kept."""
    from mtl_core.tracking.views import with_section

    text = "intro\n\n| table |\n"
    once = with_section(text, "Δm", "first")
    assert once == "intro\n\n| table |\n\n### Δm\n\nfirst\n"
    assert with_section(once, "Δm", "second") == "intro\n\n| table |\n\n### Δm\n\nsecond\n"
    both = with_section(once, "other", "kept")
    assert with_section(both, "Δm", "new") == "intro\n\n| table |\n\n### other\n\nkept\n\n### Δm\n\nnew\n"
    assert with_section(both, "Δm", None) == "intro\n\n| table |\n\n### other\n\nkept\n"
