"""The multi-task architectures beyond hard sharing: MMoE and cross-stitch networks."""

import pytest
import torch
from torch import nn

from mtl_core.models import ARCHITECTURES, build_backbone, build_model
from mtl_core.models import backbones as backbones_module
from mtl_core.models.architectures import CrossStitchUnit
from mtl_core.models.backbones.stage_split import split_stages

NUM_CLASSES = {"a": 2, "b": 5, "c": 7}
ARCHS = ["hard_sharing", "mmoe", "cross_stitch"]


def small(arch: str, **kwargs):
    torch.manual_seed(0)
    if kwargs:
        return ARCHITECTURES[arch](NUM_CLASSES, backbone="small_cnn", pretrained=False, **kwargs).eval()
    return build_model(arch, NUM_CLASSES, "small_cnn").eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_one_logit_tensor_per_task_with_its_class_count(arch, x):
    out = small(arch)(x)
    assert {t: tuple(v.shape) for t, v in out.items()} == {t: (4, n) for t, n in NUM_CLASSES.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_of_encode_is_forward(arch, x):
    model = small(arch)
    with torch.no_grad():
        z = model.encode(x)
        via_repr, direct = model.decode(z), model(x)
    for t in NUM_CLASSES:
        torch.testing.assert_close(via_repr[t], direct[t], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_and_task_parameters_partition_every_parameter_once(arch):
    model = small(arch)
    shared = [id(p) for p in model.shared_parameters()]
    private = {i for t in NUM_CLASSES for i in (id(p) for p in model.task_parameters(t))}
    assert len(shared) == len(set(shared)) and not set(shared) & private
    assert len(shared) + len(private) == len(list(model.parameters()))
    assert set(shared) | private == {id(p) for p in model.parameters()}
    assert shared and all(list(model.task_parameters(t)) for t in NUM_CLASSES), "every group is non-empty"


def test_representation_carries_all_dependence_on_shared_parameters(x):
    """Losses depend on the shared parameters only through `encode`: decode holds no shared parameter."""
    for arch in ("mmoe", "cross_stitch"):
        model = small(arch)
        z = model.encode(x).detach().requires_grad_()
        sum(v.sum() for v in model.decode(z).values()).backward()
        assert all(p.grad is None for p in model.shared_parameters()), arch
        assert z.grad is not None and torch.count_nonzero(z.grad) > 0


# --- MMoE ---------------------------------------------------------------------------------------


def test_mmoe_structure_and_representation_layout(x):
    model = small("mmoe")
    d, e, h = model.feature_dim, model.num_experts, model.expert_dim
    assert (d, e, h) == (256, 4, 128)
    assert model.encode(x).shape == (4, d + e * h)
    private = {id(p) for t in NUM_CLASSES for p in model.task_parameters(t)}
    gates_heads = {id(p) for m in (model.gates, model.heads) for p in m.parameters()}
    assert private == gates_heads
    assert {id(p) for p in model.shared_parameters()} == {
        id(p) for m in (model.backbone, model.experts) for p in m.parameters()
    }


def test_mmoe_gates_are_softmax_distributions(x):
    model = small("mmoe")
    with torch.no_grad():
        f, _ = model.split(model.encode(x))
        for t in NUM_CLASSES:
            g = model.gate(t, f)
            assert g.shape == (4, 4)
            assert (g > 0).all()
            torch.testing.assert_close(g.sum(1), torch.ones(4))
        # different tasks have different gates (independent initialisations)
        assert not torch.allclose(model.gate("a", f), model.gate("b", f))


def test_mmoe_gate_on_one_expert_routes_that_expert_to_the_head(x):
    model = small("mmoe")
    with torch.no_grad():
        model.gates["b"].weight.zero_()
        model.gates["b"].bias.copy_(torch.tensor([60.0, 0.0, 0.0, 0.0]))
        out = model(x)
        f = model.backbone(x)
        expected = model.heads["b"](model.experts[0](f))
        other = model.heads["b"](model.experts[1](f))
    torch.testing.assert_close(out["b"], expected)
    assert not torch.allclose(out["b"], other, atol=1e-3)
    # the other tasks still mix experts
    assert not torch.allclose(out["a"], model.heads["a"](model.experts[0](f)), atol=1e-3)


def test_mmoe_expert_options():
    model = small("mmoe", num_experts=2, expert_dim=16)
    assert len(model.experts) == 2 and model.heads["c"].in_features == 16
    assert model.encode(torch.randn(2, 3, 32, 32)).shape == (2, 256 + 2 * 16)


# --- cross-stitch --------------------------------------------------------------------------------


def test_cross_stitch_initial_matrices_are_the_documented_init():
    model = small("cross_stitch")
    assert len(model.stitches) == 4  # small_cnn: four conv blocks
    expected = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]])
    for unit in model.stitches:
        torch.testing.assert_close(unit.alpha.detach(), expected)
    torch.testing.assert_close(CrossStitchUnit.initial_alpha(2), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    assert CrossStitchUnit.initial_alpha(1).tolist() == [[1.0]]


def test_cross_stitch_parameters_are_branches_heads_and_shared_stitches():
    model = small("cross_stitch")
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.stitches.parameters()}
    for t in NUM_CLASSES:
        own = {id(p) for p in model.task_parameters(t)}
        assert own == {id(p) for m in (model.branches[t], model.pools[t], model.heads) for p in m.parameters()}
    # branches are independent copies, not the same module
    assert model.branches["a"][0][0].weight is not model.branches["b"][0][0].weight
    everything_shared = small("cross_stitch", task_specific_branches=False)
    private = {id(p) for t in NUM_CLASSES for p in everything_shared.task_parameters(t)}
    assert private == {id(p) for p in everything_shared.heads.parameters()}


def test_cross_stitch_with_identity_stitches_is_k_independent_networks(x):
    model = small("cross_stitch")
    with torch.no_grad():
        for unit in model.stitches:
            unit.alpha.copy_(torch.eye(3))
        out = model(x)
        for t in NUM_CLASSES:
            h = x
            for stage in model.branches[t]:
                h = stage(h)
            alone = model.heads[t](model.pools[t](h))
            torch.testing.assert_close(out[t], alone)
        # with the initial (mixing) stitches the outputs differ from the isolated branches
        for unit in model.stitches:
            unit.alpha.copy_(CrossStitchUnit.initial_alpha(3))
        assert not torch.allclose(model(x)["a"], out["a"], atol=1e-4)


def test_cross_stitch_backward_reaches_every_stitch_unit(x):
    model = small("cross_stitch").train()
    y = {t: torch.randint(0, n, (4,), generator=torch.Generator().manual_seed(2)) for t, n in NUM_CLASSES.items()}
    out = model(x)
    sum(nn.functional.cross_entropy(out[t], y[t]) for t in NUM_CLASSES).backward()
    for unit in model.stitches:
        assert unit.alpha.grad is not None and torch.count_nonzero(unit.alpha.grad) > 0
        # off-diagonal entries get gradient too: tasks really exchange information
        off = unit.alpha.grad[~torch.eye(3, dtype=torch.bool)]
        assert torch.count_nonzero(off) > 0


def test_cross_stitch_single_task_is_the_plain_network(x):
    torch.manual_seed(0)
    model = ARCHITECTURES["cross_stitch"]({"only": 3}, backbone="small_cnn").eval()
    with torch.no_grad():
        h = x
        for stage in model.branches["only"]:
            h = stage(h)
        torch.testing.assert_close(model(x)["only"], model.heads["only"](model.pools["only"](h)))


@pytest.mark.parametrize(("backbone", "num_stages"), [("resnet18", 5), ("mobilenet_v3_small", 4)])
def test_stage_split_composes_to_the_backbone(backbone, num_stages):
    torch.manual_seed(0)
    net, dim = build_backbone(backbone)
    net.eval()
    stages, pool = split_stages(net, backbone)
    assert len(stages) == num_stages
    # the stages reuse the backbone's own parameters, all of them
    assert {id(p) for m in (stages, pool) for p in m.parameters()} == {id(p) for p in net.parameters()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = x
        for stage in stages:
            h = stage(h)
        torch.testing.assert_close(pool(h), net(x), rtol=0, atol=0)
    assert pool(h).shape == (2, dim)


def test_cross_stitch_on_mobilenet_shapes():
    torch.manual_seed(0)
    model = build_model("cross_stitch", {"a": 2, "b": 5}, "mobilenet_v3_small").eval()
    assert len(model.stitches) == 4
    with torch.no_grad():
        z = model.encode(torch.randn(2, 3, 64, 64))
    assert z.shape == (2, 2, 576)
    assert {t: tuple(v.shape) for t, v in model.decode(z).items()} == {"a": (2, 2), "b": (2, 5)}


def test_unsplittable_backbone_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="cannot split backbone 'mlp' \\(Linear\\)"):
        split_stages(nn.Linear(4, 4), "mlp")
    fake = backbones_module.Backbone(lambda weights=None: nn.Flatten(), "", lambda net: 3 * 32 * 32)
    monkeypatch.setitem(backbones_module.BACKBONES, "flat", fake)
    assert build_model("hard_sharing", NUM_CLASSES, "flat")(torch.randn(1, 3, 32, 32))["a"].shape == (1, 2)
    with pytest.raises(ValueError, match="cannot split backbone 'flat' \\(Flatten\\)"):
        build_model("cross_stitch", NUM_CLASSES, "flat")


# --- registry ------------------------------------------------------------------------------------


def test_registry_builds_every_architecture_and_lists_them_on_error():
    assert {"hard_sharing", "mmoe", "cross_stitch"} <= set(ARCHITECTURES)
    assert type(build_model("mmoe", NUM_CLASSES, "small_cnn")).__name__ == "MultiGateMixtureOfExperts"
    assert type(build_model("cross_stitch", NUM_CLASSES, "small_cnn")).__name__ == "CrossStitch"
    with pytest.raises(ValueError, match="unknown model.arch 'soft'") as err:
        build_model("soft", NUM_CLASSES, "small_cnn")
    listed = str(err.value).split("available: ")[1].split(", ")
    assert listed == sorted(ARCHITECTURES)


def test_constructors_are_deterministic_given_the_spec_arguments(x):
    """A model spec stores arch, its options and backbone (+ tasks): rebuilding from them gives a network with the
    same parameter names and shapes, so a saved state dict loads into it and reproduces the outputs."""
    for arch in ("mmoe", "cross_stitch"):
        a, b = small(arch), small(arch)
        assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
        b.load_state_dict(a.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(a(x)["c"], b(x)["c"])


def test_arch_options_from_params_reach_the_network_and_survive_the_model_spec(tmp_path, x):
    """`model.arch_options` is written into the spec, so a loaded model has the trained shape."""
    from safetensors.torch import save_file

    from mtl_core.config import PipelineConfig
    from mtl_core.models.io import load_model
    from mtl_core.tasks import TaskSpec
    from mtl_core.models.io import write_spec
    from mtl_core.training.model_files import spec_for

    cfg = PipelineConfig.model_validate(
        {"model": {"arch": "mmoe", "arch_options": {"num_experts": 2, "expert_dim": 8}, "backbone": "small_cnn"}}
    )
    torch.manual_seed(0)
    model = build_model("mmoe", NUM_CLASSES, "small_cnn", options=cfg.model.arch_options).eval()
    assert model.num_experts == 2 and model.gates["a"].out_features == 2 and model.expert_dim == 8
    write_spec(tmp_path / "model_spec.json", spec_for(cfg, TaskSpec({t: [str(i) for i in range(n)] for t, n in NUM_CLASSES.items()})))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    loaded, spec = load_model(tmp_path / "model_spec.json", tmp_path / "model.safetensors")
    assert spec["arch_options"] == {"num_experts": 2, "expert_dim": 8}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["b"], model(x)["b"])


def test_unknown_arch_option_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown model.arch_options \['experts'\] for arch 'mmoe'; allowed: num_experts, expert_dim"):
        build_model("mmoe", NUM_CLASSES, "small_cnn", options={"experts": 3})
    with pytest.raises(ValueError, match=r"for arch 'hard_sharing'; allowed: dropout$"):
        build_model("hard_sharing", NUM_CLASSES, "small_cnn", options={"num_experts": 3})
