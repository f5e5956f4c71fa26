"""Split a backbone (`registry.py`) into sequential stages (used by cross-stitch networks).

`split_stages(net, name)` returns `(stages, pool)` such that, for the stripped backbone `net`,

    pool(stages[-1](...stages[1](stages[0](x))...)) == net(x)

The stages reuse `net`'s own modules (no copies), so their parameters are exactly the backbone's.

* torchvision ResNets: stem (conv1, bn1, relu, maxpool), layer1, layer2, layer3, layer4 (5 stages);
  pool = avgpool + flatten (+ the stripped `fc`, an Identity). With `model.stem: small` the stem is
  the same modules (conv1 the 3x3 stride-1 conv, maxpool an Identity).
* timm ResNets (`timm:resnet18`, `timm:resnet10t`, ...): the same five stages (act1 for relu);
  pool = global_pool (average + flatten) + the stripped `fc`.
* `small_cnn`: its four conv blocks (each ends with its MaxPool2d); pool = its global average pool
  + flatten.
* MobileNetV3 / EfficientNet / ConvNeXt: the children of `features` cut into `num_groups` (default 4)
  contiguous groups, as equal in length as possible; pool = avgpool + flatten (+ the stripped
  classifier; for ConvNeXt its LayerNorm and Flatten).

Any other network raises a ValueError naming the backbone.
"""

from __future__ import annotations

from torch import nn

from mtl_core.models.backbones.small_cnn import SmallConvNet
from mtl_core.models.backbones.stems import is_instance_of


def _groups(children: list[nn.Module], num_groups: int) -> list[nn.Module]:
    """`children` cut into min(num_groups, len) contiguous groups whose lengths differ by at most one."""
    n = min(num_groups, len(children))
    bounds = [round(i * len(children) / n) for i in range(n + 1)]
    return [nn.Sequential(*children[a:b]) for a, b in zip(bounds, bounds[1:])]


def _small_cnn(net: SmallConvNet) -> tuple[list[nn.Module], nn.Module]:
    stages, block = [], []
    children = list(net.features.children())
    for i, m in enumerate(children):
        block.append(m)
        if isinstance(m, nn.MaxPool2d):
            stages.append(nn.Sequential(*block))
            block = []
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            return stages, nn.Sequential(*children[i:])
    raise ValueError("small_cnn: expected conv blocks ending in MaxPool2d, then AdaptiveAvgPool2d")


def split_stages(net: nn.Module, name: str, num_groups: int = 4) -> tuple[nn.ModuleList, nn.Module]:
    """(stages, pool) of the stripped backbone `net` (built as `name`); see the module docstring."""
    if isinstance(net, SmallConvNet):
        stages, pool = _small_cnn(net)
        return nn.ModuleList(stages), pool
    if is_instance_of(net, "timm.models.resnet.ResNet"):  # forward_features, then forward_head (drop_rate 0)
        stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
        pool = nn.Sequential(net.global_pool, net.fc)
        return nn.ModuleList([stem, net.layer1, net.layer2, net.layer3, net.layer4]), pool
    from torchvision import models as tvm  # only for torchvision backbones (see backbones.Backbone)

    if isinstance(net, tvm.ResNet):
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        stages = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
        pool: nn.Module = nn.Sequential(net.avgpool, nn.Flatten(1), net.fc)
    elif isinstance(net, (tvm.MobileNetV3, tvm.EfficientNet, tvm.ConvNeXt)):
        stages = _groups(list(net.features.children()), num_groups)
        if isinstance(net, tvm.ConvNeXt):  # avgpool, then classifier = LayerNorm2d, Flatten, (Identity)
            pool = nn.Sequential(net.avgpool, net.classifier)
        else:  # avgpool, torch.flatten, then the (stripped) classifier
            pool = nn.Sequential(net.avgpool, nn.Flatten(1), net.classifier)
    else:
        raise ValueError(
            f"cannot split backbone {name!r} ({type(net).__name__}) into stages for cross-stitch; "
            "supported: torchvision ResNet, MobileNetV3, EfficientNet, ConvNeXt, timm ResNet, and small_cnn"
        )
    return nn.ModuleList(stages), pool
