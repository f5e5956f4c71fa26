"""`model.backbone: small_cnn` (and `small_cnn_gn`): a four-block CNN for quick runs and tests."""

from __future__ import annotations

import torch
from torch import nn


class SmallConvNet(nn.Module):
    """A four-block CNN for quick runs and tests (not from torchvision; no pretrained weights).

    `norm="group"`: GroupNorm (Wu & He, "Group Normalization", ECCV 2018) instead of BatchNorm, which
    normalises each sample on its own, so what a step computes does not depend on how the batch is
    split: N processes on CPU (where PyTorch has no SyncBatchNorm) train exactly as one does."""

    def __init__(self, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (width, width * 2, width * 4, width * 8):
            normalise = nn.GroupNorm(8, c_out) if norm == "group" else nn.BatchNorm2d(c_out)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), normalise, nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _small_cnn(weights: str | None = None, norm: str = "batch") -> nn.Module:
    if weights is not None:
        raise ValueError("backbone 'small_cnn' has no pretrained weights; set model.pretrained: false")
    return SmallConvNet(norm=norm)
