"""The HTML page of `dvc plots show` / `dvc plots diff`, with Vega bundled: charts without network.

DVC's own page loads vega, vega-lite and vega-embed from a CDN (`cdn.jsdelivr.net`), so its two line
charts stay blank where there is no internet, without a word. DVC takes another page through its setting
`plots.html_template` (`.dvc/config`, relative to `.dvc/`): this module writes that page,
`.dvc/plots/offline.html`, with the three libraries inline, as the Vega project bundles them in
vl-convert-python (`vl_convert.javascript_bundle`, pinned in uv.lock by the test extra). The page has
DVC's placeholders `{plot_divs}` and `{refresh_tag}` and no `{scripts}`, where DVC would put its CDN
`<script src=...>` tags.

After upgrading vl-convert-python, write the page again (tests/test_plots_offline.py fails until it
matches):

    python3 -m uv run --frozen --extra test python -m mtl_core.plots_page
"""

from __future__ import annotations

import sys
from pathlib import Path

PAGE = Path(".dvc") / "plots" / "offline.html"
# DVC's plot templates are Vega-Lite 5 specifications (`$schema: .../vega-lite/v5.json`): the newest 5.x
# that vl-convert bundles draws them
VEGA_LITE_VERSION = "5.21"

_TEMPLATE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- vega {vega}, vega-lite {vega_lite}, vega-embed {vega_embed}, bundled by vl-convert-python {vl_convert}
         (mtl_core/plots_page.py): the charts need no network -->
    <script type="text/javascript">
__BUNDLE__
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
        img {
            max-width: 100%;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_page() -> str:
    """The page, with the bundle of the installed vl-convert-python."""
    import importlib.metadata

    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    if "</script" in bundle.lower():  # would end the inline script early
        raise ValueError("the Vega bundle contains '</script': it cannot be inlined")
    versions = {
        "{vega}": vl_convert.get_vega_version(),
        "{vega_lite}": VEGA_LITE_VERSION,
        "{vega_embed}": vl_convert.get_vega_embed_version(),
        "{vl_convert}": importlib.metadata.version("vl-convert-python"),
    }
    page = _TEMPLATE
    for key, value in versions.items():
        page = page.replace(key, value)
    return page.replace("__BUNDLE__", bundle)


def main(root: Path = Path(".")) -> Path:
    path = root / PAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(offline_page(), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")))
