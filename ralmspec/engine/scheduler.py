"""Multi-request scheduler: many requests in flight on one engine, batched ACROSS requests.

Every admitted request runs the engine's own loop (``generate_naive`` or
``generate_speculative``) as an asyncio task with its own token list, speculation cache, OS^3
state and LM session. What the requests share are two batching clients:

- ``BatchingLMClient``: LM chunks requested by different requests while the backend is busy
  (or in the same event-loop turn) are gathered and sent to the backend in ONE
  ``lm.generate(prompts, n, sessions, sampling)`` call per distinct ``n``, in a dedicated worker
  thread; greedy and sampled prompts share a call, each with its own sampling settings.
- ``BatchingSearchClient``: verification (and naive retrieval) queries of different requests
  are gathered into ONE ``retriever.search(queries, k_max)`` call; each caller gets its own
  answers cut to its own ``k``. Identical queries in a batch are searched once.

Invariant (docs/design.md §2 invariant 1, at every concurrency level): a request's tokens equal the oracle run
alone. Why batching cannot change them:
- the LM contract makes ``generate(prompt, n, sampling)`` a function of ``(prompt, n, sampling)``
  alone (a sampled token depends on (seed, its position, its logits) only), whatever the
  batch neighbours and session history (the HF backend keeps per-session KV and decodes the
  prompts one by one, or on the ``batched`` runner in one fixed-shape forward per token; a
  batched backend must be batch-invariant, docs/design.md §2 invariant 3);
- the Retriever contract makes a query's ranking a function of the query alone, and the
  top-k lists for different k are prefixes of one ranking (score desc, doc id asc), so the
  top-k_max list cut to k equals a top-k search (``tests/engine/test_scheduler.py`` checks the
  prefix property for every retriever kind);
- everything else (cache, stride state, tokens) is per request.

Load governor (``engine/governor.py``): the LM client records its busy intervals; while the LM
worker is saturated by several requests, speculation is paused and speculative requests take
plain naive steps (``Scheduler.speculation_allowed``, asked by each request before each round).

Admission control: at most ``max_concurrent`` requests run; at most ``max_queue`` wait for a
slot (FIFO); beyond that ``QueueFullError`` is raised at once (back-pressure, HTTP 429).
A request that is cancelled (client gone) or times out frees its slot immediately and its LM
session is released: at once when no backend call holds it, otherwise the moment that call
returns (a running forward cannot be interrupted; its result is discarded).
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

from ralmspec.config import GenerationConfig, SpeculationConfig, check_seconds, is_int
from ralmspec.engine.context import new_session_id
from ralmspec.engine.governor import BatchCostFit, BusyWindow, GovernorConfig, LoadGovernor
from ralmspec.engine.naive import TokenCallback
from ralmspec.engine.prompt import Conversation
from ralmspec.engine.result import GenerationResult
from ralmspec.errors import ClosedError, ConfigError, RalmSpecError, RetrievalError
from ralmspec.lm.base import LanguageModel
from ralmspec.lm.sampling import Sampling
from ralmspec.retrieval.base import Hit, Retriever
from ralmspec.threads import WorkerPool


class QueueFullError(RalmSpecError):
    """Admission refused: ``max_concurrent`` requests running and ``max_queue`` waiting (HTTP 429)."""


class SchedulerClosedError(ClosedError):
    """The scheduler is shutting down (``aclose``, the end of its ``async with`` block) and accepts
    no new requests (HTTP 503)."""


class SchedulerLoopError(RalmSpecError, RuntimeError):
    """A request on another event loop than the one the scheduler is serving requests on (two
    threads' loops sharing one scheduler): its queue, slots and batching belong to one loop."""


class RequestTimeoutError(RalmSpecError, TimeoutError):
    """A request exceeded its deadline (queueing included); nothing unverified was released (HTTP 504)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Admission control, deadlines and batching limits of one scheduler."""

    max_concurrent: int = 16  # requests generating at once
    max_queue: int = 64  # requests waiting for a slot; beyond: QueueFullError
    request_timeout_s: float | None = 300.0  # whole request deadline (queue + generation); None: none
    retrieval_timeout_s: float | None = 30.0  # one knowledge-base call, per attempt
    retrieval_retries: int = 2  # extra attempts of a failed knowledge-base call
    max_lm_batch: int = 64  # prompts per backend LM call
    max_search_batch: int = 512  # queries per knowledge-base call
    batch_window_s: float = 0.0  # extra wait to gather a batch; 0: whatever is waiting now
    merge_k: bool = True  # one search with max k for callers with different k (else one per k)
    # pause speculation while the LM worker is saturated by many requests (engine/governor.py)
    governor: GovernorConfig = field(default_factory=GovernorConfig)

    def __post_init__(self) -> None:
        for name, lo in (("max_concurrent", 1), ("max_queue", 0), ("max_lm_batch", 1),
                         ("max_search_batch", 1), ("retrieval_retries", 0)):
            v = getattr(self, name)
            if not is_int(v, lo):
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name in ("request_timeout_s", "retrieval_timeout_s"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
                raise ConfigError(f"{name} must be a finite positive number of seconds or None (no limit), got {v!r}")
        if not isinstance(self.batch_window_s, (int, float)) or not 0.0 <= self.batch_window_s <= 1.0:
            raise ConfigError(f"batch_window_s must be in [0, 1] seconds, got {self.batch_window_s!r}")


class SizeHistogram:
    """Exact distribution of observed batch sizes (size -> number of batches). Thread-safe."""

    def __init__(self) -> None:
        self._counts: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()

    def observe(self, size: int) -> None:
        with self._lock:
            self._counts[int(size)] += 1

    def counts(self) -> dict[int, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))

    def summary(self) -> dict[str, Any]:
        c = self.counts()
        n = sum(c.values())
        total = sum(k * v for k, v in c.items())
        return {"batches": n, "items": total, "mean": total / n if n else None,
                "max": max(c) if c else None, "counts": c}


# --------------------------------------------------------------------------- LM batching


@dataclass(eq=False)
class _LMItem:
    prompt: list[int]
    n: int
    session: Hashable
    future: asyncio.Future
    sampling: Sampling | None = None  # None: greedy


class BatchingLMClient:
    """``LMClient`` that gathers concurrent requests' LM chunks into one backend call.

    One dispatcher task per event loop; one backend call at a time, in a dedicated thread (the
    backends serialise on their own lock anyway, and a dedicated thread cannot be starved by
    other ``to_thread`` users). While a call runs, new chunks queue up and form the next batch.
    A backend error fails only the offending prompts: a failed batch is retried prompt by prompt.
    """

    def __init__(self, lm: LanguageModel, max_batch: int = 64, window_s: float = 0.0):
        self.lm = lm
        self.max_batch = max_batch
        self.window_s = window_s
        # prompts per backend call (``lm.generate``: one per distinct n of a batch, and one per
        # prompt of a failed call retried alone); ``calls`` counts those calls
        self.batch_sizes = SizeHistogram()
        self.calls = 0
        self.busy_s = 0.0
        self.busy_window: BusyWindow | None = None  # set by the scheduler: the governor's load signal
        self._pending: collections.deque[_LMItem] = collections.deque()
        self._executor = WorkerPool(1, thread_name_prefix="ralm-lm")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_backend: set[Hashable] = set()
        self._release_after: set[Hashable] = set()
        self._lock = threading.Lock()

    def _ensure_dispatcher(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._dispatch(), name="ralm-lm-dispatcher")

    async def generate(self, prompt: list[int], n: int, session: Hashable,
                       sampling: Sampling | None = None) -> list[int]:
        self._ensure_dispatcher()
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_LMItem(list(prompt), n, session, fut, sampling))
        assert self._wake is not None
        self._wake.set()
        return await fut

    async def greedy(self, prompt: list[int], n: int, session: Hashable) -> list[int]:
        return await self.generate(prompt, n, session)

    def release(self, session: Hashable) -> None:
        """Drop ``session``'s KV state: right after the backend call that holds it, if any.

        Never blocks the event loop: the release runs on the LM thread, behind the current call
        (a backend serialises release with its forwards on one lock anyway)."""
        with self._lock:
            if session in self._in_backend:
                self._release_after.add(session)
                return
        self._release_now(session)

    def _release_now(self, session: Hashable) -> None:
        try:
            self._executor.submit(self.lm.release, session)
        except RuntimeError:  # executor shut down (scheduler closed): release inline
            self.lm.release(session)

    @property
    def queued(self) -> int:
        return sum(1 for it in self._pending if not it.future.done())

    async def _dispatch(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            # let every task that is ready in this loop turn add its chunk first
            await asyncio.sleep(self.window_s)
            while self._pending:
                batch: list[_LMItem] = []
                while self._pending and len(batch) < self.max_batch:
                    it = self._pending.popleft()
                    if not it.future.done():  # cancelled callers are skipped
                        batch.append(it)
                if batch:
                    await self._run_batch(batch)

    async def _run_batch(self, batch: list[_LMItem]) -> None:
        with self._lock:
            self._in_backend.update(it.session for it in batch)
        t = time.perf_counter()
        if self.busy_window is not None:
            self.busy_window.start(t)
        loop = asyncio.get_running_loop()
        try:
            outcomes = await asyncio.shield(loop.run_in_executor(self._executor, self._call, batch))
        except BaseException as exc:  # noqa: BLE001 - dispatcher cancelled (shutdown)
            outcomes = [exc] * len(batch)
            if isinstance(exc, asyncio.CancelledError):
                for it in batch:
                    if not it.future.done():
                        it.future.cancel()
                self._finish_sessions(batch)
                raise
        finally:
            end = time.perf_counter()
            self.busy_s += end - t
            if self.busy_window is not None:
                self.busy_window.stop(end)
        for it, out in zip(batch, outcomes):
            if it.future.done():
                continue
            if isinstance(out, BaseException):
                it.future.set_exception(out)
            else:
                it.future.set_result(out)
        self._finish_sessions(batch)

    def _finish_sessions(self, batch: list[_LMItem]) -> None:
        with self._lock:
            done = {it.session for it in batch}
            self._in_backend -= done
            late = self._release_after & done
            self._release_after -= late
        for s in late:
            self._release_now(s)

    def _call(self, batch: list[_LMItem]) -> list[Any]:
        """Worker thread: one backend call per distinct n (greedy and sampled prompts together,
        each with its own sampling settings); a failing group is retried item by item."""
        out: list[Any] = [None] * len(batch)
        groups: dict[int, list[int]] = collections.defaultdict(list)
        for i, it in enumerate(batch):
            groups[it.n].append(i)
        for n, idx in groups.items():
            try:
                res = self._generate([batch[i] for i in idx], n)
                if len(res) != len(idx):
                    raise RuntimeError(f"LM backend returned {len(res)} outputs for {len(idx)} prompts")
                for i, r in zip(idx, res):
                    out[i] = list(r)
            except Exception as exc:  # noqa: BLE001 - isolate the failing prompt(s)
                if len(idx) == 1:
                    out[idx[0]] = exc
                    continue
                for i in idx:
                    try:
                        out[i] = list(self._generate([batch[i]], n)[0])
                    except Exception as one:  # noqa: BLE001
                        out[i] = one
        return out

    def _generate(self, items: list[_LMItem], n: int) -> Sequence[Sequence[int]]:
        """Worker thread: one backend call, counted in ``calls`` and ``batch_sizes`` (what
        ``/metrics`` shows as prompts per LM backend call), whether it succeeds or not."""
        self.batch_sizes.observe(len(items))
        self.calls += 1
        return self.lm.generate([it.prompt for it in items], n, [it.session for it in items],
                                [it.sampling for it in items])

    async def aclose(self) -> None:
        """Stop the dispatcher; queued session releases still run (waited for off the loop)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001
                pass
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)


# --------------------------------------------------------------------------- search batching


@dataclass(eq=False)
class _SearchItem:
    queries: list[str]
    k: int
    future: asyncio.Future


class BatchingSearchClient:
    """``SearchClient`` that merges concurrent callers' queries into one knowledge-base call.

    Callers with different ``k`` share one search with the largest ``k`` (``merge_k``; valid
    because top-k lists are prefixes of one deterministic ranking); identical query strings are
    searched once. A local retriever runs in a dedicated thread; a retriever with its own async
    ``search`` (e.g. ``RemoteRetriever``) is awaited directly. Up to ``concurrency`` knowledge-base
    calls run at once; callers arriving meanwhile form the next batch. A failed call fails all its
    callers (``verify_batch`` retries them, typically inside a new batch).
    """

    def __init__(self, retriever: Retriever, max_batch: int = 512, window_s: float = 0.0,
                 merge_k: bool = True, concurrency: int = 1):
        if concurrency < 1:
            raise ConfigError("search concurrency must be >= 1")
        self.retriever = retriever
        self.max_batch = max_batch
        self.window_s = window_s
        self.merge_k = merge_k
        self.concurrency = concurrency
        self.batch_queries = SizeHistogram()  # distinct queries per knowledge-base call
        self.batch_callers = SizeHistogram()  # search() callers (requests / rounds) merged per call
        self.calls = 0
        self.failures = 0
        self.mixed_k_calls = 0  # calls that served callers with different k (merge_k at work)
        self.busy_s = 0.0
        self.busy_window: BusyWindow | None = None  # set by the scheduler: the governor's KB signal
        self.cost_fit: BatchCostFit | None = None  # ... and whether batching amortizes a call
        self._pending: collections.deque[_SearchItem] = collections.deque()
        self._local = type(retriever).search is Retriever.search  # base impl: search_sync in a thread
        self._executor = WorkerPool(concurrency, thread_name_prefix="ralm-kb")
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: set[asyncio.Task] = set()

    def _ensure_dispatcher(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wake = asyncio.Event()
            self._slots = asyncio.Semaphore(self.concurrency)
            self._task = loop.create_task(self._dispatch(), name="ralm-kb-dispatcher")

    async def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        queries = list(queries)
        if not queries:
            return []
        self._ensure_dispatcher()
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_SearchItem(queries, int(k), fut))
        assert self._wake is not None
        self._wake.set()
        return await fut

    @property
    def queued(self) -> int:
        return sum(1 for it in self._pending if not it.future.done())

    async def _dispatch(self) -> None:
        assert self._wake is not None and self._slots is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.window_s)
            while self._pending:
                await self._slots.acquire()  # wait for a free knowledge-base slot: batches grow meanwhile
                batch = self._take()
                if not batch:
                    self._slots.release()
                    continue
                t = asyncio.get_running_loop().create_task(self._run_batch(batch))
                self._running.add(t)
                t.add_done_callback(self._running.discard)

    def _take(self) -> list[_SearchItem]:
        batch: list[_SearchItem] = []
        seen: set[str] = set()
        k0: int | None = None
        skipped: list[_SearchItem] = []
        while self._pending:
            it = self._pending[0]
            if it.future.done():
                self._pending.popleft()
                continue
            new = seen.union(it.queries)
            if batch and len(new) > self.max_batch:
                break
            if not self.merge_k and k0 is not None and it.k != k0:
                skipped.append(self._pending.popleft())  # another k: a later batch
                continue
            self._pending.popleft()
            k0 = it.k if k0 is None else k0
            seen = new
            batch.append(it)
        self._pending.extendleft(reversed(skipped))
        return batch

    async def _run_batch(self, batch: list[_SearchItem]) -> None:
        assert self._slots is not None
        try:
            unique = list(dict.fromkeys(q for it in batch for q in it.queries))
            k = max(it.k for it in batch)
            if any(it.k != k for it in batch):
                self.mixed_k_calls += 1
            self.batch_queries.observe(len(unique))
            self.batch_callers.observe(len(batch))
            self.calls += 1
            t = time.perf_counter()
            if self.busy_window is not None:
                self.busy_window.start(t)
            try:
                if self._local:
                    hits = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self.retriever.search_sync, unique, k)
                else:
                    hits = await self.retriever.search(unique, k)
                if len(hits) != len(unique):
                    raise RetrievalError(f"knowledge base returned {len(hits)} answers for {len(unique)} queries")
            except Exception as exc:  # noqa: BLE001 - every caller sees the failure and may retry
                self.failures += 1
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
                return
            finally:
                end = time.perf_counter()
                self.busy_s += end - t
                if self.busy_window is not None:
                    self.busy_window.stop(end)
            if self.cost_fit is not None:  # successful calls only
                self.cost_fit.observe(len(unique), end - t)
            by_query = dict(zip(unique, hits))
            for it in batch:
                if not it.future.done():
                    it.future.set_result([list(by_query[q][: it.k]) for q in it.queries])
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        tasks = [t for t in (self._task, *self._running) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except BaseException:  # noqa: BLE001
                pass
        for it in self._pending:
            if not it.future.done():
                it.future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- the scheduler


@dataclass
class SchedulerCounters:
    admitted: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    cancelled: int = 0
    timed_out: int = 0
    by_error: collections.Counter = field(default_factory=collections.Counter)


class Scheduler:
    """Runs many ``RalmEngine`` requests concurrently with admission control and cross-request batching.

    Use from one event loop at a time: a request from another loop while requests of the first
    run or wait is refused (``SchedulerLoopError``); once they have all ended, the next loop's
    request moves the scheduler to that loop (successive ``asyncio.run`` calls). ``generate``
    has the engine's semantics (same tokens, same result fields) plus: ``QueueFullError`` when
    the queue is full, ``RequestTimeoutError`` past the deadline, ``SchedulerClosedError`` after
    ``aclose``; cancellation frees the slot at once.
    """

    def __init__(self, engine: Any, config: SchedulerConfig | None = None, search_concurrency: int = 1):
        check_open = getattr(engine, "check_open", None)  # a RalmEngine's (a stand-in may have none)
        if check_open is not None:  # a closed engine: else its requests failed one by one, on a closed LM
            check_open()
        self.engine = engine
        self.config = config or SchedulerConfig()
        c = self.config
        self.lm_client = BatchingLMClient(engine.lm, c.max_lm_batch, c.batch_window_s)
        self.search_client = BatchingSearchClient(engine.retriever, c.max_search_batch, c.batch_window_s,
                                                  c.merge_k, search_concurrency)
        self.lm_client.busy_window = BusyWindow(c.governor.window_s, time.perf_counter())
        self.search_client.busy_window = BusyWindow(c.governor.window_s, time.perf_counter())
        self.search_client.cost_fit = BatchCostFit()
        self.governor = LoadGovernor(c.governor, self.lm_client.busy_window, self.search_client.busy_window,
                                     self.search_client.cost_fit)
        self.counters = SchedulerCounters()
        self._running = 0
        self._waiting = 0
        self._slots: asyncio.Semaphore | None = None
        self._sessions: set[Hashable] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop its requests run on
        self._on_loop = 0  # requests inside ``generate`` on that loop
        self._loop_lock = threading.Lock()  # a request of another thread's loop checks under it

    # -- state
    @property
    def active(self) -> int:
        """Requests holding a slot (generating)."""
        return self._running

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return self._waiting

    @property
    def active_sessions(self) -> set[Hashable]:
        return set(self._sessions)

    def stats(self) -> dict[str, Any]:
        """Snapshot for /metrics and reports: admission counters and cross-request batch sizes."""
        c = self.counters
        return {
            "active": self._running, "queued": self._waiting,
            "max_concurrent": self.config.max_concurrent, "max_queue": self.config.max_queue,
            "admitted": c.admitted, "completed": c.completed, "failed": c.failed, "rejected": c.rejected,
            "cancelled": c.cancelled, "timed_out": c.timed_out, "errors": dict(c.by_error),
            "lm_batch_sizes": self.lm_client.batch_sizes.summary(),
            "lm_calls": self.lm_client.calls, "lm_busy_s": self.lm_client.busy_s,
            "kb_batch_queries": self.search_client.batch_queries.summary(),
            "kb_batch_callers": self.search_client.batch_callers.summary(),
            "kb_calls": self.search_client.calls, "kb_failures": self.search_client.failures,
            "kb_mixed_k_calls": self.search_client.mixed_k_calls,
            "kb_busy_s": self.search_client.busy_s,
            "governor": self.governor.stats(time.perf_counter()),
        }

    def speculation_allowed(self) -> bool:
        """The load governor's answer for a request's next round (engine/governor.py)."""
        return self.governor.allows_speculation(time.perf_counter(), self._running)

    # -- requests
    async def generate(self, prompt: str | Conversation, gen: GenerationConfig | None = None,
                       spec: SpeculationConfig | None = None, speculate: bool | None = None,
                       on_tokens: TokenCallback | None = None,
                       timeout_s: float | None | str = "default") -> GenerationResult:
        """Admit, run and return one request (see class doc). ``timeout_s='default'``: the config's."""
        if timeout_s is not None and not (isinstance(timeout_s, str) and timeout_s == "default"):
            # -1 or 0 was a RequestTimeoutError ("exceeded its deadline of -1 s"), "soon" a TypeError
            check_seconds(timeout_s, "timeout_s")
        if self._closed:
            raise SchedulerClosedError("the scheduler is closed (shutting down) and accepts no new requests")
        self._enter_loop(asyncio.get_running_loop())
        try:
            return await self._admit_and_run(prompt, gen, spec, speculate, on_tokens, timeout_s)
        finally:
            with self._loop_lock:
                self._on_loop -= 1

    def _enter_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count a request on ``loop``: the scheduler's loop, or a new one once every request of
        the old one has ended (fresh slots: an asyncio semaphore is bound to one loop)."""
        with self._loop_lock:
            if loop is not self._loop:
                if self._on_loop:
                    raise SchedulerLoopError(
                        f"this Scheduler is serving {self._on_loop} request(s) on another event loop (another "
                        "thread's); a Scheduler belongs to one loop at a time: from several threads, call "
                        "the engine (RalmEngine.generate_sync), or give each loop a Scheduler of its own")
                self._loop, self._slots = loop, asyncio.Semaphore(self.config.max_concurrent)
            self._on_loop += 1

    async def _admit_and_run(self, prompt: str | Conversation, gen: GenerationConfig | None,
                             spec: SpeculationConfig | None, speculate: bool | None,
                             on_tokens: TokenCallback | None, timeout_s: float | None | str) -> GenerationResult:
        """``generate`` once its request is counted on the scheduler's loop."""
        assert self._slots is not None
        timeout = self.config.request_timeout_s if timeout_s == "default" else timeout_s
        if self._running + self._waiting >= self.config.max_concurrent + self.config.max_queue:
            self.counters.rejected += 1
            raise QueueFullError(f"server busy: {self._running} requests running and {self._waiting} queued "
                                 f"(max_concurrent={self.config.max_concurrent}, max_queue={self.config.max_queue}); "
                                 "retry later")
        session = new_session_id("sched")
        holding = False
        try:
            async with asyncio.timeout(timeout):
                self._waiting += 1
                try:
                    await self._slots.acquire()
                finally:
                    self._waiting -= 1
                holding = True
                self._running += 1
                self._sessions.add(session)
                self.counters.admitted += 1
                res = await self.engine.generate(
                    prompt, gen=gen, spec=spec, speculate=speculate, on_tokens=on_tokens, session=session,
                    lm_client=self.lm_client, search_client=self.search_client,
                    may_speculate=self.speculation_allowed, retries=self.config.retrieval_retries,
                    timeout_s=self.config.retrieval_timeout_s)
        except TimeoutError as exc:
            self.counters.timed_out += 1
            raise RequestTimeoutError(f"request exceeded its deadline of {timeout} s") from exc
        except asyncio.CancelledError:
            self.counters.cancelled += 1
            raise
        except Exception as exc:
            self.counters.failed += 1
            self.counters.by_error[type(exc).__name__] += 1
            raise
        finally:
            if holding:
                self._sessions.discard(session)
                self.lm_client.release(session)  # idempotent; the engine also releases it
                self._running -= 1
                # a request waiting for this slot takes it at once: the load has not dropped
                self.governor.request_ended(time.perf_counter(), self._running + self._waiting)
                self._slots.release()
        self.counters.completed += 1
        return res

    async def aclose(self) -> None:
        """Refuse new requests and stop the batching dispatchers (running requests fail)."""
        self._closed = True
        await self.lm_client.aclose()
        await self.search_client.aclose()

    async def __aenter__(self) -> Scheduler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
