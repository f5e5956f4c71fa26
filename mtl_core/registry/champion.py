"""The champion decision of a registered version: does alias `champion` move to it?

A version that passed the champion gate (registry.gate) becomes champion when there is none, or when it
beats the champion on a strictly higher, unrounded mean test accuracy, and only then: a tie (the same
model registered again) leaves the alias where it is. And only against a champion it can be compared
with: the same task set (task names and their classes) evaluated on the same test split
(`registry.versions.test_split_sha256`). A model of other tasks, or one scored on another test split,
never moves the alias, whatever its accuracy (a mean over other tasks on other images says nothing about
which is better, and everything that serves `@champion` would silently change what it answers): the
reason names the `mlflow.model_name` to set for it, so that it is registered, and becomes champion,
under a name of its own.

Each decision is recorded on the version (`mtl.champion_decision`, 'pending' from its creation until
then): a register stage killed between creating a version and deciding leaves it pending, and the next
register stage decides it (`finish_pending`) before its own version, whatever model that is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from mtl_core.registry import CHAMPION
from mtl_core.registry.versions import (
    DECISION_TAG, GATE_REASON_TAG, GATE_TAG, MAX_TAG_VALUE, PENDING, SCORE_TAG, TASK_SET_SHA_TAG, TEST_DATA_TAG,
    current_champion, recorded_tasks,
)  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    moved: bool
    champion: str | None
    reason: str
    previous: str | None
    previous_score: float | None


def suggested_model_name(name: str, tasks: list[str]) -> str:
    """A registered-model name for another task set: `<name>-<tasks>` (`mtl-shapes-color-shape`)."""
    suggestion = "-".join([name, *sorted(tasks)])
    return suggestion if len(suggestion) <= 60 else f"{name}-{len(tasks)}-tasks"


def _describe_tasks(tasks: dict[str, list[str]] | None) -> str:
    return ", ".join(sorted(tasks)) if tasks else "(unknown tasks)"


def unlike_champion(
    client: MlflowClient, name: str, version: str, champion: str, tasks: dict[str, list[str]], task_sha: str, test_data: str
) -> str | None:
    """Why `version` (of `tasks`, evaluated on test split `test_data`) cannot be compared with the champion,
    or None when it can. A champion registered before these were recorded: its task set from its run's
    model spec; its test split, when unknown, is not held against it (logged)."""
    champion_sha, champion_tasks = recorded_tasks(client, name, champion)
    if champion_sha is not None and champion_sha != task_sha:
        if champion_tasks is not None and sorted(champion_tasks) == sorted(tasks):
            differ = [t for t in sorted(tasks) if champion_tasks[t] != tasks[t]]
            what = f"the same tasks with other classes of {', '.join(differ)}"
        else:
            what = f"tasks {_describe_tasks(tasks)}, champion version {champion} predicts {_describe_tasks(champion_tasks)}"
        return (
            f"version {version} predicts {what}: their accuracies are not comparable, and serving "
            f"@{CHAMPION} would silently change what it answers; alias '{CHAMPION}' left on version {champion}. "
            f"Register models of these tasks under a name of their own: set mlflow.model_name (e.g. "
            f"'{suggested_model_name(name, list(tasks))}') in params.yaml"
        )
    champion_test = client.get_model_version(name, champion).tags.get(TEST_DATA_TAG)
    if champion_test is None:
        log.warning("register: champion version %s does not record its test split (registered before it was recorded); compared anyway", champion)
    elif champion_test != test_data:
        return (
            f"version {version} was evaluated on another test split than champion version {champion} (test split "
            f"{test_data[:12]} against {champion_test[:12]}): their accuracies are not comparable; alias "
            f"'{CHAMPION}' left on version {champion}. Evaluate both on one test split (a `split` column in the "
            "manifest keeps it fixed) or register this model under a name of its own (mlflow.model_name)"
        )
    return None


def decide(
    client: MlflowClient, name: str, version: str, score: float, gate_passed: bool, gate_reason: str,
    tasks: dict[str, list[str]], task_sha: str, test_data: str,
) -> Decision:  # fmt: skip
    """Take the champion decision of `version` (moving the alias if it wins) and record it on the version."""
    prev_version, prev_score = current_champion(client, name)
    if prev_version == version:
        # an earlier attempt for this run already moved the alias (or this version has been champion
        # since): nothing to move, and nothing better to fall back on if the gate now refuses it
        moved, champion = False, version
        reason = f"version {version} is already champion"
        if not gate_passed:
            reason += f", though the champion gate now refuses it ({gate_reason}); alias left on it"
    elif not gate_passed:
        moved, champion = False, prev_version
        where = f"left on version {prev_version}" if prev_version else "not set (no champion yet)"
        reason = f"version {version} refused by the champion gate: {gate_reason}; alias '{CHAMPION}' {where}"
    elif prev_version is not None and (unlike := unlike_champion(client, name, version, prev_version, tasks, task_sha, test_data)):
        moved, champion, reason = False, prev_version, unlike
    elif prev_version is None or prev_score is None or score > prev_score:
        client.set_registered_model_alias(name, CHAMPION, version)
        moved, champion = True, version
        reason = (
            f"no previous champion; version {version} is champion"
            if prev_version is None
            else f"version {version} ({score:.4f}) beats champion version {prev_version} ({prev_score:.4f})"
        )
    else:
        moved, champion = False, prev_version
        reason = (
            f"version {version} ({score:.4f}) does not beat champion version {prev_version} "
            f"({prev_score:.4f}); alias '{CHAMPION}' left on version {prev_version}"
        )
    client.set_model_version_tag(name, version, DECISION_TAG, reason[:MAX_TAG_VALUE])
    return Decision(moved, champion, reason, prev_version, prev_score)


def finish_pending(client: MlflowClient, name: str, current: str) -> list[tuple[str, Decision]]:
    """Decide the versions of `name` other than `current` whose register stage was killed before their
    decision (oldest first), from what their creation recorded (score, gate, task set, test split)."""
    done = []
    versions = client.search_model_versions(f"name='{name}'")
    pending = sorted((v for v in versions if v.tags.get(DECISION_TAG) == PENDING and str(v.version) != current), key=lambda v: int(v.version))
    for mv in pending:
        tags = mv.tags
        version = str(mv.version)
        _, tasks = recorded_tasks(client, name, version)
        decision = decide(
            client, name, version, float(tags.get(SCORE_TAG, "nan")), tags.get(GATE_TAG) == "passed",
            tags.get(GATE_REASON_TAG, ""), tasks or {}, tags.get(TASK_SET_SHA_TAG, ""), tags.get(TEST_DATA_TAG, ""),
        )  # fmt: skip
        log.info("register: version %s's own register stage was stopped before its champion decision; taken now: %s", version, decision.reason)
        done.append((version, decision))
    return done
