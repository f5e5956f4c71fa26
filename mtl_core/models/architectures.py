"""Multi-task architectures (`model.arch`): a registry of classes with one interface.

Every architecture maps images to one logit tensor per task and separates its parameters into the
shared part and each task's own part, which gradient-balancing methods need. `encode` returns the
shared representation and `decode` the per-task logits, so representation-gradient methods (MGDA-UB
style) can differentiate with respect to the representation.
"""

from __future__ import annotations

import inspect

from abc import abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_core.models.backbones import build_backbone
from mtl_core.models.stages import split_stages


class HeadView:
    """Task `task`'s head inside a `LinearHeads`: its rows of the fused weight and bias (views, so
    they follow training; not Parameters: the optimizer and `.grad` live on the fused ones)."""

    def __init__(self, heads: LinearHeads, task: str) -> None:
        self._heads, self.task = heads, task
        self.in_features, self.out_features = heads.in_features, heads.num_classes[task]

    @property
    def rows(self) -> slice:
        return self._heads.rows[self.task]

    @property
    def weight(self) -> Tensor:
        return self._heads.weight[self.rows]

    @property
    def bias(self) -> Tensor:
        return self._heads.bias[self.rows]

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def gradients(self) -> list[Tensor | None]:
        """This head's rows of the fused weight's and bias's `.grad` (None where there is none)."""
        return [None if p.grad is None else p.grad[self.rows] for p in (self._heads.weight, self._heads.bias)]


class LinearHeads(nn.Module):
    """K linear heads as one layer: a (sum_t C_t, D) weight, task t's rows `rows[t]`.

    Why: K separate `nn.Linear` cost K matmuls forward, K in backward, 2K parameters for the optimizer
    and 2K gradient accumulations per step, which at tens of tasks is what grows with K (bench/
    task_scaling.py). Here a step costs one matmul whatever K (`forward`: every head reads the same
    input; `per_task`: head t reads its own input, as MMoE's and cross-stitch's heads do, one gather
    and one batched product). Logits are split views of one (N, sum C) tensor.

    Task t's parameters are the fused `weight` and `bias` (shared objects, but only t's rows ever get
    t's gradient: a per-task gradient w.r.t. them is zero outside t's rows, so K of them accumulate
    into exactly each head's own gradient). Indexing gives one head (`heads[t]`: a `HeadView`).

    The state dict keeps one entry per task, `<prefix><task>.weight` / `.bias`, exactly what K
    `nn.Linear` in a ModuleDict wrote: checkpoints and model files are the same format either way, and
    files written before the heads were fused load unchanged. A state dict with the fused
    `<prefix>weight` / `<prefix>bias` loads too."""

    def __init__(self, in_features: int, num_classes: dict[str, int]) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = dict(num_classes)
        self.sizes = list(self.num_classes.values())
        self.rows: dict[str, slice] = {}
        start = 0
        for t, n in self.num_classes.items():
            self.rows[t] = slice(start, start + n)
            start += n
        self.weight = nn.Parameter(torch.empty(start, in_features))
        self.bias = nn.Parameter(torch.empty(start))
        with torch.no_grad():  # each head initialised like its own nn.Linear(in_features, C_t)
            for t, n in self.num_classes.items():
                head = nn.Linear(in_features, n)
                self.weight[self.rows[t]] = head.weight
                self.bias[self.rows[t]] = head.bias
        # per_task's column -> task index, for the gather
        self.register_buffer("column_task", torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes)), persistent=False)

    def split(self, logits: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.num_classes, logits.split(self.sizes, dim=-1)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Every head on the same input x (N, D)."""
        return self.split(F.linear(x, self.weight, self.bias))

    def per_task(self, xs: Tensor) -> dict[str, Tensor]:
        """Head t on xs[:, t] (xs: (N, K, D)): column j of the fused output reads its task's input."""
        picked = xs.index_select(1, self.column_task)  # (N, sum C, D)
        return self.split(torch.einsum("njd,jd->nj", picked, self.weight.to(xs.dtype)) + self.bias.to(xs.dtype))

    def __getitem__(self, task: str) -> HeadView:
        if task not in self.rows:
            raise KeyError(task)
        return HeadView(self, task)

    def __iter__(self) -> Iterator[str]:
        return iter(self.num_classes)

    def __len__(self) -> int:
        return len(self.num_classes)

    def __contains__(self, task: object) -> bool:
        return task in self.rows

    def keys(self) -> list[str]:
        return list(self.num_classes)

    def values(self) -> list[HeadView]:
        return [self[t] for t in self.num_classes]

    def items(self) -> list[tuple[str, HeadView]]:
        return [(t, self[t]) for t in self.num_classes]

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # copies: safetensors refuses tensors that share memory, and the rows are views of one weight
        weight, bias = (self.weight, self.bias) if keep_vars else (self.weight.detach(), self.bias.detach())
        for t, rows in self.rows.items():
            destination[f"{prefix}{t}.weight"] = weight[rows].clone()
            destination[f"{prefix}{t}.bias"] = bias[rows].clone()

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        """Per-task keys (the saved format) or the fused `weight` / `bias`: either fills the fused
        parameters; a head of the wrong shape is an error naming the task."""
        fused = {name: state_dict.get(prefix + name) for name in ("weight", "bias")}
        if all(v is not None for v in fused.values()):
            rows = {name: [v] for name, v in fused.items()}
        else:
            rows = {"weight": [], "bias": []}
            for t in self.num_classes:
                for name in ("weight", "bias"):
                    key = f"{prefix}{t}.{name}"
                    if key in state_dict:
                        rows[name].append(state_dict[key])
                    else:
                        missing_keys.append(key)
            if any(len(v) != len(self.num_classes) for v in rows.values()):
                return
        with torch.no_grad():
            for name, parts in rows.items():
                target = getattr(self, name)
                if len(parts) == 1:
                    shapes, wanted = [tuple(parts[0].shape)], [tuple(target.shape)]
                else:  # per task: equal totals could hide two heads of swapped sizes
                    shapes = [tuple(p.shape) for p in parts]
                    wanted = [tuple(target[rows].shape) for rows in self.rows.values()]
                if shapes != wanted:
                    found = dict(zip(self.num_classes, shapes)) if len(parts) > 1 else shapes[0]
                    error_msgs.append(
                        f"size mismatch for {prefix}{name}: heads of shapes {found} in the state dict, the model's "
                        f"are {self.num_classes} classes on {self.in_features} features"
                    )
                    continue
                target.copy_(torch.cat([p.to(target.device, target.dtype) for p in parts]))
        if strict:
            own = {f"{prefix}{t}.{n}" for t in self.num_classes for n in ("weight", "bias")} | {prefix + "weight", prefix + "bias"}
            unexpected_keys += [k for k in state_dict if k.startswith(prefix) and k not in own]  # e.g. a task the model lacks


class MultiTaskModel(nn.Module):
    """Base class: images (N, 3, H, W) -> {task: logits (N, C_task)}."""

    def __init__(self, num_classes: dict[str, int]) -> None:
        super().__init__()
        self.task_names = list(num_classes)
        self.num_classes = dict(num_classes)

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """The shared representation."""

    @abstractmethod
    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """Per-task logits from the shared representation."""

    @abstractmethod
    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters used by one task only."""

    @property
    def exact_representation_gradients(self) -> bool:
        """Whether task losses reach every task-specific parameter only after `encode` (so methods with
        `on: representation` compute exact gradients). False when task-specific parameters sit inside
        the encoder (cross-stitch branches)."""
        return True

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def shared_parameters(self) -> list[nn.Parameter]:
        private = {id(p) for t in self.task_names for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in private]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone network's parameters (what `model.pretrained` initialises), which get
        `train.backbone_lr_scale` x the learning rate and are frozen for `train.freeze_backbone_epochs`:
        by default the shared parameters (hard sharing: exactly the backbone). Overridden where the
        split differs: MMoE's experts are shared but new, cross-stitch's backbones are per task."""
        return self.shared_parameters()

    def last_shared_layer(self) -> list[nn.Parameter] | None:
        """The weight of the last layer every task's output goes through (GradNorm's W): by default the
        last trainable shared parameter with >= 2 dims, in registration (= forward) order. None where
        there is no single one (overridden by MMoE and cross-stitch)."""
        for p in reversed(self.shared_parameters()):
            if p.requires_grad and p.dim() >= 2:
                return [p]
        return None


ARCHITECTURES: dict[str, type[MultiTaskModel]] = {}


def register_architecture(name: str) -> Callable[[type[MultiTaskModel]], type[MultiTaskModel]]:
    def deco(cls: type[MultiTaskModel]) -> type[MultiTaskModel]:
        ARCHITECTURES[name] = cls
        return cls

    return deco


@register_architecture("hard_sharing")
class HardSharing(MultiTaskModel):
    """Hard parameter sharing (Caruana 1997): one backbone, one linear head per task."""

    def __init__(
        self, num_classes: dict[str, int], backbone: str = "resnet18", pretrained: bool | str | Path = False,
        stem: str = "imagenet",
    ) -> None:  # fmt: skip
        super().__init__(num_classes)
        self.backbone, dim = build_backbone(backbone, pretrained, stem)
        self.heads = LinearHeads(dim, num_classes)

    def encode(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return self.heads(z)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The fused heads (`LinearHeads`: every task's are the same two Parameters; task t's loss
        reaches only its rows), so the shared parameters are exactly the backbone's."""
        return self.heads.parameters()


@register_architecture("mmoe")
class MultiGateMixtureOfExperts(MultiTaskModel):
    """Multi-gate Mixture-of-Experts, MMoE (Ma, Zhao, Yi, Chen, Hong & Chi 2018, "Modeling Task
    Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD).

    The backbone gives features f (N, D). `num_experts` shared experts (each Linear(D, H) + ReLU, H =
    `expert_dim`, default D // 2) map f to e_1..e_E (N, H); each task t has its own softmax gate
    g_t = softmax(Linear(D, E)(f)) and head: logits_t = head_t(sum_e g_t,e * e_e).

    Shared / task-specific: backbone + experts are shared; task t's gate and head are its own.
    Representation (`encode`): concat(f, e_1, ..., e_E) of shape (N, D + E*H) -- everything the gates
    and heads need, so `decode` holds exactly the task-specific parameters and representation-gradient
    methods (`on: representation`) see the losses depend on the backbone and experts only through it.

    Cost relative to hard sharing: the same backbone pass, plus E*(D*H + H) expert parameters,
    K*(D*E + E) gate parameters and heads on H instead of D inputs (resnet18, D=512, E=4, H=256:
    ~0.53 M extra parameters on an 11.2 M backbone); compute and memory are a few small matmuls on
    (N, D) features -- negligible next to the backbone. `on: representation` costs K*N*(D + E*H)
    floats instead of K*N*D.
    """

    def __init__(
        self,
        num_classes: dict[str, int],
        backbone: str = "resnet18",
        pretrained: bool | str | Path = False,
        num_experts: int = 4,
        expert_dim: int | None = None,
        stem: str = "imagenet",
    ) -> None:
        super().__init__(num_classes)
        if num_experts < 1:
            raise ValueError(f"mmoe needs at least one expert, got num_experts={num_experts}")
        self.backbone, dim = build_backbone(backbone, pretrained, stem)
        self.feature_dim = dim
        self.num_experts = num_experts
        self.expert_dim = expert_dim or max(dim // 2, 1)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, self.expert_dim), nn.ReLU()) for _ in range(num_experts)
        )
        self.gates = LinearHeads(dim, {t: num_experts for t in num_classes})
        self.heads = LinearHeads(self.expert_dim, num_classes)

    def encode(self, x: Tensor) -> Tensor:
        f = self.backbone(x)
        experts = torch.stack([expert(f) for expert in self.experts], dim=1)  # (N, E, H)
        return torch.cat([f, experts.flatten(1).to(f.dtype)], dim=1)

    def split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The representation split back into features f (N, D) and expert outputs (N, E, H)."""
        return z[:, : self.feature_dim], z[:, self.feature_dim :].unflatten(1, (self.num_experts, self.expert_dim))

    def gate(self, task: str, f: Tensor) -> Tensor:
        """Task `task`'s mixture weights (N, E): a softmax over the experts."""
        return torch.softmax(self.gates[task](f), dim=1)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """All K gates in one matmul, all K mixtures in one einsum, all K heads in one `per_task`."""
        f, experts = self.split(z)
        gates = torch.softmax(F.linear(f, self.gates.weight, self.gates.bias).unflatten(1, (len(self.task_names), self.num_experts)), dim=2)
        mixtures = torch.einsum("nke,neh->nkh", gates.to(experts.dtype), experts)  # (N, K, H)
        return self.heads.per_task(mixtures)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The fused gates and heads (see `LinearHeads`)."""
        yield from self.gates.parameters()
        yield from self.heads.parameters()

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone alone: the experts are shared, but newly initialised like the gates and heads."""
        return list(self.backbone.parameters())

    def last_shared_layer(self) -> None:
        """None: the experts run side by side, so no one shared layer sees every task's gradient (the
        last registered parameter is one expert's weight)."""
        return None


class CrossStitchUnit(nn.Module):
    """Mixes K task activations linearly: out_i = sum_j alpha[i, j] * in_j (alpha learned, K x K).

    Initialised to `alpha_same` on the diagonal and (1 - alpha_same) / (K - 1) off it, so rows sum to
    one (for K = 1 alpha is [[1]]: nothing to mix)."""

    def __init__(self, num_tasks: int, alpha_same: float = 0.9) -> None:
        super().__init__()
        self.alpha = nn.Parameter(self.initial_alpha(num_tasks, alpha_same))

    @staticmethod
    def initial_alpha(num_tasks: int, alpha_same: float = 0.9) -> Tensor:
        if num_tasks == 1:
            return torch.ones(1, 1)
        alpha = torch.full((num_tasks, num_tasks), (1.0 - alpha_same) / (num_tasks - 1))
        return alpha.fill_diagonal_(alpha_same)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        stacked = torch.stack(xs)  # (K, N, ...)
        return list(torch.einsum("ij,j...->i...", self.alpha.to(stacked.dtype), stacked).unbind(0))


@register_architecture("cross_stitch")
class CrossStitch(MultiTaskModel):
    """Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert 2016, "Cross-stitch Networks for
    Multi-task Learning", CVPR).

    One copy of the backbone per task (branch t), split into sequential stages (`stages.split_stages`:
    ResNet stem + layer1..4, small_cnn's conv blocks, ~4 groups of `features` for MobileNetV3 /
    EfficientNet / ConvNeXt). After every stage a cross-stitch unit (a learned K x K matrix, initialised
    to 0.9 on the diagonal and 0.1 / (K - 1) off it, the paper's (alpha_S, alpha_D) = (0.9, 0.1)) mixes
    the K branches' activations; each branch then pools its activations and task t's linear head reads
    branch t. With identity stitches the model is exactly K independent single-task networks.

    Shared / task-specific (the honest consequence of one backbone per task): task t's parameters are
    its backbone copy and its head; `shared_parameters()` are only the cross-stitch units. Hence
    gradient-balancing methods with `on: params` balance only the stitch units; each branch and head is
    trained on the gradient of its own task's loss alone (the gradient other tasks' losses send into
    branch t through the stitches is dropped; loss-weighting methods such as `equal` backpropagate the
    weighted sum and keep it). `encode` returns the stacked per-task final features (N, K, D) and
    `decode` applies head t to slice t. Caveat for `on: representation`: the branches lie before that
    representation, so each branch would get its own task's gradient directly AND the combined
    gradient through the representation; use `on: params` (or `task_specific_branches=False`, which
    makes everything but the heads shared, so that gradient balancing acts on all K backbones and the
    stitches -- K x K x P memory for `on: params` -- and `on: representation` is exact).

    Cost relative to hard sharing: K x the backbone -- K x the parameters, FLOPs and activation memory
    (e.g. 3 tasks on resnet18: 33.5 M instead of 11.2 M parameters) -- plus K^2 parameters per stitch
    unit and one K-way mix of each stage's activations. The paper also trains the stitch units with a
    larger learning rate than the rest; here they use the optimizer's learning rate like every parameter.
    """

    def __init__(
        self,
        num_classes: dict[str, int],
        backbone: str = "resnet18",
        pretrained: bool | str | Path = False,
        alpha_same: float = 0.9,
        task_specific_branches: bool = True,
        stem: str = "imagenet",
    ) -> None:
        super().__init__(num_classes)
        self.backbone_name = backbone
        self.task_specific_branches = task_specific_branches
        self.branches = nn.ModuleDict()
        self.pools = nn.ModuleDict()
        dims = set()
        for t in self.task_names:
            net, dim = build_backbone(backbone, pretrained, stem)
            stages, pool = split_stages(net, backbone)
            self.branches[t], self.pools[t] = stages, pool
            dims.add(dim)
        (dim,) = dims
        num_stages = len(self.branches[self.task_names[0]])
        self.stitches = nn.ModuleList(CrossStitchUnit(len(self.task_names), alpha_same) for _ in range(num_stages))
        self.heads = LinearHeads(dim, num_classes)

    @property
    def exact_representation_gradients(self) -> bool:
        return not self.task_specific_branches

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every task's backbone copy (branch + pool), task-specific or not; not the stitch units."""
        return [p for t in self.task_names for m in (self.branches[t], self.pools[t]) for p in m.parameters()]

    def last_shared_layer(self) -> None:
        """None: with per-task branches the only shared parameters are the K x K stitches (the last
        one mixes final activations, not a layer every task's features are computed by)."""
        return None

    def encode(self, x: Tensor) -> Tensor:
        hs = [x] * len(self.task_names)
        for s, stitch in enumerate(self.stitches):
            hs = stitch([self.branches[t][s](h) for t, h in zip(self.task_names, hs)])
        return torch.stack([self.pools[t](h) for t, h in zip(self.task_names, hs)], dim=1)  # (N, K, D)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return self.heads.per_task(z)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if self.task_specific_branches:
            yield from self.branches[task].parameters()
            yield from self.pools[task].parameters()
        yield from self.heads.parameters()  # fused (see `LinearHeads`)


BACKBONE_ARGUMENTS = ("backbone", "pretrained", "stem")
"""How every architecture's constructor is told its backbone (see backbones.build_backbone); the
other keyword arguments are its `model.arch_options`."""


def build_model(
    arch: str,
    num_classes: dict[str, int],
    backbone: str,
    pretrained: bool | str | Path = False,
    options: dict | None = None,
    stem: str = "imagenet",
) -> MultiTaskModel:
    """The architecture `arch` on `backbone` (with `pretrained` weights and `stem`, as build_backbone
    takes them); `options` (params' `model.arch_options`) are its keyword arguments, e.g. `num_experts`
    for mmoe; an unknown one fails naming the ones `arch` takes."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {arch!r}; available: {', '.join(sorted(ARCHITECTURES))}")
    cls = ARCHITECTURES[arch]
    options = dict(options or {})
    skip = ("self", "num_classes", *BACKBONE_ARGUMENTS)
    allowed = [n for n in inspect.signature(cls.__init__).parameters if n not in skip]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown model.arch_options {unknown} for arch {arch!r}; allowed: {', '.join(allowed) or 'none'}"
        )
    return cls(num_classes, backbone=backbone, pretrained=pretrained, stem=stem, **options)


@torch.no_grad()
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
