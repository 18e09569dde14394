"""A process's memory: readings (RSS, glibc's C heap) and the periodic heap trim.

A long-running server frees and reallocates CPU tensors and Python objects of varying sizes
from several threads; glibc's malloc keeps what is freed inside its arenas, so RSS creeps up
while the memory in use stays flat (measured: ``experiments/results/2026-12-06-heap-trim/``).
``HeapTrimmer`` hands the free pages back every ``interval_s`` with ``malloc_trim(0)`` from its
own thread (the server, each LM replica and each shard actor run one); ``process_memory`` is
what each of them reports (the server's ``/v1/stats`` ``memory``, and ``memory.workers`` for its
Ray actors). Everything here is a no-op (None) where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
from typing import Any

from ralmspec.errors import ConfigError


def process_rss_bytes(pid: int | None = None) -> int | None:
    """Resident set size from /proc/<pid>/status (Linux); None where unavailable."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _libc(symbol: str) -> Any:
    """A glibc function of this process (``mallinfo2`` needs glibc >= 2.33), or None."""
    try:
        return getattr(ctypes.CDLL(None), symbol)
    except (AttributeError, OSError):
        return None


def process_heap() -> dict[str, int] | None:
    """The C heap as glibc's malloc sees it (``mallinfo2``); None where glibc is not the allocator.

    ``in_use_bytes``: allocated and not freed (Python objects, CPU tensors, native buffers);
    ``free_bytes``: freed but kept inside the heap (RSS that grows while ``in_use_bytes`` stays
    flat lands here: fragmentation, not a leak; pages ``malloc_trim`` gave back still count
    here, they are just no longer resident); ``mmapped_bytes``: large blocks mapped on their own
    (returned to the OS when freed); ``arena_bytes``: the arenas' size; ``releasable_bytes``:
    the free top of the main arena. Summed over every arena, each locked in turn (microseconds)."""
    fn = _libc("mallinfo2")
    if fn is None:
        return None
    fn.restype, fn.argtypes = _MallInfo2, []
    m = fn()
    return {"in_use_bytes": m.uordblks + m.hblkhd, "free_bytes": m.fordblks, "mmapped_bytes": m.hblkhd,
            "arena_bytes": m.arena, "releasable_bytes": m.keepcost}


def _can_trim() -> bool:
    """glibc's ``malloc_trim`` (told from another libc's by glibc's ``mallinfo2`` beside it)."""
    return _libc("malloc_trim") is not None and _libc("mallinfo2") is not None


def check_trim_interval(seconds: float, name: str = "malloc_trim_s") -> float:
    """The seconds between heap trims, checked (>= 0, 0: never; NaN refused); ``name`` is the
    setting's name in the message (a config field, or the command line's flag)."""
    if not seconds >= 0:
        raise ConfigError(f"{name} must be >= 0 (0: never trim), got {seconds}")
    return float(seconds)


def trim_heap() -> bool | None:
    """``malloc_trim(0)``: give every arena's free pages back to the OS. True if some memory was
    released, False if none, None where glibc is not the allocator. It locks each arena in turn
    (a thread allocating then waits); call it off the event loop."""
    if not _can_trim():
        return None
    fn = _libc("malloc_trim")
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_size_t]
    return bool(fn(0))


class HeapTrimmer:
    """Trims the C heap every ``interval_s`` seconds in its own daemon thread until ``close()``;
    ``stats()`` says what it did and what it cost. ``interval_s`` 0 (or no glibc): never runs.
    One per long-running process: the server, each LM replica, each shard actor."""

    def __init__(self, interval_s: float):
        self.interval_s = check_trim_interval(interval_s)
        self.enabled = self.interval_s > 0 and _can_trim()
        self.calls = 0
        self.seconds = 0.0
        self.max_seconds = 0.0
        self.released_bytes = 0  # RSS before minus after, summed (what the trims gave back)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def trim(self) -> None:
        """One trim, measured (blocking for as long as it takes: milliseconds)."""
        before, t = process_rss_bytes(), time.perf_counter()
        trim_heap()
        dt, after = time.perf_counter() - t, process_rss_bytes()
        self.calls += 1
        self.seconds += dt
        self.max_seconds = max(self.max_seconds, dt)
        if before is not None and after is not None:
            self.released_bytes += max(0, before - after)

    def start(self) -> "HeapTrimmer":
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ralmspec-heap-trim", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.trim()

    def close(self) -> None:
        """Stop trimming (waits for a trim under way: milliseconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def stats(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s if self.enabled else 0.0, "calls": self.calls,
                "seconds": self.seconds, "max_seconds": self.max_seconds, "released_bytes": self.released_bytes}


def process_memory(trimmer: HeapTrimmer | None = None) -> dict[str, Any]:
    """This process's memory as one report: ``pid``, ``rss_bytes``, ``heap`` (``process_heap``)
    and ``heap_trim`` (``trimmer.stats()``; None without a trimmer). Thread-safe: a Ray actor
    answers it from its own thread while another thread decodes or searches."""
    return {"pid": os.getpid(), "rss_bytes": process_rss_bytes(), "heap": process_heap(),
            "heap_trim": trimmer.stats() if trimmer is not None else None}
