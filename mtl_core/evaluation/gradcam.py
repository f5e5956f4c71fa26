"""Where does each task head look? Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from
Deep Networks via Gradient-based Localization", ICCV) of the shared backbone, per task head.

For task t and an image, the activations A (C, h, w) of the last convolution the task's logits depend
on (the shared backbone's, or the task's own branch's for cross-stitch, the task's group network's for
task groups) and the gradient of the task's logit for its predicted class with respect to them: the
channel weights are the gradient's spatial mean, and the heat map is ReLU(Σ_c w_c A_c), upsampled to the
image and scaled to [0, 1]. Written here (a forward hook and one backward pass per task) rather than taken
from the `grad-cam` package: the per-task target layer of a multi-task network is this project's
knowledge, and the method is ten lines of torch.

A backbone without a convolution (a vision transformer) has no spatial map to weigh: `target_layer` is
None and the caller skips it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtl_core.models import MultiTaskModel
from mtl_core.models.architectures import CrossStitch
from mtl_core.models.grouped import TaskGroupedModel


def _last_conv(module: nn.Module) -> nn.Conv2d | None:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def target_layer(model: MultiTaskModel, task: str) -> nn.Module | None:
    """The last convolution task `task`'s logits depend on (None: the network has none)."""
    if isinstance(model, TaskGroupedModel):
        return target_layer(model.members[model._member_of[task]], task)
    if isinstance(model, CrossStitch):
        return _last_conv(model.branches[task])
    backbone = getattr(model, "backbone", model)
    return _last_conv(backbone)


def grad_cam(model: MultiTaskModel, images: torch.Tensor, task: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(heat maps (N, H, W) in [0, 1], predicted class (N,)) of `task` for a normalised batch (N, 3, H, W);
    None when the network has no convolution to explain."""
    layer = target_layer(model, task)
    if layer is None:
        return None
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["a"] = output

    model.eval()
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)  # gradients flow even where the weights are frozen
            logits = model(x)[task]
            predicted = logits.argmax(dim=1)
            model.zero_grad(set_to_none=True)
            logits.gather(1, predicted[:, None]).sum().backward()
    finally:
        handle.remove()
    a, g = captured["a"].detach(), captured["a"].grad.detach()
    weights = g.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
    return (cam / peak).numpy(), predicted.numpy()
