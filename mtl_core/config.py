"""params.yaml -> validated, typed configuration.

params.yaml is the single source of every knob. It is validated once, at load, into frozen pydantic
models: an unknown or mistyped key fails here, with the key's dotted name and the allowed keys, rather
than deep inside a stage. So do an unknown `model.arch`, `model.backbone` or `train.weighting`, an
option they do not take (the allowed ones listed), a boolean for an integer and inf / nan for a number.
"""

from __future__ import annotations

import codecs
import math
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mtl_core import config_names

BUILTIN_PREFIX = "builtin:"


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_booleans(kind: str) -> BeforeValidator:
    def check(v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"must be {kind}, not a boolean")
        return v

    return BeforeValidator(check)


Int = Annotated[int, Strict(), _no_booleans("an integer")]
"""An integer field: a YAML int only (`epochs: true` is a boolean, which pydantic would take as 1;
a float or a string is refused too)."""
Float = Annotated[float, AllowInfNan(False), _no_booleans("a number")]
"""A float field: a finite YAML number, int included (`lr: 1`); never .inf, .nan or a boolean."""


class BuiltinDataConfig(_Strict):
    """The built-in synthetic shapes dataset (generated from a seed, never downloaded)."""

    num_images: Int = Field(6000, ge=20, description="Number of images generated.")
    image_size: Int = Field(64, ge=32, le=512, description="Side of the generated square images, in pixels.")
    seed: Int = Field(
        0, ge=0, description="Seed of the generator: the same seed gives the same images and labels."
    )


_EMPTY_SPLIT = {
    "train": "there would be nothing to train on",
    "val": "training keeps the weights of the epoch that scores best on val, and writes no model without it",
    "test": "evaluate scores the model on test",
}


class SplitConfig(_Strict):
    train: Float = Field(
        0.7, lt=1,
        description="Fraction of the rows in the training split, above 0; train + val + test must sum to 1. "
        "Not used when the manifest has a split column (train, val, test), which is then the split.",
    )  # fmt: skip
    val: Float = Field(
        0.15, lt=1,
        description="Fraction of the rows in the validation split (it picks the epoch whose weights are "
        "kept), above 0.",
    )  # fmt: skip
    test: Float = Field(
        0.15, lt=1, description="Fraction of the rows in the test split (the evaluate stage's), above 0."
    )
    seed: Int = Field(
        42, description="Seed of the split, which is stratified on the joint label of all tasks."
    )
    group_column: str | None = Field(
        None,
        description="A manifest column (a person, patient, product id): all rows of a group go to one split, "
        "stratified on the labels as well as the groups allow. Not a task.",
    )

    @field_validator("train", "val", "test")
    @classmethod
    def _not_empty(cls, v: float, info: ValidationInfo) -> float:
        if v <= 0:
            raise ValueError(f"must be above 0, or the {info.field_name} split is empty: {_EMPTY_SPLIT[info.field_name]}")
        return v

    @field_validator("group_column")
    @classmethod
    def _group_column_name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if not v:
            raise ValueError("must be a column name or null")
        if v in ("path", "split"):
            raise ValueError(f"'{v}' is the manifest's {'image' if v == 'path' else 'split'} column, not a group column")
        return v

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions train+val+test must sum to 1, got {total:g}")
        return self


class DataConfig(_Strict):
    source: str = Field(
        "builtin:shapes",
        description="builtin:<name> (builtin:shapes, builtin:shape_attributes: generated from a seed, no "
        "download), or the path of a CSV manifest: a 'path' column relative to the CSV's folder plus one "
        "label column per task, e.g. data/datasets/faces/labels.csv.",
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="Label columns to train on; empty means every column of the manifest except 'path'.",
    )
    builtin: BuiltinDataConfig = Field(
        BuiltinDataConfig(), description="The built-in dataset that data.source builtin:<name> generates."
    )
    split: SplitConfig = Field(
        SplitConfig(),
        description="How the rows are split into train, val and test when the manifest has no split column.",
    )
    max_rejected_fraction: Float = Field(
        0.05, ge=0, le=1,
        description="Ingest fails if a larger fraction of the manifest's rows is rejected "
        "(data/ingested/rejected.csv lists them with the reason).",
    )  # fmt: skip
    missing_labels: Literal["reject", "allow"] = Field(
        "reject",
        description="A row with an empty label cell: 'reject' it, or 'allow' it (the empty task adds no loss "
        "and no metric for that row). A row with no label for any task is always rejected.",
    )
    sample_weight_column: str | None = Field(
        None,
        description="Optional numeric, non-negative manifest column (not a task) weighting each sample's loss.",
    )
    encoding: str = Field(
        "auto",
        description="The manifest CSV's text encoding (a Python codec name: latin-1, cp1252, utf-16, ...); "
        "auto: a byte-order mark, UTF-16 without one, else UTF-8 (mtl_core/data/manifest.py).",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        v = v.strip()
        if v == "auto":
            return v
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r}; give a Python codec name (utf-8, latin-1, cp1252, utf-16) or auto") from None
        return v

    @model_validator(mode="after")
    def _group_column_is_not_a_task(self) -> DataConfig:
        group = self.split.group_column
        if group is not None and group in self.tasks:
            raise ValueError(f"split.group_column '{group}' is also in tasks: a group column is not a task")
        if group is not None and group == self.sample_weight_column:
            raise ValueError(f"split.group_column '{group}' is also the sample_weight_column")
        return self

    @field_validator("sample_weight_column")
    @classmethod
    def _weight_column_name(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a column name or null")
        return v.strip() if v is not None else None

    @field_validator("source")
    @classmethod
    def _source_kind(cls, v: str) -> str:
        if v.startswith(BUILTIN_PREFIX):
            from mtl_core.data.builtin import BUILTIN_DATASETS

            name = v[len(BUILTIN_PREFIX) :]
            if name not in BUILTIN_DATASETS:
                raise ValueError(
                    f"unknown built-in dataset {name!r}; available: "
                    + ", ".join(BUILTIN_PREFIX + k for k in sorted(BUILTIN_DATASETS))
                )
        elif not v.lower().endswith(".csv"):
            raise ValueError(f"must be 'builtin:<name>' or the path of a CSV manifest, got {v!r}")
        return v

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith(BUILTIN_PREFIX)

    @property
    def builtin_name(self) -> str:
        return self.source[len(BUILTIN_PREFIX) :]


class AugmentStep(BaseModel):
    """One Albumentations transform: its class name plus keyword arguments (p, limits, ...)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(
        description="The Albumentations transform's class name (Affine, RandomBrightnessContrast, ...); the "
        "step's other keys are its keyword arguments (p, limits, ...)."
    )

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PreprocessConfig(_Strict):
    image_size: Int = Field(
        64, ge=16, le=1024,
        description="Side in pixels of the square images that preprocess resizes every image to once: "
        "the model's input size.",
    )  # fmt: skip
    mean: tuple[Float, Float, Float] | Literal["auto"] = Field(
        "auto",
        description="Per-channel (RGB) mean subtracted from pixels scaled to [0, 1]; auto: the one the "
        "backbone's pretrained weights were trained with (timm's pretrained_cfg, torchvision's weights "
        "transforms) when model.pretrained is set, else ImageNet's (0.485, 0.456, 0.406).",
    )
    std: tuple[Float, Float, Float] | Literal["auto"] = Field(
        "auto",
        description="Per-channel (RGB) standard deviation the pixels are divided by after the mean; auto: "
        "the pretrained weights' when model.pretrained is set, else ImageNet's (0.229, 0.224, 0.225).",
    )
    augment: list[AugmentStep] = Field(
        default_factory=list,
        description="Albumentations transforms (class name and arguments) applied in order, on the fly, to "
        "training images only. Keep them label-preserving for your tasks: the project's params.yaml avoids "
        "flips (the built-in position task) and hue shifts (color).",
    )

    @field_validator("augment")
    @classmethod
    def _augment_fits_the_image(cls, v: list[AugmentStep], info: ValidationInfo) -> list[AugmentStep]:
        """Built and applied to an image of `image_size` at load (config_names.check_augment), unless the
        loader says it will not use them (`load_config(..., build_augment=False)`: `mtl predict`)."""
        if info.context is not None and not info.context.get("build_augment", True):
            return v
        if "image_size" in info.data:  # else the size itself is invalid (reported on its own)
            config_names.check_augment([(s.name, s.kwargs) for s in v], info.data["image_size"])
        return v


class ModelConfig(_Strict):
    arch: str = Field(
        "hard_sharing",
        description="Multi-task architecture: hard_sharing (one shared backbone, one linear head per task), "
        "mmoe (shared experts mixed by one gate per task) or cross_stitch (one backbone per task, mixed).",
    )
    arch_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the architecture, e.g. hard_sharing {dropout: 0.1} (on the shared "
        "features, before the heads), mmoe {num_experts: 4, expert_dim: 256}, cross_stitch {alpha_same: 0.9}; "
        "option names are checked at load.",
    )
    backbone: str = Field(
        "resnet18",
        description="A name of mtl_core/models/backbones/registry.py, 'timm:<name>', 'tv:<name>', or any torchvision "
        "(then timm) classification model name.",
    )
    pretrained: bool | str = Field(
        False,
        description="false: random init; true: the library downloads its weights; or a local weights file "
        "(.safetensors, .pth, .pt; relative to the project root) holding the library model's state dict.",
    )
    stem: Literal["auto", "imagenet", "small"] = Field(
        "auto",
        description="small: CIFAR-style stem (3x3 stride-1 conv, no max-pool) for small images; auto: small "
        "up to backbones.SMALL_STEM_MAX_SIZE px where the backbone has one, else imagenet.",
    )

    task_groups: Literal["auto"] | list[list[str]] | None = Field(
        None,
        description="null: one network for every task; [[a, b], [c]]: one multi-task network per group, used "
        "as one model (mtl_core/training/groups.py, stages/train.py); every task in exactly one group (checked "
        "against the data); auto: the grouping stage measures how the tasks help each other in a short probe "
        "training and chooses the groups (the `grouping` section).",
    )

    WEIGHT_SUFFIXES: ClassVar[tuple[str, ...]] = (".safetensors", ".pth", ".pt")
    """Suffixes of a `pretrained` weights file (backbones.WEIGHT_READERS reads them)."""

    # arch, arch_options and backbone are checked against the registries at load (mtl_core/config_names.py),
    # so that a typo fails before ingest and preprocess, not at train.

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return config_names.check_arch(v)

    @field_validator("arch_options")
    @classmethod
    def _known_arch_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """The keyword arguments of the architecture's constructor, as build_model takes them."""
        if "arch" not in info.data:  # the arch itself is invalid (reported on its own)
            return v
        return config_names.check_arch_options(info.data["arch"], v)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        """Resolved as build_backbone resolves it (nothing is built or downloaded)."""
        return config_names.check_backbone(v)

    @field_validator("pretrained")
    @classmethod
    def _weights_file(cls, v: bool | str, info: ValidationInfo) -> bool | str:
        if "backbone" in info.data:  # else the backbone itself is invalid (reported on its own)
            config_names.check_pretrained(info.data["backbone"], v)
        if isinstance(v, str):
            v = v.strip()
            if not v.lower().endswith(cls.WEIGHT_SUFFIXES):
                raise ValueError(
                    f"must be true, false or the path of a weights file ({', '.join(cls.WEIGHT_SUFFIXES)}), got {v!r}"
                )
        return v

    @field_validator("task_groups")
    @classmethod
    def _groups(cls, v: str | list[list[str]] | None) -> str | list[list[str]] | None:
        if v is None or v == "auto":
            return v
        if not v or any(not g for g in v):
            raise ValueError("give one or more non-empty groups of task names, e.g. [[shape], [color, size]], or null")
        names = [t for g in v for t in g]
        twice = sorted({t for t in names if names.count(t) > 1})
        if twice:
            raise ValueError(f"tasks in more than one group: {twice}")
        return v

    @property
    def auto_groups(self) -> bool:
        """Whether the grouping stage chooses the task groups (`task_groups: auto`)."""
        return self.task_groups == "auto"

    def pretrained_weights(self, root: Path) -> bool | Path:
        """`pretrained`, with a weights file's path resolved against the project root (the folder of
        params.yaml), like the other paths of params.yaml."""
        if isinstance(self.pretrained, bool):
            return self.pretrained
        path = Path(self.pretrained).expanduser()
        return path if path.is_absolute() else Path(root) / path


ClassWeights = dict[str, dict[str, float]]


class DistributedConfig(_Strict):
    """`train.distributed`: how many processes train one model (DistributedDataParallel via torchrun)."""

    nproc_per_node: Int = Field(
        1, ge=1,
        description="Processes on this machine (one per GPU); above 1 `mtl train` starts them through "
        "torchrun. Started by hand (`torchrun ... -m mtl_core.cli train`), torchrun's own flags decide.",
    )  # fmt: skip
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: NCCL on CUDA, gloo on CPU.")
    sync_batchnorm: bool = Field(
        True,
        description="On CUDA, BatchNorm statistics over the global batch (SyncBatchNorm), so N processes "
        "compute what one would; CPU keeps per-process statistics (PyTorch's SyncBatchNorm is CUDA-only).",
    )


def auto_num_workers(nproc: int = 1) -> int:
    """DataLoader workers per training process: the machine's cores shared by the processes, one core
    left for the training process itself, at most 8 (more rarely pays with memory-mapped uint8 images)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, nproc) - 1))


FINETUNE_DEFAULTS = {"backbone_lr_scale": 0.1, "freeze_backbone_epochs": 1}
"""What `train.finetune: true` sets (over the values of these keys)."""


class TrainConfig(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _finetune_defaults(cls, data: Any) -> Any:
        """`finetune: true` sets FINETUNE_DEFAULTS (over what the keys say: params.yaml lists every knob)."""
        if isinstance(data, dict) and data.get("finetune") is True:
            return {**data, **FINETUNE_DEFAULTS}
        return data

    epochs: Int = Field(
        5, ge=1,
        description="Training epochs; the weights kept are those of the epoch with the best mean validation "
        "accuracy.",
    )  # fmt: skip
    batch_size: Int = Field(
        128, ge=1,
        description="Training batch size; with train.distributed the global batch (each of N processes "
        "takes batch_size / N).",
    )  # fmt: skip
    lr: Float = Field(
        2e-3, gt=0, description="Peak learning rate of AdamW under a one-cycle schedule (the heads' rate)."
    )
    weight_decay: Float = Field(1e-4, ge=0, description="AdamW's weight decay.")
    weighting: str = Field(
        "equal",
        description="Loss weighting or gradient balancing method by name (equal, fixed, uncertainty, dwa, "
        "gradnorm, rlw, famo, task_assignment, pcgrad, cagrad, mgda, imtl, nash_mtl, aligned_mtl); an unknown "
        "name fails at load with the list.",
    )
    weighting_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the weighting method, e.g. cagrad {c: 0.4, on: representation}; names are "
        "checked at load, values when the method is built.",
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="auto: cuda, then mps, then cpu.")
    amp: bool = Field(True, description="bf16 autocast on CUDA.")
    num_workers: Int | Literal["auto"] = Field(
        "auto", description="DataLoader workers per process; auto: the cores per process minus one, at most 8."
    )
    seed: Int = Field(
        0,
        description="Seed of training: the initial weights, and the data order and each sample's augmentation "
        "(functions of the seed, the epoch and the sample, whatever the number of DataLoader workers).",
    )
    max_steps_per_epoch: Int | None = Field(
        None, ge=1, description="null: every batch of the training split; N: at most N optimizer steps an epoch."
    )
    class_weights: Literal["none", "inverse_frequency"] | ClassWeights = Field(
        "none",
        description="Per-task class weights of the cross-entropy: 'none', 'inverse_frequency' (N / (C * n_c) "
        "from the training labels) or {task: {class: weight}} (unlisted classes weigh 1.0).",
    )
    label_smoothing: Float = Field(0.0, ge=0, lt=1, description="Label smoothing of every task's cross-entropy.")
    grad_clip: Float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Max L2 norm of the shared parameters' gradient, applied after the weighting method's "
        "backward (clip_grad_norm_); null: no clipping. Nash-MTL's reference code uses 1.0.",
    )  # fmt: skip
    task_affinity_every: Int = Field(
        25, ge=0, description="Measure task-gradient cosine similarity every N steps (K extra backward passes); 0: off."
    )
    finetune: bool = Field(
        False,
        description="Fine-tune pretrained weights as users expect: true sets backbone_lr_scale 0.1 (the "
        "backbone learns at a tenth of the heads' rate) and freeze_backbone_epochs 1 (the new heads first "
        "learn on frozen features), whatever those keys say; the one-cycle schedule warms every rate up over "
        "the first 15 % of the steps anyway. false: those keys as given. Meant with model.pretrained.",
    )
    backbone_lr_scale: Float = Field(
        1.0, gt=0, allow_inf_nan=False,
        description="The backbone's learning rate is lr x this (heads and other new layers: lr); below 1 "
        "fine-tunes pretrained weights gently, e.g. 0.1.",
    )  # fmt: skip
    freeze_backbone_epochs: Int = Field(
        0, ge=0,
        description="Train only the heads (and other new layers) for the first N epochs, then the whole "
        "network; N >= epochs never trains the backbone (a linear probe).",
    )  # fmt: skip

    checkpoint_every_steps: Int = Field(
        0, ge=0,
        description="Also checkpoint every N optimizer steps within an epoch (a checkpoint is written at the "
        "end of every epoch anyway); 0: epoch ends only. A kill loses at most the work since the last one.",
    )  # fmt: skip
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A NaN or infinite task loss or gradient: 'stop' training with an error naming the epoch, "
        "step and task; 'skip' the batch (no optimizer step) and count it, up to max_skipped_steps.",
    )
    max_skipped_steps: Int = Field(
        10, ge=0, description="With on_nonfinite: skip, stop once more than this many batches were skipped."
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="DistributedDataParallel through torchrun: how many processes train one model; "
        "train.batch_size is then the global batch.",
    )
    channels_last: Annotated[bool, Strict()] | Literal["auto"] = Field(
        "auto",
        description="Model and training batches in NHWC memory layout (torch.channels_last), the layout "
        "cuDNN's bf16 tensor-core convolutions use; auto: on CUDA only.",
    )
    compile: Annotated[bool, Strict()] | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        False,
        description="torch.compile the model's encoder (the backbone, where the compute is): true "
        "(mode 'default') or a mode name; the first steps pay the compilation.",
    )

    @field_validator("num_workers")
    @classmethod
    def _workers_not_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"must be >= 0 or 'auto', got {v}")
        return v

    def workers(self, nproc: int = 1) -> int:
        """`num_workers` resolved: 'auto' from the cores (auto_num_workers)."""
        return auto_num_workers(nproc) if self.num_workers == "auto" else int(self.num_workers)

    @field_validator("weighting")
    @classmethod
    def _known_weighting(cls, v: str) -> str:
        return config_names.check_weighting(v)

    @field_validator("weighting_options")
    @classmethod
    def _known_weighting_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Option names only (their values are checked when the method is built, at train)."""
        if "weighting" not in info.data:  # the method itself is invalid (reported on its own)
            return v
        return config_names.check_weighting_options(info.data["weighting"], v)

    @field_validator("class_weights", mode="before")
    @classmethod
    def _check_class_weights(cls, v: Any) -> Any:
        """One clear message per mistake (not one per member of the union); YAML may read a class name
        such as 0 as a number, so class names are made strings."""
        if v is None:
            return "none"
        if isinstance(v, str):
            if v not in ("none", "inverse_frequency"):
                raise ValueError(f"must be 'none', 'inverse_frequency' or {{task: {{class: weight}}}}, got {v!r}")
            return v
        if not isinstance(v, dict):
            raise ValueError(f"must be 'none', 'inverse_frequency' or {{task: {{class: weight}}}}, got {v!r}")
        out: dict[str, dict[str, float]] = {}
        for task, weights in v.items():
            if not isinstance(weights, dict):
                raise ValueError(f"task {task!r}: expected a mapping {{class: weight}}, got {weights!r}")
            out[str(task)] = {}
            for c, w in weights.items():
                if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                    raise ValueError(f"task {task!r}, class {c!r}: weight must be a number >= 0, got {w!r}")
                out[str(task)][str(c)] = float(w)
        return out


class MlflowConfig(_Strict):
    experiment: str = Field("mtl-pipeline", description="The MLflow experiment that holds the runs.")
    model_name: str = Field(
        "mtl-shapes",
        description="The registered model's name; the register stage moves its alias champion "
        "(models:/<model_name>@champion).",
    )
    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else the project's SQLite store mlflow.db."
    )
    ui_url: str = Field(
        "http://127.0.0.1:5000",
        description="Where the MLflow UI is served (`mlflow ui`, or the tracking server): the base of the links "
        "in the logs and on a Prefect flow run's page; an http(s) tracking URI is its own UI and wins over this.",
    )


class EvaluateConfig(_Strict):
    """What the evaluate stage shows of the test images besides the metrics (stages/evaluate.py)."""

    gallery_tiles: Int = Field(
        8, ge=1, le=64,
        description="Per task, how many test images the error gallery shows of each kind: the wrong answers "
        "given with the highest confidence, and the right answers given with the lowest.",
    )  # fmt: skip
    label_issue_tiles: Int = Field(
        12, ge=1, le=64, description="Per task, how many of the suspected label problems the thumbnail grid shows."
    )
    gradcam_images: Int = Field(
        4, ge=0, le=32,
        description="Test images in the Grad-CAM figure (a row each, a column per task head); 0: no Grad-CAM. "
        "CNN backbones only; others skip it with one log line.",
    )  # fmt: skip


class RegisterConfig(_Strict):
    """The champion gate of the register stage (mtl_core/registry/gate.py)."""

    min_mean_accuracy: Float = Field(
        0.0, ge=0, le=1, allow_inf_nan=False,
        description="A new version becomes champion only above chance (summed correct test answers over the "
        "tasks against always answering each task's majority class) and with a mean test accuracy of at "
        "least this; below, it is registered but the alias stays.",
    )  # fmt: skip


class SignificanceConfig(_Strict):
    """The paired bootstrap behind each task's verdict (mtl_core/evaluation/significance.py)."""

    resamples: Int = Field(2000, ge=100, description="Bootstrap resamples of the test images.")
    confidence: Float = Field(
        0.95, gt=0.5, lt=1,
        description="Confidence of the interval of each task's difference; a task is better or worse than its "
        "single-task model when the interval excludes 0, else 'no significant difference'.",
    )  # fmt: skip
    seed: Int = Field(0, ge=0, description="Seed of the resampling (the same verdicts every run).")


SOLUTIONS = ("all_in_one", "grouped", "single_task")


class SelectConfig(_Strict):
    """The policy that picks the registered solution (mtl_core/evaluation/selection.py)."""

    rule: Literal["trained", "fewest_networks", "best_delta_m"] = Field(
        "fewest_networks",
        description="trained: the train stage's model, whatever the comparison says; fewest_networks: the "
        "candidate with the fewest networks in which no task is significantly worse than its single-task "
        "model by more than max_task_loss_points (ties: the higher Δm); best_delta_m: the highest Δm (ties: "
        "fewer networks). Used with compare.single_task: true (without it there is nothing to compare).",
    )
    max_task_loss_points: Float = Field(
        1.0, ge=0,
        description="fewest_networks: a task may be significantly worse than its single-task model by at most "
        "this many points of the primary metric (compare.metrics[0], x 100).",
    )  # fmt: skip
    candidates: list[Literal["all_in_one", "grouped", "single_task"]] = Field(
        default_factory=lambda: list(SOLUTIONS), min_length=1,
        description="The solutions that may be registered: all_in_one (one network), grouped (one per task "
        "group: model.task_groups), single_task (one per task). One not measured in a run is skipped.",
    )  # fmt: skip


class CompareConfig(_Strict):
    """Single-task baselines (one model per task, same backbone, budget and data) and the gain Δm."""

    single_task: bool = Field(
        False,
        description="true: the baselines stage trains one single-task model per task and compare reports "
        "Δm and negative transfer (and, with model.task_groups, the all_in_one stage trains the all-in-one "
        "reference).",
    )
    shared_input: bool = Field(
        True,
        description="The single-task baselines decode and augment each epoch's batches once: the first "
        "task's training records them, the others replay them (same weights as separate trainings; "
        "training/batch_cache.py). false: each baseline reads the data itself.",
    )
    metrics: list[
        Literal["accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc", "average_precision"]
    ] = Field(
        default_factory=lambda: ["balanced_accuracy", "accuracy"], min_length=1,
        description="Metrics compared (mtl_core/evaluation/metrics.py); the first decides Δm's headline and "
        "negative transfer. Default balanced accuracy: a head that always answers the majority class scores "
        "chance (1/C) on it, where its accuracy is the majority rate (0.99 on a 1 %-positive attribute). "
        "auroc and average_precision exist for two-class tasks only and are compared over those.",
    )  # fmt: skip
    significance: SignificanceConfig = Field(
        default_factory=lambda: SignificanceConfig(),
        description="How each task's difference to its single-task model is tested (a paired bootstrap over "
        "the test images).",
    )
    select: SelectConfig = Field(
        default_factory=lambda: SelectConfig(),
        description="Which solution the register stage registers, among those compare measured.",
    )


class GroupingConfig(_Strict):
    """The grouping stage of `model.task_groups: auto` (stages/grouping.py): a short probe training of the
    all-in-one network that measures how the tasks help each other, and the grouping it chooses."""

    signal: Literal["lookahead", "cosine"] = Field(
        "lookahead",
        description="The affinity that chooses the groups: lookahead (Fifty et al. 2021: the relative change "
        "of task t's loss after a step on task s alone; K extra forward passes per measured step) or cosine "
        "(the cosine of the task gradients on the shared parameters). Both are measured and reported.",
    )
    probe_epochs: Int = Field(
        2, ge=1,
        description="Epochs of the probe training (the train section's budget otherwise). 2: on the built-in "
        "data the lookahead's choice after one epoch left a task significantly worse than alone for every "
        "probe seed, after two epochs for none (docs/benchmark-grouping.md).",
    )  # fmt: skip
    every: Int = Field(5, ge=1, description="Measure the affinities every N steps of the probe.")
    min_labelled_rows: Int = Field(
        20, ge=1,
        description="A task with fewer labelled training rows cannot be measured: the stage then keeps one "
        "network for all tasks and says so.",
    )  # fmt: skip


class ScheduleConfig(_Strict):
    """The Prefect deployment that retrains on a timetable (flows/deployment.py)."""

    deployment: str = Field("scheduled-retrain", description="The Prefect deployment's name.")
    cron: str = Field(
        "0 3 * * 1",
        description="When it runs: a cron expression of 5 fields (minute hour day month weekday); the "
        "default is Mondays at 03:00.",
    )
    timezone: str = Field("UTC", description="The time zone of the cron expression.")

    # checked as the deployment's scheduler checks them (Prefect's CronSchedule: its croniter, zoneinfo),
    # so that a typo fails at load rather than when the deployment is created
    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        return config_names.check_cron(v)

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, v: str) -> str:
        return config_names.check_timezone(v)


class RevisionConfig(_Strict):
    """What a run of the Prefect flow leaves behind: its result as a revision (flows/pipeline.py,
    mtl_core/revisions.py), pushed with its data and models when remotes are configured."""

    record: Literal["commit", "experiment", "none"] = Field(
        "commit",
        description="commit: a commit of the project (params.yaml, dvc.lock, metrics, reports) on `branch`, made "
        "without touching the checkout's branch or files; experiment: a DVC experiment (`dvc exp save`, a git ref "
        "refs/exps/..., listed by `dvc exp show`); none: nothing recorded.",
    )
    branch: str = Field("retrains", description="The branch that `record: commit` commits to (created from HEAD).")
    push: bool = Field(
        True,
        description="After recording: `dvc push` of the data and models to the DVC remote (`dvc_remote`, else "
        "DVC's default remote), then the branch (`git push`) or the experiment (`dvc exp push`) to `git_remote`; "
        "each only where configured. A failed push is reported (log, tags), not fatal.",
    )
    git_remote: str = Field("origin", description="The git remote that revisions are pushed to, when the repository has it.")
    dvc_remote: str | None = Field(None, description="The DVC remote to push to; null: DVC's default remote (core.remote).")

    @field_validator("branch")
    @classmethod
    def _branch_name(cls, v: str) -> str:
        if not v or v.startswith(("-", "/", "refs/")) or any(c in v for c in " ~^:?*[\\") or ".." in v:
            raise ValueError(f"not a usable git branch name: {v!r}")
        return v


with warnings.catch_warnings():
    # the section `register` (the stage's name) shadows ABCMeta.register, which nothing calls on a config
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class PipelineConfig(_Strict):
        data: DataConfig = Field(
            DataConfig(),
            description="Where the images and labels come from, how they are checked and how they are split "
            "(the ingest stage).",
        )
        preprocess: PreprocessConfig = Field(
            PreprocessConfig(), description="Image size, normalisation and the training augmentation."
        )
        model: ModelConfig = Field(
            ModelConfig(), description="The network: architecture, backbone, pretrained weights, stem, task groups."
        )
        train: TrainConfig = Field(
            TrainConfig(),
            description="Training of the train stage, and of the baselines and all_in_one stages, which use "
            "the same loop.",
        )
        mlflow: MlflowConfig = Field(
            MlflowConfig(), description="The MLflow experiment, the registered model's name and the tracking store."
        )
        evaluate: EvaluateConfig = Field(
            EvaluateConfig(),
            description="What the evaluate stage shows besides the metrics: error galleries, label problems, Grad-CAM.",
        )
        register: RegisterConfig = Field(
            RegisterConfig(),
            description="The champion gate of the register stage (a new version is always registered).",
        )
        compare: CompareConfig = Field(
            CompareConfig(),
            description="Multi-task against one single-task model per task (same backbone, budget and data).",
        )
        grouping: GroupingConfig = Field(
            GroupingConfig(),
            description="How `model.task_groups: auto` chooses the groups (the grouping stage).",
        )
        schedule: ScheduleConfig = Field(
            ScheduleConfig(), description="The Prefect deployment that retrains on a timetable."
        )
        revision: RevisionConfig = Field(
            RevisionConfig(),
            description="What a Prefect flow run leaves behind: its result as a git commit or DVC experiment, "
            "pushed with its data and models.",
        )


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk the model tree along `loc` to list the keys allowed where an error occurred."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            break
        annotation = fields[part].annotation
        args = getattr(annotation, "__args__", ())
        nested = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nested is None:
            break
        current = nested
    return sorted(getattr(current, "model_fields", {}))


def _key(loc: tuple[Any, ...]) -> str:
    """The dotted key of an error location, without pydantic's tags of the members of a union
    (`tuple[...]`, `literal['auto']`, `function-before[...]`): `preprocess.std.2`."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for e in err.errors():
        key = _key(tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(PipelineConfig, tuple(e["loc"][:-1]))
            lines.append(f"  unknown key '{key}'; allowed keys here: {', '.join(allowed)}")
        else:
            got = e.get("input")
            msg = e["msg"].removeprefix("Value error, ")  # a validator's own message reads as it is
            lines.append(f"  key '{key}': {msg} (got {got!r})")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any] | None, source: str = "params.yaml", build_augment: bool = True) -> PipelineConfig:
    """The validated parameters; `build_augment=False` skips building the augmentation chain (which imports
    Albumentations), for a caller that reads other sections only."""
    try:
        return PipelineConfig.model_validate(raw or {}, context={"build_augment": build_augment})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path = "params.yaml", build_augment: bool = True) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, str(path), build_augment)


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested parameters dict (`cfg.model_dump()`) as dotted keys: {"train.lr": 0.002, ...}; an empty
    dict stays a value (`arch_options: {}`). What MLflow logs as params and a checkpoint fingerprints."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
