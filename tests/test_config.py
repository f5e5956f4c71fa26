from pathlib import Path

import pytest
import yaml

from mtl_core.config import ConfigError, PipelineConfig, config_from_dict, load_config
from tests.conftest import REPO_ROOT


def test_repository_params_are_valid_and_complete():
    cfg = load_config(REPO_ROOT / "params.yaml")
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    # every section of the schema appears in params.yaml: it is the single source of every knob
    assert set(raw) == set(PipelineConfig.model_fields)
    assert cfg.data.source == "builtin:shapes" and cfg.data.is_builtin
    assert cfg.data.builtin.num_images >= 5000
    assert cfg.model.backbone == "resnet18" and cfg.model.pretrained is False


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"epoch": 3}}, "params.yaml")
    msg = str(err.value)
    assert "unknown key 'train.epoch'" in msg
    assert "epochs" in msg and "batch_size" in msg and "weighting" in msg


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*allowed keys here: compare, data, mlflow, model"):
        config_from_dict({"trian": {}})


def test_mistyped_value_names_the_key():
    with pytest.raises(ConfigError, match=r"key 'train.batch_size'.*'many'"):
        config_from_dict({"train": {"batch_size": "many"}})


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1"):
        config_from_dict({"data": {"split": {"train": 0.5, "val": 0.1, "test": 0.1}}})


def test_source_must_be_builtin_or_csv():
    with pytest.raises(ConfigError, match="unknown built-in dataset 'faces'"):
        config_from_dict({"data": {"source": "builtin:faces"}})
    with pytest.raises(ConfigError, match="CSV manifest"):
        config_from_dict({"data": {"source": "data/images/"}})


def test_missing_params_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="parameters file not found"):
        load_config(tmp_path / "params.yaml")


def test_bad_cron():
    with pytest.raises(ConfigError, match="schedule.cron"):
        config_from_dict({"schedule": {"cron": "every monday"}})
