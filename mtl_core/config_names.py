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
