"""The runtime below training, evaluation and inference: the device (cuda, then mps, then cpu), bf16
autocast on CUDA, seeding."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def select_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device is 'mps' but torch sees no MPS device")
    return torch.device(preference)


def amp_enabled(device: torch.device, amp: bool) -> bool:
    """bf16 autocast on CUDA (needs no loss scaling); CPU and MPS run in fp32."""
    return amp and device.type == "cuda"


@contextlib.contextmanager
def autocast(device: torch.device, amp: bool) -> Iterator[None]:
    if amp_enabled(device, amp):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
