"""A retrain's result as a revision: a git commit (or DVC experiment) holding its params.yaml, dvc.lock,
metrics and reports, pushed with its data and models to the DVC remote.

The Prefect flow calls `record_revision` after the stages (flows/pipeline.py; settings: `revision:` in
params.yaml). `commit` mode commits the project's files as they are after the run (what `git add -A` would
stage: tracked and untracked files that .gitignore does not exclude) onto a branch, through a temporary
index: the checkout's own branch, index and files are left as they are, so a deployment keeps running in
the same checkout. The branch's previous commit is the parent, and HEAD a second parent when the branch
does not contain it (the code moved on since the last retrain). `experiment` mode saves a DVC experiment
(`dvc exp save`, a ref under refs/exps/), listed by `dvc exp show`.

Then, with `push`, `dvc push` sends the cached outputs that dvc.lock names (data, preprocessed caches,
models, plot images) to the DVC remote, and `git push` the branch (or `dvc exp push` the experiment) to the
git remote, each only when that remote is configured. A push that fails is reported in
`Revision.problems`, never raised: the model is trained and registered either way, and the revision is in
the local repository, to push later.

Plain values in and out; git and DVC run as commands (`git`, `python -m dvc`) in the project folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# a commit needs an author: the repository's (git config user.name / user.email) when it has one
FALLBACK_IDENTITY = {"GIT_AUTHOR_NAME": "mtl-pipeline", "GIT_AUTHOR_EMAIL": "mtl-pipeline@localhost"}


@dataclass(frozen=True)
class Revision:
    """What a run left behind. `commit` is the sha to check out (`git checkout <commit> && dvc pull`);
    `ref` the branch or experiment ref that holds it; `pushed` what went to which remote; `problems` what
    could not be done (nothing is raised)."""

    kind: str  # "commit", "experiment" or "none"
    commit: str | None = None
    ref: str | None = None
    name: str | None = None  # the branch, or the experiment's name
    pushed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_tags(self) -> dict[str, str]:
        """The MLflow tags that name this revision (on the model's run and its registered version)."""
        tags = {"mtl.revision_kind": self.kind}
        if self.commit:
            tags["mtl.revision"] = self.commit
        if self.ref:
            tags["mtl.revision_ref"] = self.ref
        tags["mtl.revision_push"] = "; ".join(self.problems) or (", ".join(self.pushed) or "not pushed (no remote)")
        return {k: v[:5000] for k, v in tags.items()}


class _Failed(RuntimeError):
    pass


def _run(cmd: list[str], root: Path, env: Mapping[str, str] | None = None, timeout: float = 900) -> str:
    try:
        done = subprocess.run(cmd, cwd=root, env=dict(env) if env else None, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise _Failed(f"{' '.join(cmd[:3])}: {err}") from None
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise _Failed(f"`{' '.join(cmd[:4])}` failed: {' '.join(message[-3:])[:500]}")
    return done.stdout.strip()


def _git(root: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    return _run(["git", *args], root, env)


def _dvc(root: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], root)


def _maybe(root: Path, *args: str) -> str | None:
    try:
        return _git(root, *args)
    except _Failed:
        return None


def _identity_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key, config in (("GIT_AUTHOR_NAME", "user.name"), ("GIT_AUTHOR_EMAIL", "user.email")):
        if key not in env and not _maybe(root, "config", config):
            env[key] = FALLBACK_IDENTITY[key]
    env.setdefault("GIT_COMMITTER_NAME", env.get("GIT_AUTHOR_NAME") or _maybe(root, "config", "user.name") or FALLBACK_IDENTITY["GIT_AUTHOR_NAME"])
    env.setdefault("GIT_COMMITTER_EMAIL", env.get("GIT_AUTHOR_EMAIL") or _maybe(root, "config", "user.email") or FALLBACK_IDENTITY["GIT_AUTHOR_EMAIL"])
    return env


def commit_to_branch(root: Path, branch: str, message: str) -> str:
    """Commit the project's files, as `git add -A` would stage them, onto `branch` (created from HEAD),
    through a temporary index; returns the new commit's sha. The checkout is not touched."""
    env = _identity_env(root)
    ref = f"refs/heads/{branch}"
    tip = _maybe(root, "rev-parse", "--verify", "-q", ref)
    head = _maybe(root, "rev-parse", "--verify", "-q", "HEAD")
    parents = [p for p in (tip or head,) if p]
    if tip and head and _maybe(root, "merge-base", "--is-ancestor", head, tip) is None:
        parents.append(head)  # the code moved on since the branch's last retrain: HEAD is a parent too
    with tempfile.TemporaryDirectory(prefix="mtl-revision-") as tmp:
        index_env = {**env, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if parents:
            _git(root, "read-tree", parents[0], env=index_env)
        _git(root, "add", "-A", ".", env=index_env)
        tree = _git(root, "write-tree", env=index_env)
    commit = _git(root, "commit-tree", tree, *[a for p in parents for a in ("-p", p)], "-m", message, env=env)
    _git(root, "update-ref", "-m", "mtl-pipeline: retrain", ref, commit, *([tip] if tip else []), env=env)
    return commit


def save_experiment(root: Path, name: str, message: str) -> tuple[str, str]:
    """`dvc exp save` of the workspace (its untracked, not ignored files included) as experiment `name`;
    returns (commit, ref)."""
    untracked = [p for p in _git(root, "ls-files", "--others", "--exclude-standard").splitlines() if p]
    _dvc(root, "exp", "save", "--name", name, "--message", message, *[a for p in untracked for a in ("-I", p)])
    refs = [line.split() for line in _git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines()]
    found = [(sha, ref) for sha, ref in refs if ref.rsplit("/", 1)[-1] == name]
    if not found:
        raise _Failed(f"dvc exp save reported no error, but no ref refs/exps/.../{name} exists")
    return found[-1]


def _dvc_remote(root: Path, wanted: str | None) -> str | None:
    """The DVC remote to push to: `wanted`, else DVC's default; None when there is none."""
    if wanted:
        return wanted
    try:
        return _dvc(root, "remote", "default") or None
    except _Failed:
        return None


def record_revision(
    root: Path, record: str, branch: str, message: str, push: bool = True, git_remote: str = "origin",
    dvc_remote: str | None = None, experiment_name: str | None = None,
) -> Revision:
    """Record the project's state as a revision (`record`: commit, experiment or none), then push it and
    its data; every failure is a line of `problems`."""
    root = Path(root)
    if record == "none":
        return Revision("none")
    if _maybe(root, "rev-parse", "--git-dir") is None:
        return Revision("none", problems=[f"{root} is not a git repository: no revision recorded"])
    pushed, problems = [], []
    try:
        if record == "commit":
            commit, ref, name = commit_to_branch(root, branch, message), f"refs/heads/{branch}", branch
        elif record == "experiment":
            name = experiment_name or "retrain"
            commit, ref = save_experiment(root, name, message)
        else:
            raise ValueError(f"revision.record must be commit, experiment or none, got {record!r}")
    except _Failed as err:
        return Revision("none", problems=[f"no revision recorded: {err}"])
    if push:
        remote = _dvc_remote(root, dvc_remote)
        if remote is not None:
            try:  # the data and models of this revision's dvc.lock (an experiment's go with `dvc exp push`)
                if record == "commit":
                    _dvc(root, "push", "--remote", remote)
                    pushed.append(f"data and models to DVC remote {remote!r}")
            except _Failed as err:
                problems.append(f"dvc push to {remote!r}: {err}")
        has_git_remote = git_remote in (_maybe(root, "remote") or "").split()
        if has_git_remote:
            try:
                if record == "commit":
                    _git(root, "push", git_remote, f"{ref}:{ref}")
                    pushed.append(f"{ref} to git remote {git_remote!r}")
                else:
                    cache = ["--remote", remote] if remote else ["--no-cache"]
                    _dvc(root, "exp", "push", *cache, git_remote, name)
                    pushed.append(f"experiment {name} to git remote {git_remote!r}" + (f" and its outputs to {remote!r}" if remote else ""))
            except _Failed as err:
                problems.append(f"push to git remote {git_remote!r}: {err}")
    return Revision(record, commit=commit, ref=ref, name=name, pushed=pushed, problems=problems)
