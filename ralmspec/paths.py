"""Where ralmspec keeps what it builds or fetches (``$RALMSPEC_HOME`` or ``~/.cache/ralmspec``), and
the file operations its builders share."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from ralmspec.errors import ConfigError

log = logging.getLogger(__name__)


def ralmspec_home() -> Path:
    """``$RALMSPEC_HOME`` if set (and non-empty), else ``~/.cache/ralmspec``."""
    home = os.environ.get("RALMSPEC_HOME")
    return Path(home) if home else Path.home() / ".cache" / "ralmspec"


def models_cache_dir() -> Path:
    """Model folders (pretrained weights, built-in models written for vLLM): ``<home>/models``."""
    return ralmspec_home() / "models"


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (a file removed while they are counted is left out)."""
    total = 0
    for f in Path(path).rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:
            pass
    return total


def cache_folder(path: str | os.PathLike, what: str, instead: str = "") -> Path:
    """``path``, a folder of the cache (``ralmspec_home()``'s), made if missing, before a fetch or
    build writes there: a ``ConfigError`` naming ``$RALMSPEC_HOME`` when it cannot be made or
    written (a read-only home in a container: the bare ``OSError`` named neither the cache nor the
    way out). ``instead``: another way out, added to the message. A cache that is complete is read
    without this check, so a read-only one filled beforehand works."""
    p = Path(path)
    where = "set by $RALMSPEC_HOME" if os.environ.get("RALMSPEC_HOME") else "under ~/.cache/ralmspec"
    fix = f"set $RALMSPEC_HOME to a writable folder{instead}"
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the {what} cache folder {p} ({where}): {exc.strerror or exc}; {fix}") from exc
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"the {what} cache folder {p} ({where}) is not writable; {fix}")
    return p


def check_output_path(path: str | os.PathLike, flag: str, *, folder: bool = False) -> None:
    """``ConfigError`` naming ``flag`` unless ``path`` can be written as a file (``folder``: made as
    a folder): it is not an existing folder (a file), the closest of its existing ancestors is a
    folder, and this process may write there. Commands call it before their work, so a bad
    ``--json`` / ``--out`` fails at once instead of with a traceback after the run."""
    p = os.path.abspath(os.fspath(path)) if os.fspath(path) else ""
    if not p:
        raise ConfigError(f"{flag}: the path is empty")
    if os.path.exists(p):
        if folder and not os.path.isdir(p):
            raise ConfigError(f"{flag} {path}: exists and is not a folder")
        if not folder and os.path.isdir(p):
            raise ConfigError(f"{flag} {path}: is a folder; give a file path")
        if not os.access(p, os.W_OK):
            raise ConfigError(f"{flag} {path}: not writable")
        return
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot create it in {parent} (not writable)")


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link ``src`` to ``dst`` (no copy of a large array), or copy it where links fail
    (another filesystem). Used when a build reuses an existing index's or datastore's files."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, creating its folder: into a temporary file beside it,
    then renamed over it, so an interrupt or a full disk leaves the earlier file (or none), never
    a half-written one (a results file cut mid-line reads as a corrupt run). A link is followed
    (the file it names is replaced, the link stays); a path that is not a regular file
    (``/dev/stdout``, a pipe) or a file in a folder this process may not write is written in
    place, as ``open(path, "w")`` would."""
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        _write_in_place(path, text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except PermissionError:  # a writable file in a read-only folder
        _write_in_place(path, text)
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: a results file is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_in_place(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def staging_folder(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A new empty folder in ``parent`` (named ``prefix...``) for a build renamed into place when
    done, readable by all as an ordinary folder is (0755, as an index's: ``mkdtemp`` makes it
    0700, which the rename kept, so a cache filled by one user was unreadable to another). When
    the block ends it is removed if still there (not renamed into place).

    It is locked (``flock`` on the folder itself, which a rename keeps) until the block ends, or
    until this process ends, however it ends: the folders a build killed mid-way (SIGKILL, the
    OOM killer) left are the unlocked ones, and they are removed here first
    (:func:`remove_stale_staging`), never one that a live build, here or in another process, is
    writing (``flock`` locks of two opens conflict within one process too)."""
    remove_stale_staging(parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=str(parent)))
    try:
        os.chmod(tmp, 0o755)
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without locks: the folder is only unjudgeable by a later build
            pass
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def remove_stale_staging(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Remove the folders named ``prefix...`` in ``parent`` that no process holds locked (their
    build was killed mid-way), each logged with its path; returns them. A folder locked by a live
    build is left, and so is one whose lock cannot be tried (a file system without locks: logged,
    with the path to remove by hand once no build writes it)."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = Path(parent) / name
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # gone meanwhile (its build ended), or not ours to open
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live build's
            except OSError as exc:
                log.warning("ralmspec: %s may be left by a killed build (its lock cannot be tried: %s); remove it "
                            "once no build writes it", path, exc)
                continue
            shutil.rmtree(path, ignore_errors=True)
            log.warning("ralmspec: removed %s, left by a build that was killed", path)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def staged_folder(out: Path, prefix: str) -> Iterator[Path]:
    """A fresh folder beside ``out`` (named ``prefix...``) to build into: when the block ends it
    replaces ``out`` (``replace_folder``), so a reader never opens a half-written build; it is
    removed whatever happens, and on an error inside the block ``out`` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out.parent, prefix) as tmp:
        yield tmp
        replace_folder(tmp, out)


def replace_folder(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Put the folder ``new`` at ``out`` (same file system) by renames. An earlier ``out`` with
    files in it is moved aside first (``out.old-*``) and removed only once ``new`` is in place,
    and put back if that fails, so an interrupt never leaves neither build (the old one was
    deleted first: a signal in between lost both); an empty one is replaced."""
    new, out = Path(new), Path(out)
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        try:
            os.rename(new, out)
        except BaseException:  # (an interrupt) the earlier build goes back in place
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.is_dir():
        out.rmdir()
    os.rename(new, out)
