"""Where ralmspec keeps what it builds or fetches: ``$RALMSPEC_HOME`` or ``~/.cache/ralmspec``."""

from __future__ import annotations

import os
from pathlib import Path


def ralmspec_home() -> Path:
    """``$RALMSPEC_HOME`` if set (and non-empty), else ``~/.cache/ralmspec``."""
    home = os.environ.get("RALMSPEC_HOME")
    return Path(home) if home else Path.home() / ".cache" / "ralmspec"


def models_cache_dir() -> Path:
    """Model folders (pretrained weights, built-in models written for vLLM): ``<home>/models``."""
    return ralmspec_home() / "models"
