"""Where decoding threads meet: calls of several threads that arrive together run as ONE batch.

The kNN-LM server decodes each request in a thread of its own; per token a thread steps the LM
and searches the datastore. A :class:`Rendezvous` is the set of those threads (``member()``:
a thread decoding a request); each :class:`Lane` of it is one kind of call (the LM step, the
search) whose waiting calls run as one batch, by whichever waiting thread finds the rule true
(no extra thread), which then hands every waiter its result.

The rule: ONE batch runs at a time, over all lanes, and a lane's waiting calls run when no batch
runs and

- ``max_items`` calls wait (a full batch), or
- every member is blocked at some lane (nothing else can arrive: waiting longer gains nothing;
  a member running a batch counts as blocked), or
- the oldest call has waited ``gather_s`` since the last batch ended (a straggler, for example a
  member prefilling a prompt, holds the others up no longer; default: the lane's mean batch
  time, so waiting costs at most about the batch a late call would otherwise run alone).

Why one batch at a time: members go round the lanes (a kNN-LM token: step, then search). With a
batch per lane at once, members that fell out of step (one prefilled later) stay in two groups,
one stepping while the other searches, each batch half full: measured on the 2-core VM with 4
naive requests (tiny model, 100k flat datastore), every forward held 1 or 3 sessions and the
threads decoded 125-167 tokens/s; one batch at a time, the groups merge at the next lane (the
first group's batch ends before the other's starts) and 119-124 of 128 forwards held all 4:
210-230 tokens/s.

Calls come from members only: a call from another thread (a request's verification worker)
would count as a blocked member and start batches early, and wait its turn among them; such a
thread uses the underlying call directly (``knnlm/speculative.py`` ``KNNMode.search``).

Batching changes no result only if ``run`` is batch-invariant (each item's result the same alone
and in any batch): the users say why theirs is (``lm/shared_runner.py``, ``knnlm/shared_search.py``).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from ralmspec.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

_EMA = 0.2  # weight of the latest batch in a lane's mean batch time


@dataclass
class _Call(Generic[T]):
    item: T
    arrived: float
    result: Any = None
    error: BaseException | None = None
    done: bool = False


class Rendezvous:
    """The decoding threads (``member()``) and their lanes (module doc)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.members = 0  # threads decoding a request now
        self.blocked = 0  # members waiting at a lane or running its batch
        self.running = False  # a batch runs (one at a time over all lanes)
        self.free_since = time.perf_counter()  # when the last batch ended

    @contextlib.contextmanager
    def member(self) -> Iterator[None]:
        """The calling thread decodes a request for the duration (its calls are waited for)."""
        with self.cond:
            self.members += 1
        try:
            yield
        finally:
            with self.cond:
                self.members -= 1
                self.cond.notify_all()  # the waiting calls may now be all there is

    def lane(self, run: Callable[[list[T]], list[R | BaseException]], max_items: int,
             gather_s: float | None = None) -> Lane[T, R]:
        return Lane(self, run, max_items, gather_s)


class Lane(Generic[T, R]):
    """One kind of call. ``run(items)`` returns one result per item (an exception instance fails
    that call alone) or raises (every call of the batch fails). Bad settings: ``ConfigError``.
    Counters: ``batches`` (by size),
    ``waited_s`` (thread-seconds from arrival to result), ``mean_s`` (batch time, EMA)."""

    def __init__(self, rv: Rendezvous, run: Callable[[list[T]], list[R | BaseException]], max_items: int,
                 gather_s: float | None = None):
        if max_items < 1:
            raise ConfigError(f"max_items must be >= 1, got {max_items}")
        if gather_s is not None and not gather_s >= 0:
            raise ConfigError(f"gather_s must be >= 0 seconds, got {gather_s!r}")
        self.rv, self.run, self.max_items, self.gather_s = rv, run, max_items, gather_s
        self._waiting: collections.deque[_Call[T]] = collections.deque()
        self.mean_s: float | None = None
        self.batches: collections.Counter[int] = collections.Counter()
        self.waited_s = 0.0

    def call(self, item: T) -> R:
        """``item``'s result, computed in one batch with the calls that meet it (module doc)."""
        rv = self.rv
        me: _Call[T] = _Call(item, time.perf_counter())
        with rv.cond:
            self._waiting.append(me)
            rv.blocked += 1
            rv.cond.notify_all()
            try:
                while not me.done:
                    batch = self._take()
                    if not batch:
                        rv.cond.wait(self._wait_left())
                        continue
                    rv.cond.release()
                    t0 = time.perf_counter()
                    try:
                        self._run(batch)
                    finally:
                        rv.cond.acquire()
                        self._finished(batch, time.perf_counter() - t0)
            finally:
                if not me.done and me in self._waiting:  # interrupted while waiting: leave the lane
                    self._waiting.remove(me)  # (a call in a running batch is counted out by _finished)
                    rv.blocked -= 1
                self.waited_s += time.perf_counter() - me.arrived
        if me.error is not None:
            raise me.error
        return me.result

    def _due(self) -> float:
        gather = self.gather_s if self.gather_s is not None else (self.mean_s or 0.0)
        return max(self.rv.free_since, self._waiting[0].arrived) + gather

    def _take(self) -> list[_Call[T]]:
        """The next batch if one should run now (module doc's rule), else [] (under ``cond``)."""
        if self.rv.running or not self._waiting:
            return []
        n = len(self._waiting)
        if n < self.max_items and self.rv.blocked < self.rv.members and time.perf_counter() < self._due():
            return []
        self.rv.running = True
        return [self._waiting.popleft() for _ in range(min(n, self.max_items))]

    def _wait_left(self) -> float | None:
        if self.rv.running or not self._waiting:
            return None  # woken by a batch's end, an arrival or a member leaving
        return max(0.0, self._due() - time.perf_counter())

    def _run(self, batch: list[_Call[T]]) -> None:
        """Run ``batch`` (outside ``cond``) and give each call its result or error."""
        try:
            results = self.run([c.item for c in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a lane's run gave {len(results)} results for {len(batch)} calls")
            for c, r in zip(batch, results):
                if isinstance(r, BaseException):
                    c.error = r
                else:
                    c.result = r
        except BaseException as exc:
            for c in batch:
                c.error = exc

    def _finished(self, batch: list[_Call[T]], took: float) -> None:
        """After a batch (under ``cond``): its calls are done and no longer blocked (counted out
        here, not when their threads wake, so no other lane counts them as still waiting)."""
        for c in batch:
            c.done = True
        self.rv.blocked -= len(batch)
        self.batches[len(batch)] += 1
        self.rv.running = False
        self.rv.free_since = time.perf_counter()
        self.mean_s = took if self.mean_s is None else (1 - _EMA) * self.mean_s + _EMA * took
        self.rv.cond.notify_all()

    def stats(self) -> dict[str, Any]:
        with self.rv.cond:
            sizes = dict(sorted(self.batches.items()))
            n = sum(sizes.values())
            calls = sum(k * v for k, v in sizes.items())
            return {"batches": n, "calls": calls, "batches_by_size": {str(k): v for k, v in sizes.items()},
                    "mean_batch_size": calls / n if n else None,
                    "mean_batch_s": self.mean_s, "waited_s": self.waited_s}


__all__ = ["Rendezvous", "Lane"]
