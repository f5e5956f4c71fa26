"""Backbones by name (timm, torchvision), pretrained weights from a local file, the small stem, and the
fine-tuning knobs (backbone learning-rate scale, frozen first epochs). Nothing here downloads."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mtl_core.config import ConfigError, ModelConfig, PipelineConfig, TrainConfig, config_from_dict, load_config
from mtl_core.losses import TaskLoss
from mtl_core.models import BACKBONES, build_backbone, build_model
from mtl_core.models import backbones as bb
from mtl_core.models.io import load_model, write_spec
from mtl_core.models.backbones.stage_split import split_stages
from mtl_core.paths import ProjectPaths
from mtl_core.tasks import TaskSpec
from mtl_core.tracking.store import setup_mlflow
from mtl_core.training import engine
from mtl_core.training.engine import fit
from mtl_core.training.loop import EpochPlan, StepSettings, train_one_epoch
from mtl_core.training.model_files import ModelFiles, spec_for
from mtl_core.training.optim import build_optimizer, check_freezable, freeze_backbone
from mtl_core.training.state import TrainingState
from mtl_core.weighting import build_weighting

from conftest import write_params

NUM_CLASSES = {"a": 2, "b": 3}
TIMM_TINY = "timm:mobilenetv3_small_050"  # 0.57 M parameters
TV_TINY = "shufflenet_v2_x0_5"  # torchvision, not in BACKBONES: found by name


def batch(n: int = 4, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=gen)
    y = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in NUM_CLASSES.values()], 1)
    return x, y


def perturbed_state(net: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point():
            v.add_(torch.randn(v.shape, generator=gen) * 0.1)
    return state


def save_weights(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


# --- backbones by name ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dim"), [(TIMM_TINY, 1024), (TV_TINY, 1024)])
def test_a_library_backbone_by_name_builds_hard_sharing_and_learns(name, dim):
    """timm's MobileNetV3 outputs its head's 1024-wide pre-logits (not num_features, 288), shufflenet its
    fc input; a few AdamW steps on one batch lower the loss and change the backbone."""
    assert TV_TINY not in BACKBONES
    torch.manual_seed(0)
    model = build_model("hard_sharing", NUM_CLASSES, name)
    assert all(head.in_features == dim for head in model.heads.values())
    x, y = batch()
    loss_fn = TaskLoss(list(NUM_CLASSES))
    before = [p.detach().clone() for p in model.backbone_parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = sum(loss_fn(model(x), y, torch.ones(len(x))).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    assert any(not torch.equal(b, p) for b, p in zip(before, model.backbone_parameters()))


def test_names_resolve_registry_first_then_prefixes_then_torchvision_then_timm():
    assert bb.resolve_backbone("resnet18") is BACKBONES["resnet18"]
    tv_unprefixed, tv_prefixed, tv_long = (build_backbone(n)[0] for n in (TV_TINY, f"tv:{TV_TINY}", f"torchvision:{TV_TINY}"))
    names = [n for n, _ in tv_unprefixed.named_parameters()]
    assert names == [n for n, _ in tv_prefixed.named_parameters()] == [n for n, _ in tv_long.named_parameters()]
    assert isinstance(tv_unprefixed.fc, nn.Identity)
    assert type(build_backbone("mobilenetv3_small_050")[0]).__module__ == "timm.models.mobilenetv3"  # not in torchvision


def test_unknown_names_say_how_to_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown model.backbone 'resnet9'; available: .*small_cnn.*timm.list_models\(\)"):
        build_backbone("resnet9")
    with pytest.raises(ValueError, match=r"unknown model.backbone prefix 'hub' in 'hub:resnet18'; use one of: timm:<name>"):
        build_backbone("hub:resnet18")
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet9'.*timm.list_models\(\)"):
        build_backbone("timm:resnet9")
    with pytest.raises(ValueError, match=r"unknown torchvision classification model 'fasterrcnn_resnet50_fpn'"):
        build_backbone("tv:fasterrcnn_resnet50_fpn")  # detection models are not classifiers
    with pytest.raises(ValueError, match=r"backbone 'tv:squeezenet1_0' \(SqueezeNet\): no Linear classifier"):
        build_backbone("tv:squeezenet1_0")  # its classifier is a conv


def test_small_cnn_processes_never_import_torchvision_or_timm():
    code = (
        "import sys\n"
        "from mtl_core.models import build_model\n"
        "from mtl_core.models.backbones import resolve_stem\n"
        "build_model('cross_stitch', {'a': 2}, 'small_cnn', stem=resolve_stem('auto', 32, 'small_cnn'))\n"
        "print(sorted(m for m in ('torchvision', 'timm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- pretrained weights from a local file ---------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_loads_exactly_and_drops_the_library_classifier(tmp_path, suffix):
    torch.manual_seed(0)
    net, dim = build_backbone(TIMM_TINY)
    state = perturbed_state(net)
    path = save_weights({**state, "classifier.weight": torch.randn(1000, dim), "classifier.bias": torch.zeros(1000)},
                        tmp_path / f"w{suffix}")  # fmt: skip
    model = build_model("hard_sharing", NUM_CLASSES, TIMM_TINY, pretrained=path)
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_weights_that_do_not_match_fail_naming_the_file(tmp_path):
    net, _ = build_backbone("small_cnn")
    state = perturbed_state(net)
    extra = save_weights({**state, "features.0.bogus": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=rf"{extra}.*does not match backbone 'small_cnn'.*unexpected keys features.0.bogus"):
        build_backbone("small_cnn", extra)
    missing = save_weights({k: v for k, v in state.items() if k != "features.0.weight"}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=rf"{missing}.*missing keys features.0.weight; unexpected keys none"):
        build_backbone("small_cnn", missing)
    shape = save_weights({**state, "features.0.weight": torch.zeros(1, 3, 3, 3)}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=rf"{shape} does not fit backbone 'small_cnn'.*size mismatch"):
        build_backbone("small_cnn", shape)


def test_unreadable_or_unsafe_weight_files_are_refused_naming_the_file(tmp_path):
    garbage = b"\x00\x01not a weights file" * 10
    (tmp_path / "garbage.safetensors").write_bytes(garbage)
    (tmp_path / "garbage.pth").write_bytes(garbage)
    torch.save({"conv.weight": torch.zeros(1), "config": argparse.Namespace(x=1)}, tmp_path / "pickle.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    for name in ("garbage.safetensors", "garbage.pth", "pickle.pth"):
        with pytest.raises(ValueError, match=rf"pretrained weights file {tmp_path / name} cannot be read"):
            build_backbone("small_cnn", tmp_path / name)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'list.pt'} does not hold a state dict"):
        build_backbone("small_cnn", tmp_path / "list.pt")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'absent.pth'} not found"):
        build_backbone("small_cnn", tmp_path / "absent.pth")
    with pytest.raises(ValueError, match=r"unsupported suffix '.bin'"):
        build_backbone("small_cnn", tmp_path / "w.bin")


def test_config_takes_a_weights_path_relative_to_the_project_root(tmp_path):
    assert ModelConfig().pretrained is False and ModelConfig().stem == "auto"
    assert ModelConfig(pretrained=True).pretrained_weights(tmp_path) is True
    assert ModelConfig(pretrained="weights/r18.pth").pretrained_weights(tmp_path) == tmp_path / "weights" / "r18.pth"
    assert ModelConfig(pretrained="/abs/r18.safetensors").pretrained_weights(tmp_path) == Path("/abs/r18.safetensors")
    with pytest.raises(ConfigError, match=r"key 'model.pretrained'.*weights file \(.safetensors, .pth, .pt\)"):
        config_from_dict({"model": {"pretrained": "weights/r18.bin"}})
    with pytest.raises(ConfigError, match=r"key 'model.stem'"):
        config_from_dict({"model": {"stem": "cifar"}})
    assert set(ModelConfig.WEIGHT_SUFFIXES) == set(bb.WEIGHT_READERS)


# --- the small stem -------------------------------------------------------------------------------


def final_map(net: nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Size, torch.Tensor, torch.Tensor]:
    """The last stage's output shape (before pooling), pool(stages(x)) and net(x)."""
    stages, pool = split_stages(net, name)
    net.eval()
    with torch.no_grad():
        h = x
        for stage in stages:
            h = stage(h)
        return h.shape, pool(h), net(x)


@pytest.mark.parametrize("name", ["resnet18", "timm:resnet10t"])
def test_small_stem_keeps_4x_the_resolution_and_still_splits_into_stages(name):
    """torchvision ResNet: conv1 becomes 3x3 stride 1 without bias and maxpool Identity; timm's deep stem
    (resnet10t) keeps its convs with the first at stride 1. Either way a 32 px input ends at 4x4 instead
    of 1x1, and the cross-stitch stage split still composes to the network."""
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    imagenet, _ = build_backbone(name)
    small, _ = build_backbone(name, stem="small")
    first = next(m for m in small.conv1.modules() if isinstance(m, nn.Conv2d))
    assert first.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    if name == "resnet18":
        assert (small.conv1.kernel_size, small.conv1.padding, small.conv1.bias) == ((3, 3), (1, 1), None)
        assert small.conv1.out_channels == imagenet.conv1.out_channels == 64
    shape_imagenet, _, _ = final_map(imagenet, name, x)
    shape_small, pooled, direct = final_map(small, name, x)
    assert shape_imagenet[-2:] == (1, 1) and shape_small[-2:] == (4, 4)
    torch.testing.assert_close(pooled, direct, rtol=0, atol=0)


def test_small_stem_on_pretrained_weights_drops_the_replaced_conv_with_a_warning(tmp_path, caplog):
    torch.manual_seed(0)
    net, dim = build_backbone("resnet18")
    state = perturbed_state(net)
    path = save_weights({**state, "fc.weight": torch.randn(1000, dim), "fc.bias": torch.zeros(1000)}, tmp_path / "r18.pth")
    with caplog.at_level(logging.WARNING, logger="mtl_core.models.backbones"):
        small, _ = build_backbone("resnet18", path, stem="small")
    assert "conv1.weight" in caplog.text and "random init" in caplog.text
    loaded = small.state_dict()
    assert loaded["conv1.weight"].shape == (64, 3, 3, 3)
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("conv1."))


def test_small_stem_elsewhere_is_refused_naming_the_supported_families_but_auto_falls_back():
    with pytest.raises(ValueError, match=rf"model.stem: small is not available for backbone '{TV_TINY}' \(ShuffleNetV2\); supported: torchvision ResNet, timm ResNet"):
        build_backbone(TV_TINY, stem="small")
    assert bb.resolve_stem("auto", 32, TV_TINY) == "imagenet"
    assert bb.resolve_stem("auto", 32, "resnet18") == "small"
    small_cnn, _ = build_backbone("small_cnn", stem="small")  # no downsampling stem: unchanged
    assert [n for n, _ in small_cnn.named_parameters()] == [n for n, _ in build_backbone("small_cnn")[0].named_parameters()]


def test_auto_stem_resolves_by_image_size():
    assert bb.SMALL_STEM_MAX_SIZE == 32
    assert bb.resolve_stem("auto", bb.SMALL_STEM_MAX_SIZE, "small_cnn") == "small"
    assert bb.resolve_stem("auto", bb.SMALL_STEM_MAX_SIZE + 1, "resnet18") == "imagenet"
    assert bb.resolve_stem("small", 224, "resnet18") == "small" and bb.resolve_stem("imagenet", 16, "resnet18") == "imagenet"
    with pytest.raises(ValueError, match="resolve_stem resolves 'auto'"):
        build_backbone("small_cnn", stem="auto")


def test_the_model_spec_records_the_resolved_stem_and_rebuilds_it(tmp_path):
    cfg = PipelineConfig.model_validate({"model": {"backbone": "resnet18"}, "preprocess": {"image_size": 32}})
    tasks = TaskSpec({t: [str(i) for i in range(n)] for t, n in NUM_CLASSES.items()})
    torch.manual_seed(0)
    model = build_model("hard_sharing", NUM_CLASSES, "resnet18", stem="small").eval()
    spec_path, weights = tmp_path / "model_spec.json", tmp_path / "model.safetensors"
    write_spec(spec_path, spec_for(cfg, tasks))  # auto at 32 px
    save_file(model.state_dict(), str(weights))
    loaded, spec = load_model(spec_path, weights)
    assert spec["stem"] == "small" and spec["pretrained"] is False
    assert loaded.backbone.conv1.kernel_size == (3, 3) and isinstance(loaded.backbone.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["b"], model(x)["b"])
    # a spec written before model.stem existed means the ImageNet stem
    old = build_model("hard_sharing", NUM_CLASSES, "resnet18")
    save_file(old.state_dict(), str(weights))
    spec_path.write_text(json.dumps({k: v for k, v in spec.items() if k != "stem"}))
    assert load_model(spec_path, weights)[0].backbone.conv1.kernel_size == (7, 7)


# --- fine-tuning knobs ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["hard_sharing", "mmoe", "cross_stitch"])
def test_backbone_lr_scale_gives_the_backbone_its_own_param_group(arch):
    """Groups: new layers at lr, the backbone at lr x scale, the weighting method's parameters at lr
    without weight decay. MMoE's experts are shared but new: lr; cross-stitch's per-task branches are
    backbone: lr x scale, its stitches lr."""
    cfg = TrainConfig(lr=0.01, backbone_lr_scale=0.1, weight_decay=0.05)
    model = build_model(arch, NUM_CLASSES, "small_cnn")
    weighting = build_weighting("uncertainty", list(NUM_CLASSES))
    optimizer = build_optimizer(model, weighting, cfg)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert [g["name"] for g in optimizer.param_groups] == ["model", "backbone", "weighting"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.001, 0.01])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.05, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    backbone = {names[id(p)].split(".")[0] for p in groups["backbone"]["params"]}
    new = {names[id(p)].split(".")[0] for p in groups["model"]["params"]}
    assert backbone == ({"branches"} if arch == "cross_stitch" else {"backbone"})  # small_cnn's pools have no weights
    assert new == {"heads", *({"gates", "experts"} if arch == "mmoe" else set()), *({"stitches"} if arch == "cross_stitch" else set())}
    assert sum(len(g["params"]) for g in optimizer.param_groups[:2]) == len(list(model.parameters()))
    for key, bad in (("backbone_lr_scale", 0), ("freeze_backbone_epochs", -1)):
        with pytest.raises(ConfigError, match=rf"key 'train.{key}'"):
            config_from_dict({"train": {key: bad}})


def tiny_cache(root: Path, n_train: int = 32, n_val: int = 16) -> tuple[ProjectPaths, TaskSpec]:
    """A preprocessed cache of random 32 px images and labels (no ingest needed)."""
    paths = ProjectPaths(root)
    paths.preprocessed_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        np.save(paths.images_cache(split), rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        np.save(paths.labels_cache(split), np.stack([rng.integers(0, c, n) for c in NUM_CLASSES.values()], 1))
        np.save(paths.weights_cache(split), np.ones(n, dtype=np.float32))
    tasks = TaskSpec({t: [str(i) for i in range(c)] for t, c in NUM_CLASSES.items()})
    tasks.save(paths.tasks_file)
    return paths, tasks


def test_a_fit_with_a_frozen_first_epoch_trains_only_the_heads_then_everything(tmp_path, monkeypatch):
    """2 epochs, freeze 1, from a local weights file given relative to the project root: after epoch 1
    the backbone's weights are still the file's and the heads have moved; after epoch 2 the backbone
    has moved too. The task-gradient measurement (every step) skips the frozen epoch instead of failing,
    the scheduler peaks at lr for the heads and lr x scale for the backbone, and the spec records the
    resolved stem and the weights file."""
    root = tmp_path / "project"
    root.mkdir()
    net, _ = build_backbone("small_cnn")
    weights = perturbed_state(net)
    save_weights(weights, root / "weights" / "sc.safetensors")
    write_params(root, {
        "preprocess": {"image_size": 32, "augment": []},
        "model": {"pretrained": "weights/sc.safetensors"},
        "train": {"epochs": 2, "batch_size": 16, "freeze_backbone_epochs": 1, "backbone_lr_scale": 0.5,
                  "task_affinity_every": 1, "amp": False},
    })  # fmt: skip
    cfg = load_config(root / "params.yaml")
    paths, tasks = tiny_cache(root)
    snapshots: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    real_freeze = engine.freeze_backbone

    def recording_freeze(model, epoch, train_cfg):
        snapshots[epoch] = {
            "backbone": {n: p.detach().clone() for n, p in model.backbone.named_parameters()},
            "heads": {n: p.detach().clone() for n, p in model.heads.named_parameters()},
        }
        return real_freeze(model, epoch, train_cfg)

    monkeypatch.setattr(engine, "freeze_backbone", recording_freeze)
    files = ModelFiles.multitask(paths)  # with the task-gradient measurement
    with mlflow.start_run(experiment_id=setup_mlflow(cfg, root)):
        fit(cfg, paths, tasks, files)
    params = [n for n, _ in net.named_parameters()]
    assert all(torch.equal(snapshots[1]["backbone"][n], weights[n]) for n in params)  # loaded from the file
    assert all(torch.equal(snapshots[2]["backbone"][n], weights[n]) for n in params)  # frozen in epoch 1
    assert any(not torch.equal(snapshots[2]["heads"][n], v) for n, v in snapshots[1]["heads"].items())
    final = torch.load(files.checkpoint, weights_only=True)
    assert any(not torch.equal(final["model"][f"backbone.{n}"], weights[n]) for n in params)  # trained in epoch 2
    groups = final["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["model", "backbone", "weighting"]
    assert [g["max_lr"] for g in groups] == pytest.approx([cfg.train.lr, cfg.train.lr * 0.5, cfg.train.lr])
    spec = json.loads(files.spec.read_text())
    assert spec["stem"] == "small" and spec["pretrained"] == "weights/sc.safetensors"


def test_a_frozen_backbone_with_gradient_balancing(tiny_project):
    """Hard sharing has nothing shared left to balance: refused before training. MMoE keeps its shared
    experts: MGDA balances them while the frozen backbone stays put."""
    cfg = load_config(write_params(tiny_project, {"train": {"freeze_backbone_epochs": 1, "weighting": "mgda", "amp": False}}))
    mgda = build_weighting("mgda", list(NUM_CLASSES))
    with pytest.raises(ValueError, match=r"train.freeze_backbone_epochs: 1 leaves model.arch 'hard_sharing' nothing shared"):
        check_freezable(build_model("hard_sharing", NUM_CLASSES, "small_cnn"), mgda, "hard_sharing", cfg.train)
    check_freezable(build_model("hard_sharing", NUM_CLASSES, "small_cnn"), build_weighting("equal", list(NUM_CLASSES)), "hard_sharing", cfg.train)
    torch.manual_seed(0)
    model = build_model("mmoe", NUM_CLASSES, "small_cnn")
    check_freezable(model, mgda, "mmoe", cfg.train)
    assert freeze_backbone(model, 1, cfg.train) is True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, mgda, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    x, y = batch(8)
    state = TrainingState(model, optimizer, scheduler, mgda)
    train_one_epoch(state, TaskLoss(list(NUM_CLASSES)), [(x, y, torch.ones(8))], StepSettings.from_config(cfg),
                    torch.device("cpu"), EpochPlan(1))  # fmt: skip
    moved = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved == {"experts", "gates", "heads"}
    assert freeze_backbone(model, 2, cfg.train) is False
    assert all(p.requires_grad for p in model.parameters())
