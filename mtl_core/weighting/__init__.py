"""Pluggable multi-task loss weighting / gradient balancing (`train.weighting` in params.yaml).

Loss weighting (one backward per step): equal, fixed, uncertainty, dwa, gradnorm, rlw, famo,
task_assignment. Gradient balancing (K per-task gradients, option `on: auto | params | representation`):
pcgrad, cagrad, mgda, imtl, nash_mtl, aligned_mtl.
"""

# Importing the modules registers the methods.
from mtl_core.weighting import (  # noqa: F401
    aligned_mtl,
    cagrad,
    dwa,
    equal,
    famo,
    fixed,
    gradnorm,
    imtl,
    mgda,
    nash_mtl,
    pcgrad,
    rlw,
    task_assignment,
    uncertainty,
)
from mtl_core.weighting.base import (
    WEIGHTINGS,
    LinearCombination,
    LossWeighting,
    StepContext,
    build_weighting,
    register_weighting,
)
from mtl_core.weighting.gradients import GradientBalancing

__all__ = [
    "WEIGHTINGS",
    "GradientBalancing",
    "LinearCombination",
    "LossWeighting",
    "StepContext",
    "build_weighting",
    "register_weighting",
]
