"""`train.channels_last` and `train.compile` change how the device computes a step, not what it
computes: trained with either, a model ends where the plain one does (to float rounding), keeps the plain
model's parameter names in its saved weights, and the option really took effect (NHWC batches reach the
encoder; dynamo compiled a graph)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from mtl_core.config import ConfigError, load_config
from mtl_core.models.architectures import HardSharing
from mtl_core.paths import ProjectPaths
from mtl_core.runtime import memory_format
from mtl_core.tasks import TaskSpec
from mtl_core.tracking.store import setup_mlflow
from mtl_core.training.engine import fit
from mtl_core.training.model_files import ModelFiles

from conftest import write_params
from test_training_behaviour import flipped_validation_project


def test_channels_last_auto_is_nhwc_on_cuda_only() -> None:
    assert memory_format(torch.device("cpu"), "auto") == torch.contiguous_format
    assert memory_format(torch.device("cuda", 0), "auto") == torch.channels_last
    assert memory_format(torch.device("cpu"), True) == torch.channels_last
    assert memory_format(torch.device("cuda"), False) == torch.contiguous_format


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("channels_last", "yes", "channels_last"), ("compile", "fastest", "compile")],
)
def test_an_unknown_setting_is_refused_naming_the_key(tmp_path: Path, key: str, value: str, message: str) -> None:
    write_params(tmp_path, {"train": {key: value}})
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "params.yaml")


def _train(root: Path, name: str, train: dict) -> dict[str, torch.Tensor]:
    """Two epochs of small_cnn on the 64-image project of `plain_weights`; the saved weights."""
    write_params(root, {"train": {"epochs": 2, "batch_size": 16, "task_affinity_every": 0, **train}, "preprocess": {"augment": []}})
    cfg = load_config(root / "params.yaml")
    paths = ProjectPaths(root)
    files = ModelFiles.in_folder(root / name)
    with mlflow.start_run(experiment_id=setup_mlflow(cfg, root)):
        fit(cfg, paths, TaskSpec.load(paths.tasks_file), files)
    return load_file(files.weights)


@pytest.fixture(scope="module")
def plain_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("speed") / "project"
    root.mkdir()
    flipped_validation_project(root)
    return root, _train(root, "plain", {})


def _assert_same_training(plain: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    """Same names, shapes and values to float rounding (other convolution kernels sum in another order);
    contiguous, as safetensors stores them."""
    assert list(other) == list(plain), "the saved weights keep the plain model's parameter names"
    for k, v in plain.items():
        assert other[k].shape == v.shape and other[k].is_contiguous(), k
        torch.testing.assert_close(other[k], v, rtol=1e-3, atol=1e-5, msg=k)


def test_channels_last_feeds_nhwc_batches_and_trains_the_same_weights(plain_weights, monkeypatch) -> None:
    root, plain = plain_weights
    seen: list[tuple[bool, bool]] = []
    encode = HardSharing.encode

    def spy(self: HardSharing, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            convs = [p for p in self.backbone.parameters() if p.dim() == 4]
            seen.append((_nhwc(x), all(_nhwc(p) for p in convs)))
        return encode(self, x)

    monkeypatch.setattr(HardSharing, "encode", spy)
    nhwc = _train(root, "channels_last", {"channels_last": True})
    assert seen and all(b and w for b, w in seen), "every training batch and every conv weight is NHWC"
    _assert_same_training(plain, nhwc)


def _nhwc(t: torch.Tensor) -> bool:
    """Laid out channels-last and not also plain contiguous (which a 1x1 spatial tensor is both)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_a_compiled_encoder_trains_the_same_weights_under_their_own_names(plain_weights) -> None:
    from torch._dynamo.utils import counters

    root, plain = plain_weights
    counters.clear()
    compiled = _train(root, "compiled", {"compile": True})
    assert counters["stats"]["unique_graphs"] >= 1, "dynamo compiled the encoder"
    _assert_same_training(plain, compiled)
