"""The page of `dvc plots show` / `dvc plots diff` draws its charts without network: DVC's html template
setting points at .dvc/plots/offline.html, which carries vega, vega-lite and vega-embed inline, as the
pinned vl-convert-python bundles them (tests/test_e2e_dvc.py renders the page DVC writes from it)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from mtl_core.plots_page import PAGE, offline_page
from tests.conftest import REPO_ROOT

# what makes a browser fetch a script, a style sheet or a font from elsewhere
EXTERNAL_LOADS = [
    re.compile(r"<script\b[^>]*\bsrc\s*=", re.I),  # any script file: the page has its scripts inline
    re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?(https?:)?//", re.I),
    re.compile(r"@import\s+(url\()?[\"']?(https?:)?//", re.I),
    re.compile(r"\bimport\s*\(\s*[\"'](https?:)?//", re.I),
]


def external_loads(html: str) -> list[str]:
    """The places in `html` that would load a script, style sheet or font from a URL."""
    return [m.group(0) for pattern in EXTERNAL_LOADS for m in pattern.finditer(html)]


def test_the_committed_page_is_the_pinned_bundle_and_loads_nothing_from_elsewhere():
    committed = (REPO_ROOT / PAGE).read_text(encoding="utf-8")
    assert committed == offline_page(), "run: python3 -m uv run --frozen --extra test python -m mtl_core.plots_page"
    assert external_loads(committed) == []
    for library in ("window.vegaEmbed=", "window.vega=", "window.vegaLite="):
        assert library in committed
    # DVC's placeholders: the plots and the refresh tag, and not `{scripts}`, where DVC puts its CDN tags
    assert "{plot_divs}" in committed and "{refresh_tag}" in committed and "{scripts}" not in committed


def test_dvc_is_set_to_use_the_page():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / ".dvc" / "config")
    assert REPO_ROOT / ".dvc" / config["plots"]["html_template"] == REPO_ROOT / PAGE


def test_the_check_finds_what_dvcs_own_page_loads():
    """The check itself: DVC's default page (dvc_render) loads its three libraries from a CDN."""
    from dvc_render.vega import VegaRenderer

    assert len(external_loads(VegaRenderer.SCRIPTS)) == 3
    assert external_loads('<link rel="stylesheet" href="https://fonts.example/x.css">') != []
    assert external_loads("<script>var a = 1;</script>") == []
