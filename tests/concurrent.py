"""Run a test body in several threads at once (the concurrency tests of the LM, the datastore,
the rendezvous): ``run_together(n, body)`` starts ``n`` threads at one barrier, each calling
``body(i)``, and returns what each returned, or the exception it raised, in thread order; a
thread still running after ``timeout_s`` fails the test."""

from __future__ import annotations

import threading
from typing import Any, Callable


def run_together(n: int, body: Callable[[int], Any], timeout_s: float = 120.0) -> list[Any]:
    out: list[Any] = [None] * n
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        start.wait()
        try:
            out[i] = body(i)
        except BaseException as exc:  # noqa: BLE001 - the caller asserts on it
            out[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), f"a thread still runs after {timeout_s:g} s"
    return out


def raised(results: list[Any]) -> list[BaseException]:
    """The exceptions among ``run_together``'s results."""
    return [r for r in results if isinstance(r, BaseException)]
