"""serving/memory.py: the process's memory readings and the periodic C heap trim, on this
process's real glibc heap."""

from __future__ import annotations

import asyncio
import platform

import pytest

from serving.memory import HeapTrimmer, process_heap, process_rss_bytes, trim_heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="mallinfo2 / malloc_trim are glibc's")
MIB = 1 << 20


@needs_glibc
def test_process_heap_sees_an_allocation_and_its_release():
    """``in_use_bytes`` rises by at least what was allocated and falls back when it is freed;
    the heap's parts are consistent (mmapped blocks are in use; free bytes lie in the arena)."""
    before = process_heap()
    assert before is not None and all(isinstance(v, int) and v >= 0 for v in before.values())
    block = bytearray(64 * MIB)  # touched: bytearray zero-fills
    during = process_heap()
    assert during["in_use_bytes"] - before["in_use_bytes"] >= 64 * MIB
    del block
    after = process_heap()
    assert during["in_use_bytes"] - after["in_use_bytes"] >= 64 * MIB
    for h in (before, during, after):
        assert h["mmapped_bytes"] <= h["in_use_bytes"] and h["free_bytes"] <= h["arena_bytes"]
        assert h["releasable_bytes"] <= h["free_bytes"]


@needs_glibc
def test_trim_gives_fragmented_free_memory_back():
    """The server's creep in small: blocks freed between blocks still in use stay resident (free
    inside the heap, nothing at its top to shrink) until ``malloc_trim`` hands their pages back.
    The memory in use does not change; RSS falls by most of what was freed."""
    blocks = [bytearray(96 * 1024) for _ in range(1200)]  # ~112 MiB, below malloc's mmap threshold
    del blocks[::2]  # every other one: ~56 MiB free, in holes
    heap, rss = process_heap(), process_rss_bytes()
    assert heap["free_bytes"] >= 50 * MIB  # freed but kept
    assert trim_heap() is True
    after_heap, after_rss = process_heap(), process_rss_bytes()
    assert rss - after_rss >= 32 * MIB, (rss / MIB, after_rss / MIB)
    assert abs(after_heap["in_use_bytes"] - heap["in_use_bytes"]) < 4 * MIB
    del blocks


def test_trimmer_off_and_bad_interval():
    t = HeapTrimmer(0)
    assert not t.enabled and t.stats()["interval_s"] == 0.0
    with pytest.raises(ValueError, match="interval_s"):
        HeapTrimmer(-1)


@needs_glibc
async def test_trimmer_runs_every_interval_off_the_loop_and_stops_on_close():
    t = HeapTrimmer(0.05)
    t.start()
    loop_ticks = 0
    for _ in range(40):  # the loop stays free while trims run in a thread
        await asyncio.sleep(0.01)
        loop_ticks += 1
    await t.aclose()
    calls = t.stats()["calls"]
    assert calls >= 2 and loop_ticks == 40
    s = t.stats()
    assert s["interval_s"] == 0.05 and 0 < s["max_seconds"] <= s["seconds"] and s["released_bytes"] >= 0
    await asyncio.sleep(0.15)
    assert t.stats()["calls"] == calls  # closed: no more trims
