"""Where ralmspec keeps what it builds or fetches (``$RALMSPEC_HOME`` or ``~/.cache/ralmspec``), and
the file operations its builders share."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


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


@contextlib.contextmanager
def staged_folder(out: Path, prefix: str) -> Iterator[Path]:
    """A fresh folder beside ``out`` (named ``prefix...``) to build into: when the block ends it
    replaces ``out`` (an earlier build there is removed first, then one rename), so a reader
    never opens a half-written build; it is removed whatever happens, and on an error inside
    the block ``out`` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=str(out.parent)))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
