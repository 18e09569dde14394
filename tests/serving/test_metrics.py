"""serving/metrics.py on its own: how a scrape renders the process's memory."""

from __future__ import annotations

import platform

from ralmspec.memory import process_rss_bytes
from serving.metrics import ServerMetrics

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_a_scrape_renders_the_memory_it_is_given():
    """The RSS and heap gauges show the ``memory`` of the stats the scrape already read (one
    /proc read per scrape), and read their own where none is given."""
    memory = {"rss_bytes": 123456789, "heap": {"in_use_bytes": 1000, "free_bytes": 20, "mmapped_bytes": 0,
                                               "arena_bytes": 1020, "releasable_bytes": 0}}
    text = ServerMetrics().render(memory=memory)
    lines = set(text.splitlines())
    assert "ralmspec_process_resident_memory_bytes 123456789" in lines
    assert "ralmspec_process_heap_in_use_bytes 1000" in lines and "ralmspec_process_heap_free_bytes 20" in lines
    own = ServerMetrics().render()
    rss = next(float(x.split()[1]) for x in own.splitlines() if x.startswith("ralmspec_process_resident_memory_bytes "))
    if process_rss_bytes() is not None:
        assert rss > 1e6
    assert ("ralmspec_process_heap_free_bytes" in own) == GLIBC
