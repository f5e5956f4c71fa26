"""The documentation: the generated parameter reference matches the schema, every key is documented, the
MkDocs site builds with --strict (a page missing from the nav, a broken link or anchor fails), and the
README stays a short front page whose links resolve."""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mtl_core import config_reference
from mtl_core.config import PipelineConfig
from tests.conftest import REPO_ROOT

REFERENCE = REPO_ROOT / config_reference.OUTPUT
README_MAX_LINES = 250


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds: itself, a list's items, a union's members."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _schema_keys(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> dict[str, Any]:
    """Every field of the schema, recursively, by dotted key (a list's item fields as `key[].field`);
    walked here independently of config_reference.walk."""
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = prefix + name
        keys[key] = field
        for nested in _models_in(field.annotation):
            is_list = typing.get_origin(field.annotation) is list
            keys.update(_schema_keys(nested, key + ("[]." if is_list else ".")))
    return keys


def test_parameter_reference_is_generated_from_the_current_schema():
    expected = config_reference.render()
    committed = REFERENCE.read_text(encoding="utf-8") if REFERENCE.is_file() else ""
    if committed != expected:
        diff = "\n".join(
            list(difflib.unified_diff(committed.splitlines(), expected.splitlines(), "committed", "generated", lineterm=""))[:40]
        )
        raise AssertionError(
            f"{config_reference.OUTPUT} is out of date with mtl_core/config.py; regenerate it from the project "
            f"root with `{config_reference.REGENERATE}` and commit it.\n{diff}"
        )


def test_every_parameter_is_in_the_reference_with_a_description():
    page = REFERENCE.read_text(encoding="utf-8")
    keys = _schema_keys()
    assert len(keys) > 60  # the walk reached the nested sections
    missing = [k for k in keys if f"`{k}`" not in page]
    undocumented = [k for k, field in keys.items() if not (field.description or "").strip()]
    assert not missing, f"keys missing from {config_reference.OUTPUT}: {missing}"
    assert not undocumented, (
        f"fields of mtl_core/config.py without a description (add description=... to their Field, then "
        f"`{config_reference.REGENERATE}`): {undocumented}"
    )
    # the generator walks the same keys
    assert [e.key for e in config_reference.walk()] == list(keys)


def test_docs_site_builds_strictly(tmp_path: Path):
    """Under --strict, mkdocs.yml's `validation:` turns a page left out of the nav, a nav entry or a link
    to a missing page or anchor, and an absolute link into errors."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about its end of life
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert (tmp_path / "site" / "reference" / "parameters" / "index.html").is_file()


def test_readme_is_short():
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move the detail into a page of docs/"
    )


def test_readme_links_resolve():
    """MkDocs checks the links of docs/; the README is outside it, so its relative links are checked here."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    broken = [
        t for t in targets
        if not re.match(r"[a-z]+:", t) and not t.startswith("#") and not (REPO_ROOT / t.split("#")[0]).exists()
    ]  # fmt: skip
    assert not broken, f"README.md links to files that do not exist: {broken}"
