"""Thread counts of the numeric libraries (torch, FAISS, numpy's BLAS) for this process.

One place for what ``--threads N`` means (``ralmspec bench / serve``, ``ralmspec knnlm ...``,
the experiment harness) and for what a shard actor does with its ``threads``.

Worker threads. torch's count and BLAS's are process-wide, but FAISS's is OpenMP's, which keeps
it PER THREAD: ``faiss.omp_set_num_threads`` sets the calling thread's only, and every other
thread (a verification worker, ``asyncio.to_thread``, a knowledge-base pool) starts at the
library default, one per core. So ``--threads 1`` used to leave every search run beside the
LM with all the cores: measured on the 2-core VM, a 1-query kNN-LM search (100k flat) took 28 ms
beside a 1-thread decode loop instead of 6 ms alone (OpenMP threads spinning against the LM),
9 ms with one thread. Work handed to another thread therefore goes through :func:`in_worker`,
:func:`to_thread` or a :class:`WorkerPool`, which run it with the SUBMITTING thread's FAISS
count (read when it is handed over: no process-wide setting is kept here), and give the thread
its own count back when the work is done (``to_thread`` runs in the event loop's default
executor, whose threads are the host program's).
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Awaitable, Callable, TypeVar

from ralmspec.errors import ConfigError

T = TypeVar("T")


def set_threads(n: int | None, *, blas: bool = True) -> None:
    """torch (process-wide) and FAISS (OpenMP: the calling thread) threads, and with ``blas``
    numpy's BLAS too (the blocked flat scan of small verification batches).

    ``None`` leaves the libraries' defaults; ``n < 1`` is a ``ConfigError``. Shard actors pass
    ``blas=False``: they bound only FAISS and torch (their searches' own threads).
    """
    if n is None:
        return
    if n < 1:
        raise ConfigError("--threads must be >= 1")
    import faiss

    faiss.omp_set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - torch is part of the [cpu] stack
        pass
    if not blas:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of the [cpu] stack
        return
    threadpool_limits(limits=n, user_api="blas")


def faiss_threads() -> int | None:
    """The calling thread's FAISS (OpenMP) thread count; None while FAISS is not imported (the
    process has done no FAISS work, and importing it here would cost a second on the GPU
    image, which has none)."""
    faiss = sys.modules.get("faiss")
    return None if faiss is None else int(faiss.omp_get_max_threads())


def in_worker(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` to be run in another thread with THIS thread's FAISS thread count (module doc)."""
    n = faiss_threads()
    if n is None:
        return fn

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        faiss = sys.modules["faiss"]
        before = faiss.omp_get_max_threads()
        if before == n:
            return fn(*args, **kwargs)
        faiss.omp_set_num_threads(n)
        try:
            return fn(*args, **kwargs)
        finally:
            # the thread may be the host's (``to_thread``: its loop's default executor): it
            # gets its own count back
            faiss.omp_set_num_threads(before)

    return run


async def to_thread(fn: Callable[..., T], /, *args: Any) -> T:
    """``asyncio.to_thread(fn, *args)`` with the caller's FAISS thread count (module doc)."""
    return await asyncio.to_thread(in_worker(fn), *args)


class WorkerPool(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` that runs each call with its submitter's FAISS thread count
    (module doc); ``loop.run_in_executor(pool, ...)`` goes through ``submit`` too."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(in_worker(fn), *args, **kwargs)


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run(make())``, also where an event loop already runs in this thread (a Jupyter
    notebook, an async web framework), where ``asyncio.run`` cannot be called: there the
    coroutine runs on its own loop in a helper thread (with this thread's FAISS count) while
    this one waits. Interrupted while it waits (Ctrl-C, the notebook's interrupt), it cancels
    the coroutine and re-raises once that has ended, instead of waiting for the whole request."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    started: list[tuple[asyncio.AbstractEventLoop, asyncio.Task]] = []
    abandoned = threading.Event()

    async def main() -> T:
        started.append((asyncio.get_running_loop(), asyncio.current_task()))
        if abandoned.is_set():  # interrupted before this loop began: the except below found no task
            raise asyncio.CancelledError
        return await make()

    with WorkerPool(max_workers=1, thread_name_prefix="ralmspec-run-sync") as pool:
        future = pool.submit(asyncio.run, main())
        try:
            return future.result()
        except BaseException:
            abandoned.set()
            if not future.done() and started:
                loop, task = started[0]
                loop.call_soon_threadsafe(task.cancel)
            raise
