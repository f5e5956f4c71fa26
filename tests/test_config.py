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
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*allowed keys here: compare, data, evaluate, grouping, mlflow, model"):
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


# --- names and options checked against the registries at load (issue #8) ------------------------


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    return str(err.value)


def _listed(msg: str, label: str) -> list[str]:
    """The comma-separated names after '<label>: ' up to the ' (got' of the formatter."""
    return msg.split(f"{label}: ", 1)[1].split(" (got ")[0].split(", ")


def test_unknown_weighting_is_refused_at_load_with_the_methods_listed():
    from mtl_core.weighting import WEIGHTINGS

    msg = _error({"train": {"weighting": "famoo"}})
    assert "key 'train.weighting': unknown weighting method 'famoo' (did you mean 'famo'?)" in msg
    assert _listed(msg, "available") == sorted(WEIGHTINGS)
    assert "Value error" not in msg  # pydantic's prefix is dropped


def test_unknown_weighting_option_lists_the_allowed_ones_and_a_valid_one_passes():
    msg = _error({"train": {"weighting": "famo", "weighting_options": {"gama": 0.01}}})
    assert "key 'train.weighting_options': famo has no option 'gama' (did you mean 'gamma'?)" in msg
    assert _listed(msg, "allowed") == ["gamma", "w_lr", "min_losses", "eps", "update"]
    cfg = config_from_dict({"train": {"weighting": "famo", "weighting_options": {"gamma": 0.01, "w_lr": 0.01}}})
    assert cfg.train.weighting_options == {"gamma": 0.01, "w_lr": 0.01}
    # options a method passes on to its base class count too (`on` of every gradient-balancing method)
    assert config_from_dict({"train": {"weighting": "cagrad", "weighting_options": {"c": 0.5, "on": "params"}}})
    msg = _error({"train": {"weighting": "cagrad", "weighting_options": {"on": "params", "cc": 1, "x": 2}}})
    assert "cagrad has no options 'cc' (did you mean 'c'?), 'x'; allowed: c, rescale, on" in msg
    assert "allowed: none" in _error({"train": {"weighting": "equal", "weighting_options": {"on": "params"}}})


def test_listed_weighting_options_are_exactly_what_each_method_takes():
    """No false alarm and no miss: every option the config allows, the method's constructor takes (at its
    default value), and the constructor refuses one the config refuses."""
    import inspect

    from mtl_core.weighting import WEIGHTINGS, build_weighting

    for name, cls in WEIGHTINGS.items():
        defaults = {
            p.name: p.default
            for k in reversed(cls.__mro__) if "__init__" in k.__dict__
            for p in inspect.signature(k.__dict__["__init__"]).parameters.values() if p.default is not p.empty
        }  # fmt: skip
        listed = _listed(_error({"train": {"weighting": name, "weighting_options": {"zz": 1}}}), "allowed")
        options = {o: defaults[o] for o in listed if o != "none"}
        if name == "fixed":
            options["weights"] = {"a": 1.0, "b": 2.0}  # required
        assert config_from_dict({"train": {"weighting": name, "weighting_options": options}})
        build_weighting(name, ["a", "b"], options)
        with pytest.raises(ValueError, match="unknown option"):
            build_weighting(name, ["a", "b"], {"zz": 1})


def test_unknown_arch_is_refused_at_load_with_the_architectures_listed():
    from mtl_core.models import ARCHITECTURES

    msg = _error({"model": {"arch": "mmo"}})
    assert "key 'model.arch': unknown architecture 'mmo' (did you mean 'mmoe'?)" in msg
    assert _listed(msg, "available") == sorted(ARCHITECTURES)


def test_unknown_arch_option_lists_the_allowed_ones_per_arch():
    msg = _error({"model": {"arch": "mmoe", "arch_options": {"experts": 2}}})
    assert "key 'model.arch_options': arch mmoe has no option 'experts'" in msg
    assert _listed(msg, "allowed") == ["num_experts", "expert_dim"]
    assert config_from_dict({"model": {"arch": "mmoe", "arch_options": {"num_experts": 2, "expert_dim": 8}}})
    assert config_from_dict({"model": {"arch": "cross_stitch", "arch_options": {"alpha_same": 0.8}}})
    msg = _error({"model": {"arch": "cross_stitch", "arch_options": {"num_experts": 2}}})
    assert _listed(msg, "allowed") == ["alpha_same", "task_specific_branches"]
    assert "allowed: dropout (got" in _error({"model": {"arch_options": {"num_experts": 2}}})  # hard_sharing: one
    # the backbone arguments are set by model.backbone / pretrained / stem, not as options
    assert "has no option 'backbone'" in _error({"model": {"arch": "mmoe", "arch_options": {"backbone": "x"}}})


def test_unknown_backbone_is_refused_at_load_with_the_names_listed():
    from mtl_core.models import BACKBONES

    msg = _error({"model": {"backbone": "resnet1800"}})
    assert "key 'model.backbone': unknown model.backbone 'resnet1800'" in msg
    assert all(name in msg for name in BACKBONES) and "tv:<name>" in msg and "timm:<name>" in msg
    assert "did you mean 'resnet18'" in msg
    msg = _error({"model": {"backbone": "timm:resnet10x"}})
    assert "key 'model.backbone': unknown timm model 'resnet10x'" in msg and "'timm:resnet10t'" in msg
    assert "use one of: timm:<name>, tv:<name>" in _error({"model": {"backbone": "tim:resnet10t"}})


def test_library_backbones_pass_without_building_anything(monkeypatch):
    from mtl_core.models import backbones

    def no_build(*args, **kwargs):
        raise AssertionError("the config check must not build (or download) a network")

    monkeypatch.setattr(backbones.Backbone, "build", no_build)
    for name in ("timm:resnet10t", "tv:resnet18", "torchvision:mobilenet_v3_small", "regnet_x_400mf", "resnet10t", "small_cnn"):
        assert config_from_dict({"model": {"backbone": name}}).model.backbone == name


def test_a_backbone_registered_at_runtime_is_looked_up_at_validation(monkeypatch):
    from mtl_core.models import backbones

    assert "unknown model.backbone 'my_net'" in _error({"model": {"backbone": "my_net"}})
    monkeypatch.setitem(backbones.BACKBONES, "my_net", backbones.BACKBONES["small_cnn"])
    assert config_from_dict({"model": {"backbone": "my_net"}}).model.backbone == "my_net"


# --- numbers: no booleans for ints, no inf / nan for floats ---------------------------------------


def _number_fields(model: type = PipelineConfig, prefix: tuple[str, ...] = ()):
    """(dotted key path, int or float) of every int / float field of the schema, nested sections included."""
    from typing import Annotated, get_args, get_origin

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        args = [a for a in (get_args(field.annotation) if get_origin(field.annotation) else (field.annotation,))
                if a is not type(None)]  # fmt: skip
        args = [get_args(a)[0] if get_origin(a) is Annotated else a for a in args]
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            yield from _number_fields(args[0], (*prefix, name))
        elif args in ([int], [float]):
            yield (*prefix, name), args[0]


def _nested(path: tuple[str, ...], value) -> dict:
    return {path[0]: _nested(path[1:], value)} if len(path) > 1 else {path[0]: value}


def test_every_int_field_refuses_booleans_and_every_float_field_inf_and_nan():
    fields = dict(_number_fields())
    assert fields[("train", "epochs")] is int and fields[("train", "lr")] is float  # the walk finds them
    assert fields[("data", "split", "train")] is float and fields[("register", "min_mean_accuracy")] is float
    assert fields[("train", "max_steps_per_epoch")] is int and fields[("train", "grad_clip")] is float
    for path, kind in fields.items():
        key = ".".join(path)
        bad = (True, False) if kind is int else (float("inf"), float("-inf"), float("nan"), True)
        for value in bad:
            msg = _error(_nested(path, value))
            assert f"key '{key}'" in msg, (key, value, msg)


def test_yaml_epochs_true_and_lr_inf_nan_are_refused_and_yaml_ints_pass(tmp_path: Path):
    def load(text: str):
        (tmp_path / "params.yaml").write_text(text)
        return load_config(tmp_path / "params.yaml")

    with pytest.raises(ConfigError, match=r"key 'train.epochs': must be an integer, not a boolean \(got True\)"):
        load("train:\n  epochs: true\n")
    for text in (".inf", ".nan", "-.inf"):
        with pytest.raises(ConfigError, match=r"key 'train.lr': Input should be a finite number"):
            load(f"train:\n  lr: {text}\n")
    with pytest.raises(ConfigError, match=r"key 'preprocess.std.2': Input should be a finite number"):
        load("preprocess:\n  std: [0.2, 0.2, .nan]\n")
    cfg = load("train:\n  epochs: 3\n  lr: 1\n  weight_decay: 0\n  max_steps_per_epoch: 4\n")
    assert cfg.train.epochs == 3 and cfg.train.max_steps_per_epoch == 4
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.weight_decay == 0.0
    with pytest.raises(ConfigError, match=r"key 'train.epochs': Input should be a valid integer"):
        load("train:\n  epochs: 2.5\n")
