"""The `mtl` command itself (its stages and `mtl predict` have tests of their own)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_mtl_version_prints_the_projects_version():
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    mtl = Path(sys.executable).with_name("mtl")
    done = subprocess.run([str(mtl), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"mtl {version}"
