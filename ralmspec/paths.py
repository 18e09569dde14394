"""Where ralmspec keeps what it builds or fetches (``$RALMSPEC_HOME`` or ``~/.cache/ralmspec``), and
the file operations its builders share."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def ralmspec_home() -> Path:
    """``$RALMSPEC_HOME`` if set (and non-empty), else ``~/.cache/ralmspec``."""
    home = os.environ.get("RALMSPEC_HOME")
    return Path(home) if home else Path.home() / ".cache" / "ralmspec"


def models_cache_dir() -> Path:
    """Model folders (pretrained weights, built-in models written for vLLM): ``<home>/models``."""
    return ralmspec_home() / "models"


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link ``src`` to ``dst`` (no copy of a large array), or copy it where links fail
    (another filesystem). Used when a build reuses an existing index's or datastore's files."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
