"""K linear task heads as one fused layer (`LinearHeads`), and a view of one head (`HeadView`): what every
architecture puts on top of its shared representation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
