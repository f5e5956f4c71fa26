"""The names params.yaml gives to pluggable parts, checked against their registries when it is loaded.

`model.arch`, `model.arch_options`, `model.backbone`, `train.weighting` and `train.weighting_options`
are looked up in the registries (mtl_core.models, mtl_core.weighting; torchvision and timm for a
backbone outside the project's list, nothing built or downloaded), so a typo fails before ingest and
preprocess, with the allowed names listed.

This module can only refuse a configuration: it never changes what a stage computes from one. That is
why dvc.yaml does not make every stage depend on the registries it imports (tests/test_dvc_deps.py stops
at this module): editing a weighting method reruns train, not ingest.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Iterable
from typing import Any


def _one_of(names: list[str]) -> str:
    """'a', 'b' or 'c'."""
    quoted = [repr(n) for n in names]
    return " or ".join(filter(None, [", ".join(quoted[:-1]), quoted[-1]])) if quoted else ""


def _unknown(what: str, names: Iterable[str], available: Iterable[str], allowed: str = "available") -> str:
    """"<what> 'x' (did you mean 'y'?); <allowed>: a, b, c", for one or more unknown `names`."""
    available = list(available)
    parts = []
    for name in names:
        close = difflib.get_close_matches(str(name), [str(a) for a in available], n=3)
        parts.append(f"{name!r}" + (f" (did you mean {_one_of(close)}?)" if close else ""))
    return f"{what} {', '.join(parts)}; {allowed}: {', '.join(map(str, available)) or 'none'}"


def _keyword_options(init: Any, skip: Iterable[str]) -> list[str]:
    """The keyword arguments of a constructor (in declaration order), less `skip`."""
    params = inspect.signature(init).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name not in skip]


def _weighting_options(cls: type) -> list[str]:
    """The `train.weighting_options` a weighting class takes: the keyword arguments of its constructor
    and of those it passes **options on to (the LossWeighting base refuses any left over)."""
    from mtl_core.weighting import LossWeighting

    names: list[str] = []
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, LossWeighting)):
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        names += [n for n in _keyword_options(init, ("self", "task_names")) if n not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
            break
    return names


def _backbone_suggestions(name: str) -> list[str]:
    """Known backbone names close to `name` (the project's, torchvision's, timm's; with its prefix)."""
    from mtl_core.models import backbones

    prefix, sep, _ = name.partition(":")
    if sep and prefix not in backbones.BACKBONE_SOURCES:
        return []
    candidates: list[str] = [] if sep else list(backbones.BACKBONES)
    if not sep or backbones.BACKBONE_SOURCES[prefix] is backbones.BACKBONE_SOURCES["tv"]:
        from torchvision import models as tvm

        candidates += [(f"{prefix}:" if sep else "") + n for n in tvm.list_models(module=tvm)]
    if not sep or prefix == "timm":
        import timm

        candidates += [(f"{prefix}:" if sep else "") + n for n in timm.list_models()]
    return difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=3)


def check_arch(v: str) -> str:
    from mtl_core.models.architectures import ARCHITECTURES

    if v not in ARCHITECTURES:
        raise ValueError(_unknown("unknown architecture", [v], sorted(ARCHITECTURES)))
    return v


def check_arch_options(arch: str, v: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the architecture's constructor, as build_model takes them."""
    from mtl_core.models.architectures import ARCHITECTURES, BACKBONE_ARGUMENTS

    allowed = _keyword_options(ARCHITECTURES[arch].__init__, ("self", "num_classes", *BACKBONE_ARGUMENTS))
    unknown = [k for k in v if k not in allowed]
    if unknown:
        noun = "option" if len(unknown) == 1 else "options"
        raise ValueError(_unknown(f"arch {arch} has no {noun}", unknown, allowed, "allowed"))
    return v


def check_backbone(v: str) -> str:
    """Resolved as build_backbone resolves it (nothing is built or downloaded)."""
    from mtl_core.models.backbones import resolve_backbone

    try:
        resolve_backbone(v)
    except ValueError as err:
        close = _backbone_suggestions(v)
        raise ValueError(f"{err}" + (f"; did you mean {_one_of(close)}?" if close else "")) from None
    return v


def check_weighting(v: str) -> str:
    from mtl_core.weighting import WEIGHTINGS  # looked up at each check: a method registered later counts

    if v not in WEIGHTINGS:
        raise ValueError(_unknown("unknown weighting method", [v], sorted(WEIGHTINGS)))
    return v


def check_weighting_options(name: str, v: dict[str, Any]) -> dict[str, Any]:
    """Option names only (their values are checked when the method is built, at train)."""
    from mtl_core.weighting import WEIGHTINGS

    allowed = _weighting_options(WEIGHTINGS[name])
    unknown = [k for k in v if k not in allowed]
    if unknown:
        noun = "option" if len(unknown) == 1 else "options"
        raise ValueError(_unknown(f"{name} has no {noun}", unknown, allowed, "allowed"))
    return v


def check_pretrained(backbone: str, pretrained: bool | str) -> None:
    """`model.pretrained: true` asks the backbone's library for its weights: refused for a backbone
    that has none (the project's small_cnn), which would otherwise train from random init while the
    spec and MLflow record `pretrained: true`."""
    if pretrained is not True:
        return
    from mtl_core.models.backbones import resolve_backbone

    if resolve_backbone(backbone).weights is None:
        raise ValueError(
            f"model.backbone {backbone!r} has no pretrained weights: set model.pretrained: false, or give a "
            "local weights file (model.pretrained: <file>.safetensors) of this network"
        )


@functools.cache
def _prefect_croniter() -> Any:
    """The croniter that Prefect's CronSchedule validates with (prefect/_vendor/croniter): read from its
    file without importing the prefect package (1.3 s of imports on every params load otherwise)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("prefect")
    vendored = Path(spec.origin).parent / "_vendor" / "croniter" / "croniter.py" if spec and spec.origin else None
    if vendored is None or not vendored.is_file():  # another Prefect layout: its own validator, imported
        from prefect._vendor.croniter import croniter

        return croniter
    module_spec = importlib.util.spec_from_file_location("_mtl_prefect_croniter", vendored)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.croniter


def check_cron(v: str) -> str:
    """`schedule.cron` as Prefect's CronSchedule checks it (prefect._internal.schemas.validators:
    croniter.is_valid, and no random / hashed `R`, `H` fields), five fields."""
    if len(v.split()) != 5:
        raise ValueError(f"a cron expression has 5 fields (minute hour day month weekday), got {v!r}")
    if not _prefect_croniter().is_valid(v) or any(c.casefold() in ("r", "h") for c in v.split()):
        raise ValueError(
            f"not a valid cron expression for Prefect's scheduler: {v!r} (minute 0-59, hour 0-23, day 1-31, "
            "month 1-12, weekday 0-6; e.g. '0 3 * * 1' is Mondays at 03:00)"
        )
    return v


def check_timezone(v: str) -> str:
    """`schedule.timezone` as Prefect checks it: an IANA name of `zoneinfo.available_timezones()`."""
    import zoneinfo

    zones = zoneinfo.available_timezones()
    if v not in zones:
        close = difflib.get_close_matches(v, sorted(zones), n=3)
        hint = f" (did you mean {_one_of(close)}?)" if close else " (an IANA name such as UTC, Europe/Paris, America/New_York)"
        raise ValueError(f"unknown time zone {v!r}{hint}")
    return v


def _forced(cls: type, kwargs: dict[str, Any]) -> Any:
    """The transform with probability 1, so that a check sees what it does whenever it applies."""
    return cls(**{**kwargs, "p": 1.0})


def check_augment(steps: list[tuple[str, dict[str, Any]]], image_size: int) -> None:
    """Each `preprocess.augment` step built with Albumentations and applied (with p = 1) to images of the
    configured size, at load: an unknown transform or argument, a transform that fails on an image of
    this size (RandomCrop larger than the image) or one that changes its size is refused here, before
    ingest and preprocess run. A size-changing transform is refused rather than applied to every split:
    validation, test and serving see preprocess.image_size images, and the training images must too."""
    if not steps:
        return
    import os
    import warnings

    import numpy as np

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    transforms = []
    for index, (name, kwargs) in enumerate(steps):
        where = f"preprocess.augment[{index}] ({name})"
        cls = getattr(A, name, None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            close = difflib.get_close_matches(name, [n for n in dir(A) if not n.startswith("_")], n=3)
            raise ValueError(
                f"preprocess.augment[{index}]: unknown Albumentations transform {name!r}"
                + (f" (did you mean {_one_of(close)}?)" if close else "")
            )
        try:
            with warnings.catch_warnings():
                # Albumentations only warns about unknown arguments and then ignores them: refuse instead.
                warnings.filterwarnings("error", message=".*are not valid for transform", category=UserWarning)
                cls(**kwargs)
                transforms.append((where, _forced(cls, kwargs)))
        except Exception as err:  # albumentations validates arguments with pydantic / plain TypeErrors
            raise ValueError(f"{where}: invalid arguments {kwargs}: {' '.join(str(err).split())}") from None
    for draw in range(3):  # random parameters: a few draws of the whole chain, every step applied
        out = image
        for where, transform in transforms:
            transform.set_random_seed(draw)
            size = f"{out.shape[1]}x{out.shape[0]}"
            try:
                out = transform(image=out)["image"]
            except Exception as err:
                raise ValueError(
                    f"{where} fails on a {size} image (preprocess.image_size {image_size}): "
                    f"{type(err).__name__}: {' '.join(str(err).split())}"
                ) from None
        if out.shape != image.shape:
            raise ValueError(
                f"preprocess.augment changes the image size from {image_size}x{image_size} to "
                f"{out.shape[1]}x{out.shape[0]}: validation, test and serving see preprocess.image_size images, "
                "so training must too; set preprocess.image_size for the size you want, or use transforms that "
                f"keep the size (RandomResizedCrop with size: [{image_size}, {image_size}], Affine)"
            )
