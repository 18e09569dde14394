"""ralmspec/memory.py: the process's memory readings and the periodic C heap trim, on this
process's real glibc heap."""

from __future__ import annotations

import os
import platform
import time

import pytest

from ralmspec.errors import ConfigError
from ralmspec.memory import HeapTrimmer, process_heap, process_memory, process_rss_bytes, trim_heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="mallinfo2 / malloc_trim are glibc's")
MIB = 1 << 20


@needs_glibc
def test_process_heap_sees_an_allocation_and_its_release():
    """``in_use_bytes`` rises by at least what was allocated and falls back when it is freed;
    the heap's parts are consistent (mmapped blocks are in use; free bytes lie in the arena)."""
    before = process_heap()
    assert before is not None and all(isinstance(v, int) and v >= 0 for v in before.values())
    block = bytearray(256 * MIB)  # touched: bytearray zero-fills
    during = process_heap()
    # other threads of the test process (servers of other test files) may allocate meanwhile
    assert during["in_use_bytes"] - before["in_use_bytes"] >= 224 * MIB
    del block
    after = process_heap()
    assert during["in_use_bytes"] - after["in_use_bytes"] >= 224 * MIB
    for h in (before, during, after):
        assert h["mmapped_bytes"] <= h["in_use_bytes"] and h["free_bytes"] <= h["arena_bytes"]
        assert h["releasable_bytes"] <= h["free_bytes"]


@needs_glibc
def test_trim_gives_fragmented_free_memory_back():
    """The server's creep in small: blocks freed between blocks still in use stay resident (free
    inside the heap, nothing at its top to shrink) until ``malloc_trim`` hands their pages back.
    The memory in use does not change; RSS falls by most of what was freed."""
    blocks = [bytearray(96 * 1024) for _ in range(2400)]  # ~225 MiB, below malloc's mmap threshold
    del blocks[::2]  # every other one: ~112 MiB free, in holes
    heap, rss = process_heap(), process_rss_bytes()
    assert heap["free_bytes"] >= 100 * MIB  # freed but kept
    assert trim_heap() is True
    after_heap, after_rss = process_heap(), process_rss_bytes()
    assert rss - after_rss >= 64 * MIB, (rss / MIB, after_rss / MIB)
    assert abs(after_heap["in_use_bytes"] - heap["in_use_bytes"]) < 32 * MIB
    del blocks


def test_trimmer_off_and_bad_interval():
    t = HeapTrimmer(0).start()
    assert not t.enabled and t.stats()["interval_s"] == 0.0 and t._thread is None
    t.close()
    for bad in (-1, float("nan")):
        with pytest.raises(ConfigError, match="malloc_trim_s must be >= 0"):
            HeapTrimmer(bad)


@needs_glibc
def test_trimmer_runs_every_interval_in_its_thread_and_stops_on_close():
    t = HeapTrimmer(0.05).start()
    thread = t._thread
    deadline = time.monotonic() + 10
    while t.stats()["calls"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    t.close()
    s = t.stats()
    assert s["calls"] >= 2 and s["interval_s"] == 0.05
    assert 0 < s["max_seconds"] <= s["seconds"] and s["released_bytes"] >= 0
    time.sleep(0.15)
    assert t.stats()["calls"] == s["calls"]  # closed: no more trims
    assert thread is not None and thread.name == "ralmspec-heap-trim" and not thread.is_alive()


def test_process_memory_is_one_report_of_this_process():
    t = HeapTrimmer(0)
    m = process_memory(t)
    assert set(m) == {"pid", "rss_bytes", "heap", "heap_trim"} and m["pid"] == os.getpid()
    assert m["heap_trim"] == t.stats() and process_memory()["heap_trim"] is None
    if process_rss_bytes() is not None:
        assert m["rss_bytes"] > 1 << 20
    assert (m["heap"] is not None) == GLIBC
