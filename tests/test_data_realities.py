"""Data realities: missing labels, per-sample weights, class weights and label smoothing.

Expected values are computed by hand or by formula, never by calling the code under test twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from mtl_core.config import ConfigError, config_from_dict, load_config
from mtl_core.data.builtin.shapes import generate_shapes
from mtl_core.data.dataset import CachedMultiTaskDataset
from mtl_core.data.manifest import IngestError
from mtl_core.stages.ingest import run_ingest
from mtl_core.stages.preprocess import run_preprocess
from mtl_core.losses import TaskLoss, inverse_frequency_weights, weighted_cross_entropy
from mtl_core.models import build_model
from mtl_core.paths import SPLITS, ProjectPaths
from mtl_core.pipeline import run_stage
from mtl_core.tasks import MISSING_LABEL, TaskSpec
from mtl_core.tracking.runs import read_run_info
from mtl_core.tracking.store import tracking_uri
from mtl_core.training.normalisation import resolve_normalisation
from mtl_core.transforms import eval_transform
from tests.conftest import write_params
from tests.test_ingest import make_faces

M = MISSING_LABEL
TASKS = ["gender", "age_group", "glasses"]


def cfg_for(csv: Path, **data):
    return config_from_dict({"data": {"source": str(csv), **data}, "preprocess": {"image_size": 16}})


def blank(csv: Path, cells: dict[int, list[str]], **columns) -> None:
    """Empty the given (row -> task columns) cells of the manifest; add extra columns."""
    df = pd.read_csv(csv, dtype=str)
    for row, tasks in cells.items():
        df.loc[row, tasks] = ""
    for name, values in columns.items():
        df[name] = values
    df.to_csv(csv, index=False)


# --- config -------------------------------------------------------------------------------------------


def test_new_keys_default_to_the_previous_behaviour():
    cfg = config_from_dict({})
    assert cfg.data.missing_labels == "reject" and cfg.data.sample_weight_column is None
    assert cfg.train.class_weights == "none" and cfg.train.label_smoothing == 0.0


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"key 'data.missing_labels'.*'keep'"):
        config_from_dict({"data": {"missing_labels": "keep"}})
    with pytest.raises(ConfigError, match=r"key 'train.label_smoothing'"):
        config_from_dict({"train": {"label_smoothing": 1.0}})
    with pytest.raises(ConfigError, match=r"key 'train.class_weights'.*'inverse'"):
        config_from_dict({"train": {"class_weights": "inverse"}})
    with pytest.raises(ConfigError, match=r"key 'train.class_weights'.*task 'shape', class 'circle'.*>= 0"):
        config_from_dict({"train": {"class_weights": {"shape": {"circle": -1}}}})
    # YAML reads a class named 0 as a number: class names are strings
    cfg = config_from_dict({"train": {"class_weights": {"digit": {0: 2}}}})
    assert cfg.train.class_weights == {"digit": {"0": 2.0}}


# --- ingest ---------------------------------------------------------------------------------------------


def test_missing_labels_allow_keeps_partial_rows_and_counts_them(tmp_path: Path):
    csv = make_faces(tmp_path, n=40)
    # data row i is CSV line i + 2
    blank(csv, {1: ["glasses"], 2: ["age_group"], 4: ["gender", "glasses"], 3: TASKS})
    result = run_ingest(cfg_for(csv, missing_labels="allow", max_rejected_fraction=0.1), tmp_path)

    rejected = pd.read_csv(result.rejected)
    assert rejected[["row", "reason"]].values.tolist() == [[5, "no label for any task"]]
    manifest = pd.read_csv(result.manifest, dtype=str, keep_default_na=False, converters={"row": int}).set_index("row")
    assert len(manifest) == 39
    assert manifest.loc[3, "glasses"] == "" and manifest.loc[3, "gender"] == "m"
    assert manifest.loc[6, "gender"] == manifest.loc[6, "glasses"] == "" and manifest.loc[6, "age_group"] == "adult"

    report = json.loads(result.report.read_text())
    assert report["missing_labels"] == {"gender": 1, "age_group": 1, "glasses": 2}
    assert report["tasks"]["glasses"] == ["no", "yes"]  # the empty cell is not a class
    for t in TASKS:
        by_split = report["labelled_counts"][t]
        assert sum(by_split.values()) == 39 - report["missing_labels"][t]
        for s in SPLITS:
            part = manifest[manifest["split"] == s]
            assert by_split[s] == int((part[t] != "").sum())
            assert sum(report["class_counts"][t][s].values()) == by_split[s]
    # the row with an empty glasses cell landed in some split, where it is counted as unlabelled
    split_of_3 = manifest.loc[3, "split"]
    assert report["labelled_counts"]["glasses"][split_of_3] == report["split_sizes"][split_of_3] - int(
        ((manifest["split"] == split_of_3) & (manifest["glasses"] == "")).sum()
    )


def test_missing_labels_reject_is_the_default(tmp_path: Path):
    csv = make_faces(tmp_path, n=40)
    blank(csv, {1: ["glasses"], 3: TASKS})
    result = run_ingest(cfg_for(csv, max_rejected_fraction=0.1), tmp_path)
    reasons = pd.read_csv(result.rejected).set_index("row")["reason"]
    assert reasons[3] == "missing label for task(s) 'glasses'"
    assert reasons[5] == "missing label for task(s) 'gender', 'age_group', 'glasses'"
    assert json.loads(result.report.read_text())["missing_labels"] == {t: 0 for t in TASKS}


def test_a_task_still_needs_two_labelled_classes(tmp_path: Path):
    csv = make_faces(tmp_path, n=20)
    df = pd.read_csv(csv, dtype=str)
    df["glasses"] = ["yes" if i < 2 else "" for i in range(20)]
    df.to_csv(csv, index=False)
    with pytest.raises(IngestError, match=r"task 'glasses' has a single class \('yes'\)"):
        run_ingest(cfg_for(csv, missing_labels="allow"), tmp_path)
    df["glasses"] = ""
    df.to_csv(csv, index=False)
    with pytest.raises(IngestError, match=r"task 'glasses' has no label among the valid rows"):
        run_ingest(cfg_for(csv, missing_labels="allow"), tmp_path)


def test_sample_weight_column_is_checked_carried_and_not_a_task(tmp_path: Path):
    csv = make_faces(tmp_path, n=40)
    weights = [str(0.5 * (i % 4)) for i in range(40)]
    weights[5], weights[6], weights[7] = "abc", "-1", ""
    blank(csv, {}, w=weights)
    result = run_ingest(cfg_for(csv, sample_weight_column="w", max_rejected_fraction=0.1), tmp_path)
    reasons = pd.read_csv(result.rejected, keep_default_na=False).set_index("row")["reason"]
    assert reasons.to_dict() == {
        7: "sample weight column 'w': not a number ('abc')",
        8: "sample weight column 'w': negative ('-1')",
        9: "sample weight column 'w': not a number ('')",
    }
    manifest = pd.read_csv(result.manifest)
    assert list(manifest.columns) == ["row", "path", *TASKS, "w", "split"]
    assert manifest["w"].tolist() == [0.5 * ((r - 2) % 4) for r in manifest["row"]]
    assert list(json.loads(result.report.read_text())["tasks"]) == TASKS


def test_missing_sample_weight_column_names_it_and_the_columns_found(tmp_path: Path):
    csv = make_faces(tmp_path, n=20)
    with pytest.raises(IngestError, match=r"sample weight column 'weight'.*columns found: path, gender, age_group, glasses"):
        run_ingest(cfg_for(csv, sample_weight_column="weight"), tmp_path)
    with pytest.raises(IngestError, match=r"column 'glasses' is the sample weight column.*cannot also be a task"):
        run_ingest(cfg_for(csv, sample_weight_column="glasses", tasks=["gender", "glasses"]), tmp_path)


# --- preprocess and dataset -------------------------------------------------------------------------------


def test_preprocess_writes_missing_labels_and_weights(tmp_path: Path):
    csv = make_faces(tmp_path, n=40)
    blank(csv, {1: ["glasses"], 2: ["age_group"], 4: ["gender", "glasses"]}, w=[str(i / 4) for i in range(40)])
    cfg = cfg_for(csv, missing_labels="allow", sample_weight_column="w")
    run_ingest(cfg, tmp_path)
    run_preprocess(cfg, tmp_path)
    paths = ProjectPaths(tmp_path)
    assert TaskSpec.load(paths.tasks_file).classes == {
        "gender": ["f", "m"], "age_group": ["adult", "senior", "young"], "glasses": ["no", "yes"],
    }  # fmt: skip
    manifest = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
    encoding = {"gender": {"f": 0, "m": 1}, "age_group": {"adult": 0, "senior": 1, "young": 2}, "glasses": {"no": 0, "yes": 1}}
    minus_ones = 0
    for s in SPLITS:
        part = manifest[manifest["split"] == s].reset_index(drop=True)
        labels = np.load(paths.labels_cache(s))
        expected = np.array([[encoding[t].get(v, -1) for t, v in zip(TASKS, row)] for row in part[TASKS].values])
        np.testing.assert_array_equal(labels, expected.reshape(len(part), 3))
        minus_ones += int((labels == -1).sum())
        weights = np.load(paths.weights_cache(s))
        assert weights.dtype == np.float32
        np.testing.assert_array_equal(weights, [(int(r) - 2) / 4 for r in part["row"]])
        data = CachedMultiTaskDataset(
            paths.images_cache(s), paths.labels_cache(s), eval_transform(resolve_normalisation(cfg).preprocess), paths.weights_cache(s)
        )
        item = data[0]
        assert len(item) == 3 and float(item[2]) == weights[0] and item[1].tolist() == labels[0].tolist()
    assert minus_ones == 4


def test_preprocess_writes_unit_weights_without_a_weight_column(tmp_path: Path):
    cfg = cfg_for(make_faces(tmp_path, n=20))
    run_ingest(cfg, tmp_path)
    run_preprocess(cfg, tmp_path)
    paths = ProjectPaths(tmp_path)
    for s in SPLITS:
        weights = np.load(paths.weights_cache(s))
        assert weights.dtype == np.float32 and weights.shape == (len(np.load(paths.labels_cache(s))),)
        assert (weights == 1.0).all()


# --- losses -----------------------------------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 1.5], [1.0, -2.0, 0.5]])
TARGETS = torch.tensor([0, 2, 1, M, 1])


def nll(logits: torch.Tensor) -> torch.Tensor:
    """-log softmax, by hand."""
    z = logits - logits.max(dim=1, keepdim=True).values
    return -(z - z.exp().sum(dim=1, keepdim=True).log())


def test_sample_weights_give_the_weighted_mean_over_labelled_samples():
    w = torch.tensor([1.0, 2.0, 0.5, 7.0, 0.0])
    per = nll(LOGITS)[torch.arange(5), TARGETS.clamp_min(0)]
    # labelled: 0, 1, 2, 4; sample 3 (missing) is out whatever its weight
    expected = (1.0 * per[0] + 2.0 * per[1] + 0.5 * per[2] + 0.0 * per[4]) / (1.0 + 2.0 + 0.5 + 0.0)
    assert float(weighted_cross_entropy(LOGITS, TARGETS, w)) == pytest.approx(float(expected), rel=1e-6)
    # unit weights: the plain mean over the labelled samples
    assert float(weighted_cross_entropy(LOGITS, TARGETS)) == pytest.approx(float(per[[0, 1, 2, 4]].mean()), rel=1e-6)


def test_zero_weight_and_missing_label_samples_get_exactly_zero_gradient():
    logits = LOGITS.clone().requires_grad_(True)
    w = torch.tensor([1.0, 2.0, 0.5, 7.0, 0.0])
    weighted_cross_entropy(logits, TARGETS, w, torch.tensor([1.0, 3.0, 0.5]), label_smoothing=0.2).backward()
    assert torch.equal(logits.grad[3], torch.zeros(3)) and torch.equal(logits.grad[4], torch.zeros(3))
    assert all(torch.count_nonzero(logits.grad[i]) == 3 for i in (0, 1, 2))
    # removing the zero-weight sample changes nothing
    kept = [0, 1, 2, 3]
    assert float(weighted_cross_entropy(LOGITS, TARGETS, w)) == pytest.approx(
        float(weighted_cross_entropy(LOGITS[kept], TARGETS[kept], w[kept])), rel=1e-6
    )


def test_class_and_sample_weights_formula():
    c = torch.tensor([1.0, 3.0, 0.5])
    s = torch.tensor([1.0, 2.0, 0.5, 7.0, 4.0])
    per = nll(LOGITS)[torch.arange(5), TARGETS.clamp_min(0)]
    lab = [0, 1, 2, 4]
    cy = c[TARGETS.clamp_min(0)]
    expected = sum(s[i] * cy[i] * per[i] for i in lab) / sum(s[i] * cy[i] for i in lab)
    assert float(weighted_cross_entropy(LOGITS, TARGETS, s, c)) == pytest.approx(float(expected), rel=1e-6)
    # with unit sample weights: PyTorch's own class-weighted mean (divides by the targets' class weights)
    assert float(weighted_cross_entropy(LOGITS, TARGETS, None, c)) == pytest.approx(
        float(F.cross_entropy(LOGITS, TARGETS, weight=c, ignore_index=M)), rel=1e-6
    )


def test_label_smoothing_formula():
    eps = 0.1
    logp = nll(LOGITS)
    lab = [0, 1, 2, 4]
    per = [(1 - eps) * logp[i, TARGETS[i]] + eps * logp[i].mean() for i in lab]
    expected = sum(per) / len(lab)
    assert float(weighted_cross_entropy(LOGITS, TARGETS, label_smoothing=eps)) == pytest.approx(float(expected), rel=1e-6)
    s = torch.tensor([1.0, 2.0, 0.5, 7.0, 4.0])
    expected_w = sum(s[i] * p for i, p in zip(lab, per)) / sum(s[i] for i in lab)
    assert float(weighted_cross_entropy(LOGITS, TARGETS, s, label_smoothing=eps)) == pytest.approx(float(expected_w), rel=1e-6)


def test_no_labelled_sample_gives_zero_loss_in_the_graph():
    logits = LOGITS.clone().requires_grad_(True)
    loss = weighted_cross_entropy(logits, torch.full((5,), M), torch.ones(5), torch.tensor([1.0, 2.0, 3.0]), 0.3)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # all labelled samples weigh 0: also 0, not nan
    assert float(weighted_cross_entropy(LOGITS, TARGETS, torch.zeros(5))) == 0.0


def test_inverse_frequency_weights_formula():
    labels = np.array([0, 0, 0, 1, M, 2, 2, 0])
    # N = 7 labelled, C = 4, n = [4, 1, 2, 0]: w_c = N / (C n_c); the class with no sample weighs 1
    np.testing.assert_allclose(inverse_frequency_weights(labels, 4), [7 / 16, 7 / 4, 7 / 8, 1.0])
    w = inverse_frequency_weights(np.array([0, 1, 1, 1]), 2)
    np.testing.assert_allclose(w, [2.0, 2 / 3])
    assert (w * np.bincount([0, 1, 1, 1])).sum() == pytest.approx(4)  # averages to 1 over the samples


SPEC = TaskSpec({"shape": ["circle", "square", "star"], "color": ["blue", "red"]})
TRAIN_LABELS = np.array([[0, 1], [0, M], [1, 0], [2, 1], [0, 1]])


def test_task_loss_from_config():
    inv = TaskLoss.from_config(config_from_dict({"train": {"class_weights": "inverse_frequency"}}).train, SPEC, TRAIN_LABELS)
    # shape: N=5, n=[3,1,1] -> 5/9, 5/3, 5/3; color: N=4 labelled, n=[1,3] -> 2, 2/3
    torch.testing.assert_close(inv.class_weights["shape"], torch.tensor([5 / 9, 5 / 3, 5 / 3]))
    torch.testing.assert_close(inv.class_weights["color"], torch.tensor([2.0, 2 / 3]))

    given = TaskLoss.from_config(
        config_from_dict({"train": {"class_weights": {"shape": {"star": 4}}, "label_smoothing": 0.2}}).train, SPEC, TRAIN_LABELS
    )
    torch.testing.assert_close(given.class_weights["shape"], torch.tensor([1.0, 1.0, 4.0]))
    assert given.class_weights["color"] is None and given.label_smoothing == 0.2
    none = TaskLoss.from_config(config_from_dict({}).train, SPEC, TRAIN_LABELS)
    assert none.class_weights == {"shape": None, "color": None} and none.label_smoothing == 0.0

    logits = {"shape": LOGITS[:4], "color": LOGITS[:4, :2]}
    targets = torch.tensor([[0, 1], [2, M], [1, 0], [M, M]])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = given(logits, targets, w)
    assert set(out) == {"shape", "color"}
    c = torch.tensor([1.0, 1.0, 4.0])
    assert float(out["shape"]) == pytest.approx(float(weighted_cross_entropy(LOGITS[:4], targets[:, 0], w, c, 0.2)))
    per_color = [(1 - 0.2) * nll(LOGITS[:4, :2])[i, targets[i, 1]] + 0.2 * nll(LOGITS[:4, :2])[i].mean() for i in (0, 2)]
    assert float(out["color"]) == pytest.approx(float((1 * per_color[0] + 3 * per_color[1]) / 4), rel=1e-6)


def test_given_class_weights_with_unknown_task_or_class_name_it():
    cfg = config_from_dict({"train": {"class_weights": {"shape": {"circle": 2, "hexagon": 3}}}}).train
    with pytest.raises(ValueError, match=r"class_weights.shape: unknown class\(es\) 'hexagon'; classes of 'shape': circle, square, star"):
        TaskLoss.from_config(cfg, SPEC, TRAIN_LABELS)
    cfg = config_from_dict({"train": {"class_weights": {"size": {"large": 2}}}}).train
    with pytest.raises(ValueError, match=r"class_weights: unknown task 'size'; tasks: shape, color"):
        TaskLoss.from_config(cfg, SPEC, TRAIN_LABELS)


def test_missing_label_gives_zero_gradient_to_that_head_only():
    num_classes = {"shape": 5, "color": 6, "size": 3}
    torch.manual_seed(0)
    model = build_model("hard_sharing", num_classes, "small_cnn")
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([[0, 1, 2], [1, M, 0], [2, 3, 1], [3, 4, 2]])
    y[:, 2] = M  # no sample has a size label
    w = torch.tensor([1.0, 0.5, 2.0, 1.0])
    loss_fn = TaskLoss(list(num_classes), {"shape": torch.ones(5) * 2, "color": torch.arange(1.0, 7.0)}, label_smoothing=0.1)
    losses = loss_fn(model(x), y, w)
    assert float(losses["size"].detach()) == 0.0 and losses["size"].requires_grad
    sum(losses.values()).backward()
    assert all(torch.count_nonzero(g) == 0 for g in model.heads["size"].gradients())
    for t in ("shape", "color"):
        assert all(g is not None and torch.count_nonzero(g) > 0 for g in model.heads[t].gradients())

    # sample 1 has no colour label: the colour head's gradient is that of the batch without it (eval mode,
    # so that batch norm does not mix the samples)
    model.eval()

    def color_head_grad(idx: list[int]) -> torch.Tensor:
        model.zero_grad()
        loss_fn(model(x[idx]), y[idx], w[idx])["color"].backward()
        return model.heads["color"].gradients()[0].clone()

    torch.testing.assert_close(color_head_grad([0, 1, 2, 3]), color_head_grad([0, 2, 3]), rtol=1e-5, atol=1e-7)


# --- end to end -------------------------------------------------------------------------------------------


def test_stages_run_with_missing_labels_and_weights(tmp_path: Path):
    root = tmp_path / "project"
    data = root / "data" / "datasets" / "shapes"
    csv = generate_shapes(data, 160, 32, 0)
    df = pd.read_csv(csv, dtype=str)
    rng = np.random.default_rng(0)
    blanked = rng.choice(len(df), size=len(df) // 5, replace=False)
    df.loc[blanked, "color"] = ""
    df["w"] = rng.choice(["0.5", "1", "2"], size=len(df))
    df.to_csv(csv, index=False)
    write_params(root, {
        "data": {"source": csv.relative_to(root).as_posix(), "missing_labels": "allow", "sample_weight_column": "w"},
        "preprocess": {"image_size": 32},
        "model": {"backbone": "small_cnn"},
        "train": {"epochs": 1, "num_workers": 0, "class_weights": "inverse_frequency", "label_smoothing": 0.1, "amp": False},
    })  # fmt: skip
    for stage in ("ingest", "preprocess", "train", "evaluate"):
        run_stage(stage, root=root)

    paths = ProjectPaths(root)
    manifest = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
    assert len(manifest) == 160 and (manifest["color"] == "").sum() == len(blanked)
    report = json.loads(paths.data_report.read_text())
    assert report["missing_labels"]["color"] == len(blanked) and report["missing_labels"]["shape"] == 0
    test_rows = manifest[manifest["split"] == "test"]
    labelled_test = int((test_rows["color"] != "").sum())
    assert report["labelled_counts"]["color"]["test"] == labelled_test

    metrics = json.loads(paths.test_metrics.read_text())
    assert metrics["tasks"]["color"]["support"] == labelled_test < len(test_rows)
    assert metrics["tasks"]["shape"]["support"] == len(test_rows)
    assert len(pd.read_csv(paths.predictions_dir / "color.csv")) == labelled_test
    assert all(math.isfinite(v) for v in metrics["mean"].values())

    # a client of this project's store; mlflow.set_tracking_uri would export it to later tests' environment
    client = MlflowClient(tracking_uri=tracking_uri(load_config(root / "params.yaml"), root))
    params = client.get_run(read_run_info(paths)["run_id"]).data.params
    train_rows = manifest[manifest["split"] == "train"]
    assert params["data/color/labelled_train"] == str(int((train_rows["color"] != "").sum()))
    assert params["data/shape/labelled_train"] == str(len(train_rows))
    assert params["train.class_weights"] == "inverse_frequency" and params["train.label_smoothing"] == "0.1"
    history = pd.read_csv(paths.train_history)
    assert np.isfinite(history["train/color/loss"]).all() and np.isfinite(history["val/color/accuracy"]).all()
