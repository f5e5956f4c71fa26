"""Prefect flows over the pipeline's stages.

Prefect must run offline: no analytics, no telemetry. These defaults are set before Prefect is
imported anywhere in this package; an explicit environment setting still wins. They repeat
prefect.toml, which covers every `prefect ...` command started in the project folder (`prefect server
start`, `prefect deploy`, workers); these cover a flow started from elsewhere (tests/test_prefect_config.py
checks that the two agree).
"""

import os as _os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "DO_NOT_TRACK": "1",
    # the ephemeral API server needs longer than the 20 s default to start on a small (2-core) machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}.items():
    _os.environ.setdefault(_key, _value)
