"""The training loader's augmentation: every configured step applied, labels kept, each worker seeded."""

from __future__ import annotations

import colorsys
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

from mtl_core.config import AugmentStep, load_config
from mtl_core.paths import ProjectPaths
from mtl_core.tasks import TaskSpec
from mtl_core.runtime import seed_everything
from mtl_core.training.loaders import make_loaders
from mtl_core.training.normalisation import resolve_normalisation


def with_augment(cfg, steps: list[dict]):
    augment = [AugmentStep.model_validate(s) for s in steps]
    return cfg.model_copy(update={"preprocess": cfg.preprocess.model_copy(update={"augment": augment})})


def to_uint8(x: torch.Tensor, cfg) -> np.ndarray:
    """A (3, H, W) training sample as the (H, W, 3) image in 0..255: the train loader yields uint8
    (normalised on the device by the step loop); a normalised tensor is mapped back."""
    if x.dtype == torch.uint8:
        return x.permute(1, 2, 0).numpy().astype(np.float64)
    mean, std = np.array(cfg.preprocess.mean), np.array(cfg.preprocess.std)
    return (x.permute(1, 2, 0).numpy() * std + mean) * 255.0


def test_the_train_loader_yields_uint8_that_the_loop_normalises_as_evaluation_does(trained_project: Path) -> None:
    """A training sample is the uint8 image (a quarter of the bytes through workers and the copy to the
    device); normalised on the device it equals the evaluation transform's tensor of the same image."""
    from mtl_core.transforms import eval_transform, normalize_on_device

    cfg = with_augment(resolve_normalisation(load_config(trained_project / "params.yaml")), [])
    paths = ProjectPaths(trained_project)
    x = make_loaders(cfg, paths, seed_everything(0), torch.device("cpu"))["train"].dataset[3][0]
    assert x.dtype == torch.uint8 and x.shape[0] == 3
    expected = eval_transform(cfg.preprocess)(image=np.load(paths.images_cache("train"))[3])["image"]
    got = normalize_on_device(x[None], cfg.preprocess.mean, cfg.preprocess.std)[0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_the_train_loader_applies_every_configured_step_in_order(trained_project: Path) -> None:
    """Three deterministic steps (p = 1): the sample equals invert, then grey, then solarise of the cached
    image, normalised; only the first step, or the evaluation transform, would give another image."""
    cfg = resolve_normalisation(load_config(trained_project / "params.yaml"))
    steps = [
        {"name": "InvertImg", "p": 1.0},
        {"name": "ToGray", "p": 1.0},
        {"name": "Solarize", "threshold_range": [0.4, 0.4], "p": 1.0},
    ]
    cfg = with_augment(cfg, steps)
    paths = ProjectPaths(trained_project)
    data = make_loaders(cfg, paths, seed_everything(0), torch.device("cpu"))["train"].dataset
    raw = np.load(paths.images_cache("train"))
    for i in (0, 7):
        expected = raw[i]
        for s in steps:
            kwargs = {k: v for k, v in s.items() if k != "name"}
            expected = getattr(A, s["name"])(**kwargs)(image=expected)["image"]
        got = to_uint8(data[i][0], cfg)
        np.testing.assert_allclose(got, expected.astype(np.float64), atol=1e-3)
        only_first = 255.0 - raw[i].astype(np.float64)
        assert np.abs(got - only_first).max() > 20  # the later steps changed it


def saturated_pixels(image: np.ndarray) -> np.ndarray:
    """Mask of the foreground shape: the only saturated colour in a built-in image (background and
    distractors are near-grey)."""
    return (image.max(2) - image.min(2)) > 90


def quadrant_and_hue(image: np.ndarray) -> tuple[str, float]:
    mask = saturated_pixels(image)
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    vertical = "top" if ys.mean() < h / 2 else "bottom"
    horizontal = "left" if xs.mean() < w / 2 else "right"
    r, g, b = (image[mask].mean(0) / 255.0).clip(0, 1)
    return f"{vertical}_{horizontal}", colorsys.rgb_to_hsv(r, g, b)[0] * 360.0


HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0}


def nearest_colour(hue: float) -> str:
    return min(HUES, key=lambda c: min(abs(hue - HUES[c]), 360 - abs(hue - HUES[c])))


def label_agreement(cfg, paths: ProjectPaths, draws: int) -> tuple[float, float]:
    data = make_loaders(cfg, paths, seed_everything(0), torch.device("cpu"))["train"].dataset
    classes = TaskSpec.load(paths.tasks_file).classes
    k_pos, k_col = list(classes).index("position"), list(classes).index("color")
    pos_ok = col_ok = n = 0
    for _ in range(draws):
        for i in range(len(data)):
            x, y, _ = data[i]
            quadrant, hue = quadrant_and_hue(to_uint8(x, cfg))
            pos_ok += quadrant == classes["position"][int(y[k_pos])]
            col_ok += nearest_colour(hue) == classes["color"][int(y[k_col])]
            n += 1
    return pos_ok / n, col_ok / n


def test_the_default_augmentation_keeps_the_builtin_labels_right(trained_project: Path) -> None:
    """Position (quadrant) and colour (hue) read off the pixels of every augmented training image agree
    with the labels; the detector is first checked on images without augmentation, and shown to catch a
    horizontal flip."""
    cfg = resolve_normalisation(load_config(trained_project / "params.yaml"))
    paths = ProjectPaths(trained_project)
    assert label_agreement(with_augment(cfg, []), paths, 1) == (1.0, 1.0)
    default = load_config(Path(__file__).resolve().parents[1] / "params.yaml").preprocess.augment
    assert default, "params.yaml has a default augmentation to check"
    cfg = cfg.model_copy(update={"preprocess": cfg.preprocess.model_copy(update={"augment": default})})
    position, colour = label_agreement(cfg, paths, 2)
    assert position == 1.0 and colour == 1.0, (position, colour)
    flipped = with_augment(cfg, [{"name": "HorizontalFlip", "p": 0.5}])
    assert label_agreement(flipped, paths, 1)[0] < 0.8


def constant_cache(root: Path, n: int = 16) -> ProjectPaths:
    """A training split of n identical grey images: any difference between samples is augmentation."""
    paths = ProjectPaths(root)
    paths.preprocessed_dir.mkdir(parents=True)
    for split in ("train", "val"):
        np.save(paths.images_cache(split), np.full((n, 32, 32, 3), 128, dtype=np.uint8))
        np.save(paths.labels_cache(split), np.zeros((n, 1), dtype=np.int64))
        np.save(paths.weights_cache(split), np.ones(n, dtype=np.float32))
    return paths


def batches(cfg, paths: ProjectPaths, epochs: int) -> list[torch.Tensor]:
    loader = make_loaders(cfg, paths, seed_everything(cfg.train.seed), torch.device("cpu"))["train"]
    return [x for _ in range(epochs) for x, _, _ in loader]


@pytest.mark.timeout(120)
def test_each_sample_draws_its_own_seeded_augmentation_whatever_the_workers(tmp_path: Path, trained_project: Path) -> None:
    """Different across samples, batches and epochs; the same again for the same seed, and the same
    with 0 workers as with 2 (training.sampler: a sample's augmentation is a function of the seed, the
    epoch and the sample, which is what lets a resumed run continue exactly)."""
    cfg = with_augment(resolve_normalisation(load_config(trained_project / "params.yaml")), [{"name": "GaussNoise", "std_range": [0.1, 0.1], "p": 1.0}])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": 2, "batch_size": 4})})
    paths = constant_cache(tmp_path)
    first = batches(cfg, paths, 2)  # 4 batches an epoch: workers 0, 1, 0, 1
    assert len(first) == 8
    for a, b in [(0, 1), (2, 3), (0, 2), (0, 4)]:  # across workers, within a worker, across epochs
        assert not torch.equal(first[a], first[b]), (a, b)
    again = batches(cfg, paths, 2)  # seeded: the same run again draws the same augmentation
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    in_process = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": 0})})
    for a, b in zip(first, batches(in_process, paths, 2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other_seed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})})
    assert not torch.equal(batches(other_seed, paths, 1)[0], first[0])
