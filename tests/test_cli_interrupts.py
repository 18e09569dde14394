"""`ralmspec` stopped mid-run by a signal, as a real process: the command's clean-up runs and it
exits with the shell's status for that signal, without a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest


def _start_and_wait_for(argv: list[str], marker: bytes, timeout_s: float = 60.0,
                        stdout: Any = subprocess.DEVNULL) -> tuple[subprocess.Popen, bytes]:
    """``ralmspec argv`` started, once ``marker`` appeared on its stderr (the stderr so far)."""
    proc = subprocess.Popen([sys.executable, "-m", "ralmspec.cli", *argv], stdout=stdout,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    err, deadline = b"", time.monotonic() + timeout_s
    while marker not in err:
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{marker!r} never came: {err.decode(errors='replace')}")
        err += chunk
    return proc, err


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_build_leaves_no_temporary_folder(tmp_path, sig, status):
    """A datastore build stopped by SIGTERM (a process manager, ``kill``, ``timeout``) left its
    hidden temporary folder (``.knnlm-build-*``, the full-size keys file) beside ``--out``: SIGTERM's
    default ended the process before any ``finally``. It is an interrupt now, as Ctrl-C is: the
    folder is removed, nothing is published, and the status is 128 + the signal's number."""
    out = tmp_path / "ds"
    proc, _ = _start_and_wait_for(["knnlm", "build", "--model", "tiny", "--out", str(out),
                                   "--max-documents", "400"], b"knnlm datastore")
    try:
        proc.send_signal(sig)
        rc = proc.wait(30)
        err = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == status and "Traceback" not in err, (rc, err)
    assert f"ralmspec knnlm: stopped by {sig.name}\n" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_mid_stream_ends_the_answers_line(tmp_path):
    """``generate --stream`` interrupted while it prints the answer: status 130, no traceback, and
    the partial answer's line ends (the shell's prompt was written after it, on the same line)."""
    out_file = open(tmp_path / "out.txt", "wb")
    proc, _ = _start_and_wait_for(["generate", "--model", "tiny", "--stream", "--max-new-tokens", "400",
                                   "--retriever", "bm25", "who wrote hamlet"], b"loaded model", timeout_s=120,
                                  stdout=out_file)
    try:
        deadline = time.monotonic() + 60
        while len((tmp_path / "out.txt").read_bytes()) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)  # until the answer is being printed
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
        err = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        out_file.close()
    assert rc == 130 and "Traceback" not in err, (rc, err)
    out = (tmp_path / "out.txt").read_text()
    assert out.startswith("question: who wrote hamlet\nanswer:   ") and out.endswith("\n"), out


def test_the_next_build_removes_what_a_killed_build_left_but_not_a_live_builds_folder(tmp_path):
    """SIGKILL (or the OOM killer) gives a build no ``finally``: its hidden temporary folder
    (``.OUT.tmp-*``) stayed beside ``--out`` for good. The next build of that output removes it,
    saying so with its path, because no process holds its lock any more; a temporary folder that
    a live build holds (here: this test process) is left alone."""
    from ralmspec.paths import staging_folder

    out = tmp_path / "bm"
    argv = ["index", "build", "--retriever", "bm25", "--out", str(out)]
    with staging_folder(tmp_path, ".bm.tmp-") as live:  # a concurrent build's, this process alive
        proc, _ = _start_and_wait_for(argv, b"Split strings")
        proc.kill()
        proc.wait(30)
        left = sorted(p.name for p in tmp_path.iterdir() if p != live)
        assert len(left) == 1 and left[0].startswith(".bm.tmp-"), left  # what the killed build left
        run = subprocess.run([sys.executable, "-m", "ralmspec.cli", *argv], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert f"ralmspec: removed {tmp_path / left[0]}, left by a build that was killed\n" in run.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bm", live.name])
        assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bm"]


def test_ctrl_c_mid_bench_stops_its_event_loop_work_at_once():
    """``bench`` runs its requests in ``asyncio.run`` (an engine's ``run_sync``), whose Ctrl-C
    cancels the main task only: the requests' inner tasks and their worker-thread jobs (the
    verification pool, ``to_thread``) end with it, as ``asyncio.run`` cancels what is left and
    a worker finishes its one job. Measured: the line comes in well under a second, status 130."""
    proc, _ = _start_and_wait_for(["bench", "--model", "tiny", "--retriever", "exact", "--n", "30", "--threads", "1",
                                   "--ablations"], b"[2/", timeout_s=180)
    try:
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        err = b""
        while b"stopped by" not in err and time.monotonic() - t < 30:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            err += chunk
        said = time.monotonic() - t
        rc = proc.wait(30)
        err += proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.decode(errors="replace")
    assert rc == 130 and text.endswith("ralmspec bench: stopped by SIGINT\n") and "Traceback" not in text, (rc, text)
    assert said < 5, said
