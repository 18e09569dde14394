"""ralmspec/paths.py: the output-path check every command runs before its work, and the cache folders."""

from __future__ import annotations

import os
import threading

import pytest

from ralmspec.errors import ConfigError
from ralmspec.paths import cache_folder, check_output_path, staged_folder


def test_output_paths_that_cannot_be_written_are_refused_by_flag(tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    check_output_path(tmp_path / "new" / "deeper" / "out.json", "--json")  # folders are made later
    check_output_path(a_file, "--json")  # an existing file is replaced
    check_output_path(tmp_path, "--out", folder=True)
    check_output_path(tmp_path / "new" / "dir", "--out", folder=True)
    for path, folder, says in ((tmp_path, False, "--json .*is a folder"),
                               (a_file, True, "--out .*exists and is not a folder"),
                               (a_file / "out.json", False, "is a file, not a folder"),
                               (a_file / "sub" / "dir", True, "is a file, not a folder"),
                               ("", False, "the path is empty")):
        with pytest.raises(ConfigError, match=says):
            check_output_path(path, "--out" if folder else "--json", folder=folder)


def test_a_cache_that_cannot_be_written_names_ralmspec_home(tmp_path, monkeypatch):
    """A read-only or impossible $RALMSPEC_HOME (a container's) failed the first fetch or build with
    a bare OSError ("[Errno 2] No such file or directory: '/proc/nope'"), naming neither the
    cache nor the way out; a complete cache is still read without being written."""
    import os

    from ralmspec.config import RetrievalConfig
    from ralmspec.data.corpus import Corpus, Passage
    from ralmspec.lm.pretrained import pretrained_folder
    from ralmspec.retrieval.index import ensure_index

    a_file = tmp_path / "f"
    a_file.write_text("x")
    monkeypatch.setenv("RALMSPEC_HOME", str(a_file / "home"))
    assert cache_folder(tmp_path / "fine" / "indexes", "index").is_dir()
    with pytest.raises(ConfigError, match=r"cannot create the index cache folder .*f/home/indexes "
                                          r"\(set by \$RALMSPEC_HOME\): .*set \$RALMSPEC_HOME to a writable folder"):
        ensure_index(Corpus([Passage(0, "t", "some text")]), "bm25", RetrievalConfig(kind="bm25"), show_progress=False)
    with pytest.raises(ConfigError, match=r"cannot create the model cache folder .*f/home/models"):
        pretrained_folder("smollm2", log=lambda _msg: None)
    monkeypatch.delenv("RALMSPEC_HOME")
    monkeypatch.setattr(os, "access", lambda *_a: False)  # (root writes anywhere: pretend it may not)
    with pytest.raises(ConfigError, match=r"the model cache folder .* \(under ~/.cache/ralmspec\) is not writable"):
        cache_folder(tmp_path / "fine", "model")


def test_a_staged_build_is_published_readable_by_all(tmp_path):
    """A build renamed into place (a kNN-LM datastore, a converted model in the cache) kept its
    temporary folder's mode, 0700: a cache filled by one user (a container image's build) could not
    be read by another (the service's user). Published as 0755 now, as an index is."""
    import stat

    out = tmp_path / "ds"
    with staged_folder(out, ".build-") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["ds"] and (out / "manifest.json").read_text() == "{}"


def test_an_interrupt_as_a_build_is_put_in_place_keeps_the_earlier_build(tmp_path, monkeypatch):
    """``--overwrite`` of a datastore: the earlier build was deleted before the new one was
    renamed into place, so an interrupt there (a signal: SIGTERM is one now) lost both. The
    earlier build is moved aside, and back if the new one cannot be put in place."""
    import os

    out = tmp_path / "ds"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    rename = os.rename

    def interrupted(src, dst):
        if os.path.basename(src).startswith(".build-"):
            raise KeyboardInterrupt
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted)
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(out, ".build-") as tmp:
            (tmp / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_a_file_written_atomically_replaces_the_old_one_whole_or_not_at_all(tmp_path, monkeypatch):
    """``bench --json / --outputs`` and the kNN-LM reports: an interrupt while writing left a
    half-written results file (opened in place with "w"); now the earlier file stays, and no
    temporary file is left beside it."""
    from ralmspec.paths import write_text_atomically

    out = tmp_path / "results" / "bench.json"
    write_text_atomically(out, '{"old": 1}')  # the folder is created
    assert out.read_text() == '{"old": 1}' and (out.stat().st_mode & 0o777) == 0o644

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(out, '{"new": 2}' * 1000)
    assert out.read_text() == '{"old": 1}'
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]
    monkeypatch.undo()
    write_text_atomically(out, '{"new": 2}')
    assert out.read_text() == '{"new": 2}' and [p.name for p in out.parent.iterdir()] == ["bench.json"]


def test_an_atomic_write_follows_links_and_writes_devices_in_place(tmp_path):
    """``--json /dev/stdout`` (a device: renaming a file over it would replace the link in /dev,
    as root) and a link to a results file (the link stays, its file is replaced) are written as
    ``open(path, "w")`` would write them."""
    from ralmspec.paths import write_text_atomically

    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_text_atomically(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    write_text_atomically(os.devnull, "into the device")  # a character device: in place
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    write_text_atomically(fifo, "through the pipe")
    reader.join(10)
    assert got == ["through the pipe"] and not fifo.is_file()


def test_a_staging_folder_this_process_holds_is_never_swept(tmp_path):
    """``staging_folder`` sweeps the unlocked folders of its prefix (left by killed builds); one
    this process still builds in is locked through another open of it, and ``flock`` locks of two
    opens conflict within one process too: kept, also by a second build of the same prefix. Each
    folder is gone once its block ends."""
    from ralmspec.paths import remove_stale_staging, staging_folder

    with staging_folder(tmp_path, ".x.tmp-") as live:
        assert remove_stale_staging(tmp_path, ".x.tmp-") == [] and live.is_dir()
        with staging_folder(tmp_path, ".x.tmp-") as second:
            assert live.is_dir() and second.is_dir() and second != live
        assert live.is_dir() and not second.exists()
    assert list(tmp_path.iterdir()) == []
