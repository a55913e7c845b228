"""longvila: long-context video language models the way LongVILA trains and runs them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from longvila.version import __version__

__all__ = ["LongVILA", "LongVILAConfig", "LongVILAOutput", "LongVILAProcessor", "__version__"]

# Imported on first use, so that `longvila --help` does not pay for importing transformers.
_LAZY = {
    "LongVILAConfig": "longvila.config",
    "LongVILA": "longvila.model.vlm",
    "LongVILAOutput": "longvila.model.vlm",
    "LongVILAProcessor": "longvila.processor",
}

if TYPE_CHECKING:
    from longvila.config import LongVILAConfig
    from longvila.model.vlm import LongVILA, LongVILAOutput
    from longvila.processor import LongVILAProcessor


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'longvila' has no attribute {name!r}")
