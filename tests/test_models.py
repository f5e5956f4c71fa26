import pytest
import torch

from mtl_core.losses import task_losses
from mtl_core.models import build_model
from mtl_core.tasks import MISSING_LABEL

NUM_CLASSES = {"shape": 5, "color": 6, "size": 3, "position": 4}


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18", "mobilenet_v3_small"])
def test_hard_sharing_gives_one_logit_tensor_per_task(backbone):
    model = build_model("hard_sharing", NUM_CLASSES, backbone).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert {t: tuple(v.shape) for t, v in out.items()} == {t: (2, n) for t, n in NUM_CLASSES.items()}


def test_shared_and_task_parameters_partition_the_model():
    model = build_model("hard_sharing", NUM_CLASSES, "small_cnn")
    shared = {id(p) for p in model.shared_parameters()}
    private = [{id(p) for p in model.task_parameters(t)} for t in NUM_CLASSES]
    # every task's own parameters are the fused heads' weight + bias (its loss reaches only its rows)
    assert all(p == {id(model.heads.weight), id(model.heads.bias)} for p in private)
    assert shared == {id(p) for p in model.backbone.parameters()}
    assert len(shared) + 2 == len(list(model.parameters()))
    assert shared | private[0] == {id(p) for p in model.parameters()}


def test_unknown_backbone_and_arch_list_the_choices():
    with pytest.raises(ValueError, match="unknown model.backbone 'resnet9'; available: .*resnet18"):
        build_model("hard_sharing", NUM_CLASSES, "resnet9")
    with pytest.raises(ValueError, match="unknown model.arch 'soft'; available: cross_stitch, hard_sharing, mmoe"):
        build_model("soft", NUM_CLASSES, "small_cnn")


def test_missing_label_gives_zero_gradient_to_that_task_head():
    torch.manual_seed(0)
    model = build_model("hard_sharing", NUM_CLASSES, "small_cnn")
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([[0, 1, 2, 3], [1, 2, 0, 1], [2, 3, 1, 0], [3, 4, 2, 2]])
    y[:, 1] = MISSING_LABEL  # no sample has a colour label
    y[0, 0] = MISSING_LABEL  # one sample has no shape label
    losses = task_losses(model(x), y, list(NUM_CLASSES))
    sum(losses.values()).backward()
    assert all(torch.count_nonzero(g) == 0 for g in model.heads["color"].gradients())
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in model.heads["shape"].gradients())
    # the shape loss is the mean over its three labelled samples only
    logits = model(x)["shape"][1:]
    expected = torch.nn.functional.cross_entropy(logits, y[1:, 0])
    assert float(task_losses(model(x), y, list(NUM_CLASSES))["shape"]) == pytest.approx(float(expected), rel=1e-5)
