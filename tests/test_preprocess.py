from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtl_core.config import ConfigError, config_from_dict
from mtl_core.stages.ingest import run_ingest
from mtl_core.stages.preprocess import run_preprocess
from mtl_core.paths import SPLITS, ProjectPaths
from mtl_core.tasks import TaskSpec
from mtl_core.transforms import resize_rgb, train_transform


def test_cache_holds_every_image_resized_once_with_encoded_labels(tiny_project: Path):
    cfg = config_from_dict({"data": {"builtin": {"num_images": 80}}, "preprocess": {"image_size": 48}})
    run_ingest(cfg, tiny_project)
    run_preprocess(cfg, tiny_project)
    paths = ProjectPaths(tiny_project)
    manifest = pd.read_csv(paths.manifest)
    tasks = TaskSpec.load(paths.tasks_file)
    assert tasks.names == ["shape", "color", "size", "position"]
    assert tasks.classes["size"] == ["large", "medium", "small"]
    total = 0
    for split in SPLITS:
        images = np.load(paths.images_cache(split), mmap_mode="r")
        labels = np.load(paths.labels_cache(split))
        part = manifest[manifest["split"] == split].reset_index(drop=True)
        assert images.shape == (len(part), 48, 48, 3) and images.dtype == np.uint8
        assert labels.shape == (len(part), 4)
        total += len(part)
        # row 0 of the split: pixels are the resized file, labels index the class lists
        with Image.open(tiny_project / part.loc[0, "path"]) as im:
            np.testing.assert_array_equal(images[0], resize_rgb(im, 48))
        for k, t in enumerate(tasks.names):
            assert tasks.classes[t][labels[0, k]] == part.loc[0, t]
    assert total == 80


def test_unknown_augmentation_names_the_step():
    """Refused when params.yaml is loaded (before ingest runs), naming the step."""
    with pytest.raises(ConfigError, match=r"augment\[1\]: unknown Albumentations transform 'Sparkle'"):
        config_from_dict({"preprocess": {"augment": [{"name": "HorizontalFlip"}, {"name": "Sparkle", "p": 1}]}})


def test_bad_augmentation_arguments_name_the_step():
    with pytest.raises(ConfigError, match=r"augment\[0\] \(GaussNoise\): invalid arguments"):
        config_from_dict({"preprocess": {"augment": [{"name": "GaussNoise", "sigma": 3}]}})


def test_train_transform_normalises_and_augments():
    cfg = config_from_dict(
        {"preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "augment": [{"name": "InvertImg", "p": 1.0}]}}
    )
    image = np.full((8, 8, 3), 64, np.uint8)
    out = train_transform(cfg.preprocess)(image=image)["image"]
    # inverted 64 -> 191; (191/255 - 0.5) / 0.25
    assert out.shape == (3, 8, 8)
    assert float(out[0, 0, 0]) == pytest.approx((191 / 255 - 0.5) / 0.25, abs=1e-5)
