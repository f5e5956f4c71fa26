"""mtl_core: the multi-task image classification library behind the DVC stages, the CLI and the flow."""

import os as _os

# Albumentations checks PyPI for updates on import; the pipeline must run offline.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
