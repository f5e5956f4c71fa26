"""A grouped solution (`model.task_groups`): one multi-task network per group of tasks, used as one model.

Training fits each member on its own tasks (its own weighting method, optimizer and best epoch:
mtl_core/training/groups.py); everything after training (validation, evaluate, register, predict)
sees one `MultiTaskModel` whose forward runs every member and returns all tasks' logits, in the
order of the task spec. Its weights are one safetensors file (`members.<i>.` prefixes) and its spec
lists the groups, so `models/io.load_model` rebuilds it without unpickling anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from mtl_core.models.architectures.base import MultiTaskModel


def validate_groups(groups: Sequence[Sequence[str]], task_names: Sequence[str]) -> list[list[str]]:
    """`groups` as lists, checked to cover every task exactly once (a clear error names the culprits)."""
    seen: list[str] = [t for g in groups for t in g]
    unknown = sorted(set(seen) - set(task_names))
    missing = [t for t in task_names if t not in seen]
    twice = sorted({t for t in seen if seen.count(t) > 1})
    problems = []
    if unknown:
        problems.append(f"unknown tasks {unknown} (the tasks are {list(task_names)})")
    if missing:
        problems.append(f"tasks in no group {missing}")
    if twice:
        problems.append(f"tasks in more than one group {twice}")
    if any(len(g) == 0 for g in groups):
        problems.append("an empty group")
    if problems:
        raise ValueError("model.task_groups: " + "; ".join(problems))
    return [list(g) for g in groups]


class TaskGroupedModel(MultiTaskModel):
    """Members (one MultiTaskModel per group) side by side; logits of every task in `task_order`."""

    def __init__(self, members: Sequence[MultiTaskModel], task_order: Sequence[str]) -> None:
        num_classes = {t: n for m in members for t, n in m.num_classes.items()}
        validate_groups([m.task_names for m in members], list(task_order))
        super().__init__({t: num_classes[t] for t in task_order})
        self.members = nn.ModuleList(members)
        self._member_of = {t: i for i, m in enumerate(members) for t in m.task_names}

    @property
    def groups(self) -> list[list[str]]:
        return [list(m.task_names) for m in self.members]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for m in self.members:
            out.update(m(x))
        return {t: out[t] for t in self.task_names}

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError("a grouped solution is trained member by member (mtl_core/training/groups.py)")

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError("a grouped solution is trained member by member (mtl_core/training/groups.py)")

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Everything of the task's own member that only this task uses (its head; the member's shared
        backbone is shared within the group only)."""
        return self.members[self._member_of[task]].task_parameters(task)

    def last_shared_layer(self) -> None:
        return None
