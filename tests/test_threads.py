"""ralmspec.threads: work handed to another thread runs with the SUBMITTING thread's FAISS
(OpenMP) thread count, which OpenMP keeps per thread (a fresh thread starts at the default)."""

from __future__ import annotations

import ast
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import pytest

import ralmspec
from ralmspec.threads import WorkerPool, faiss_threads, in_worker, to_thread

REPO = Path(ralmspec.__file__).resolve().parent.parent


def test_a_plain_thread_does_not_inherit_the_count(caller_faiss_threads):
    """The problem itself: OpenMP's count is the calling thread's only."""
    n, fresh = caller_faiss_threads
    assert faiss.omp_get_max_threads() == n
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(faiss.omp_get_max_threads).result() == fresh


def test_every_hand_over_runs_with_the_callers_count(caller_faiss_threads):
    n, _ = caller_faiss_threads
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(in_worker(faiss.omp_get_max_threads)).result() == n
    with WorkerPool(1) as pool:
        assert pool.submit(faiss.omp_get_max_threads).result() == n

        async def on_loop():
            via_executor = await asyncio.get_running_loop().run_in_executor(pool, faiss.omp_get_max_threads)
            return via_executor, await to_thread(faiss.omp_get_max_threads)

        assert asyncio.run(on_loop()) == (n, n)


def test_the_count_is_read_at_each_hand_over(caller_faiss_threads):
    """No process-wide setting: the same pool thread follows each submitter's current count."""
    n, fresh = caller_faiss_threads
    with WorkerPool(1) as pool:
        assert pool.submit(faiss.omp_get_max_threads).result() == n
        faiss.omp_set_num_threads(fresh)
        assert pool.submit(faiss.omp_get_max_threads).result() == fresh


def test_a_hand_over_gives_the_thread_its_own_count_back(caller_faiss_threads):
    """``to_thread`` runs in the event loop's default executor, the HOST's threads: a host that
    set its own FAISS count there kept ralmspec's after every engine call (measured: a host
    worker at 1 thread was left at 2 by one ``RalmEngine.generate``)."""
    n, fresh = caller_faiss_threads

    async def on_loop():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))  # the host's one worker thread
        await loop.run_in_executor(None, faiss.omp_set_num_threads, fresh)
        seen = [await to_thread(faiss.omp_get_max_threads)]
        seen.append(await loop.run_in_executor(None, faiss.omp_get_max_threads))
        seen.append(await loop.run_in_executor(None, in_worker(faiss.omp_get_max_threads)))
        seen.append(await loop.run_in_executor(None, faiss.omp_get_max_threads))
        return seen

    assert asyncio.run(on_loop()) == [n, fresh, n, fresh]


def test_without_faiss_nothing_is_wrapped(monkeypatch):
    """A process that never imported FAISS (the GPU image has none) is not made to import it."""
    monkeypatch.delitem(sys.modules, "faiss")
    assert faiss_threads() is None
    assert in_worker(len) is len
    assert "faiss" not in sys.modules


def test_a_retriever_search_runs_with_the_callers_count(caller_faiss_threads, small_indexes, monkeypatch):
    """``Retriever.search`` (the engine's and the server's path to FAISS) in its worker thread."""
    n, _ = caller_faiss_threads
    retriever = small_indexes["exact"]
    seen = []
    real = retriever.search_sync

    def recording(queries, k):
        seen.append(faiss.omp_get_max_threads())
        return real(queries, k)

    monkeypatch.setattr(retriever, "search_sync", recording)
    hits = asyncio.run(retriever.search(["the history of the city"], 3))
    assert len(hits[0]) == 3 and seen == [n]


# ------------------------------------------------------------------ the rule, checked


def thread_hand_overs(root: Path, skip: tuple[str, ...] = ("threads.py",)) -> list[str]:
    """``file:line call`` for every ``asyncio.to_thread(...)`` or ``ThreadPoolExecutor(...)`` under
    ``root`` (files named in ``skip`` excepted): those lose the caller's FAISS thread count."""
    out = []
    for path in sorted(root.rglob("*.py")):
        if path.name in skip:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if name == "ThreadPoolExecutor" or (name == "to_thread" and owner == "asyncio"):
                out.append((str(path.relative_to(root)), node.lineno, name))
    return [f"{p}:{line} {name}" for p, line, name in sorted(out)]


def test_work_reaches_threads_only_through_ralmspec_threads():
    assert (REPO / "ralmspec" / "serving").is_dir()  # the server is scanned with the package
    assert thread_hand_overs(REPO / "ralmspec") == [], "use ralmspec.threads (to_thread, WorkerPool, in_worker)"


def test_the_rule_sees_a_plain_hand_over(tmp_path):
    (tmp_path / "m.py").write_text(
        "import asyncio\nimport concurrent.futures as cf\nfrom ralmspec.threads import to_thread\n\n"
        "async def f():\n    await asyncio.to_thread(len, [])\n    await to_thread(len, [])\n"
        "    cf.ThreadPoolExecutor(1)\n")
    assert thread_hand_overs(tmp_path) == ["m.py:6 to_thread", "m.py:8 ThreadPoolExecutor"]


def test_run_sync_runs_a_coroutine_where_a_loop_already_runs(caller_faiss_threads):
    """A notebook runs an event loop in the caller's thread: ``asyncio.run`` raises there.
    ``run_sync`` runs the coroutine on its own loop in a helper thread, with the caller's
    FAISS count, and returns or raises what the coroutine does."""
    from ralmspec.threads import run_sync

    async def value():
        await asyncio.sleep(0)
        return faiss.omp_get_max_threads()

    async def fails():
        raise ValueError("from the coroutine")

    async def in_a_loop():
        return run_sync(value)

    n, _fresh = caller_faiss_threads
    assert run_sync(value) == n  # no loop: plain asyncio.run
    assert asyncio.run(in_a_loop()) == n

    async def raising():
        return run_sync(fails)

    with pytest.raises(ValueError, match="from the coroutine"):
        asyncio.run(raising())


def test_an_interrupted_run_sync_cancels_its_coroutine_at_once():
    """Ctrl-C while ``run_sync`` waits (a notebook's interrupt) cancels the request and raises
    KeyboardInterrupt when the coroutine has ended, not after the whole request (here 30 s)."""
    import os
    import signal
    import threading
    import time

    from ralmspec.threads import run_sync

    seen, started, done = [], threading.Event(), threading.Event()

    def interrupt() -> None:  # Ctrl-C 0.3 s after the coroutine started (0.3 s after run_sync was
        # called, a loaded machine's helper thread may not have begun the coroutine: nothing to cancel)
        if started.wait(30) and not done.wait(0.3):
            os.kill(os.getpid(), signal.SIGINT)

    async def long_request():
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def in_a_loop():
        return run_sync(long_request)

    # a loop that leaves SIGINT to Python's handler, as a notebook kernel's does (asyncio.run's
    # own handler would only cancel its main task at its next await)
    loop = asyncio.new_event_loop()
    timer = threading.Thread(target=interrupt, daemon=True)
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(in_a_loop())
    finally:
        done.set()  # no Ctrl-C after the test
        started.set()
        timer.join(30)
        loop.close()
    assert time.perf_counter() - t0 < 5 and seen == ["cancelled"]
