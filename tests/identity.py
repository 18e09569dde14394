"""Speculative == naive, with proof that speculation ran (issue 24).

A speculative run that never speculated (OS^3's naive fallback took every step, the server's
load governor paused it, the answer ended before a second step) is the naive loop compared with
itself: its token identity proves nothing. Every identity test therefore goes through a
``SpeculationCheck``::

    check = SpeculationCheck()
    for ...:
        check.same(spec.token_ids, naive.token_ids, spec.stats, where=(kind, i))
    check.ran(min_speculated=len(questions), min_rollbacks=1)

``same`` asserts the two outputs equal and adds the run's counters; ``ran`` asserts that at least
``min_speculated`` steps were speculated (decided from the cache, then verified) and, where the
case is built to produce them, at least ``min_rollbacks`` rollbacks. A configuration that
legitimately never speculates says so by ``ran(min_speculated=0, why=...)`` and has a sibling
case that forces speculation.

Counters are read from whichever shape the run reports them in: the engine's
``GenerationResult.stats`` dict, the server's ``ralm.stats`` JSON, or the kNN-LM's
``SpeculativeStats``. A run without a ``speculated`` counter (a naive request in a mixed batch)
is compared and counted as a naive run.

With ``RALMSPEC_COUNT_SPECULATION=1`` every check's totals are recorded under the running test's
id; ``tests/conftest.py`` prints them as a table at the end of the session.
"""

from __future__ import annotations

import asyncio
import os
import random
import weakref
from dataclasses import dataclass, fields
from typing import Any

COUNT_ENV = "RALMSPEC_COUNT_SPECULATION"


@dataclass
class SpeculationTally:
    """What the compared runs did. ``verified_steps``: steps a speculative run retrieved for real
    without speculating (OS^3's naive fallback, the governor's paused steps, the last step of a
    synchronous round: ``verified_ahead``)."""

    runs: int = 0  # outputs compared with their naive oracle
    speculative_runs: int = 0  # ... of which ran the speculative engine (they report `speculated`)
    silent_runs: int = 0  # ... of which speculated no step at all
    speculated: int = 0
    accepted: int = 0
    rollbacks: int = 0
    verified_steps: int = 0

    def add(self, other: "SpeculationTally") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def engine_trace(res: Any) -> tuple[list[int], list[tuple[int, int, int]]]:
    """What must be identical between two engine runs (``GenerationResult``): the tokens and
    which passage produced each span of them."""
    return res.token_ids, [(s.start, s.end, s.doc_id) for s in res.steps]


def forces_speculation(spec: Any) -> bool:
    """Whether a speculation config speculates after the first step whatever it measures.

    RaLM (``SpeculationConfig``): a fixed stride (OS^3 off) of at least 2, or any fixed stride
    verified beside decoding. A synchronous round of ONE step verifies the step about to run
    before it produces anything (``verified_ahead``: the naive loop), and OS^3, even without its
    naive fallback, may choose exactly that, so it forces nothing. kNN-LM (a step is a token,
    produced before its round): a fixed stride, or OS^3 without its naive fallback."""
    from ralmspec.config import SpeculationConfig

    if not getattr(spec, "enabled", True):
        return False
    if isinstance(spec, SpeculationConfig):
        return not spec.os3 and (spec.fixed_stride >= 2 or spec.async_verify)
    return not spec.os3 or not spec.naive_fallback


def _counter(stats: Any, name: str) -> int | None:
    value = stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)
    return None if value is None else int(value)


def tally_of(stats: Any) -> SpeculationTally:
    """One run's counters from an engine stats dict, a server ``ralm.stats`` object or a kNN-LM
    ``SpeculativeStats``."""
    speculated = _counter(stats, "speculated")
    if speculated is None:
        return SpeculationTally(runs=1)
    verified = sum(_counter(stats, k) or 0 for k in ("naive_steps", "paused_steps", "verified_ahead"))
    return SpeculationTally(runs=1, speculative_runs=1, silent_runs=int(speculated == 0), speculated=speculated,
                            accepted=_counter(stats, "accepted") or 0, rollbacks=_counter(stats, "rollbacks") or 0,
                            verified_steps=verified)


def naive_then_scheduled(engine: Any, requests: list[tuple[Any, Any, Any, bool]], config: Any = None
                         ) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Each request ``(question, gen, spec, speculate)`` first alone through ``engine`` with
    speculation off (its naive oracle, one at a time), then all of them at once through one
    ``Scheduler(engine, config)`` (closed afterwards). ``config`` None: every request admitted at
    once and no load governor, so no speculative request is paused. Returns (oracle results,
    scheduled results, the scheduler's stats), in request order, for ``SpeculationCheck.same``."""
    from ralmspec.engine.governor import GovernorConfig
    from ralmspec.engine.scheduler import Scheduler, SchedulerConfig

    if config is None:
        config = SchedulerConfig(max_concurrent=len(requests), max_queue=0, governor=GovernorConfig(enabled=False))

    async def go() -> tuple[list[Any], list[Any], dict[str, Any]]:
        oracle = [await engine.generate(q, gen=g, speculate=False) for q, g, _, _ in requests]
        sched = Scheduler(engine, config)
        try:
            got = await asyncio.gather(*(sched.generate(q, gen=g, spec=s, speculate=sp) for q, g, s, sp in requests))
        finally:
            await sched.aclose()
        return oracle, list(got), sched.stats()
    return asyncio.run(go())


class AnyDecisions:
    """``StrideScheduler.decide`` replaced by draws (``install``): OS^3 picks strides and overlap
    from MEASURED costs, so the identity sweeps see only the decision sequences this machine's
    timings produce, and the driver must be exact for every legal one. Each scheduler (one per
    request) draws from its own ``random.Random``, seeded in order of first use (reproducible):
    a stride from ``STRIDES`` (0 = a verified step), and overlap only where the request allows
    verifying beside decoding."""

    STRIDES = (0, 0, 1, 1, 2, 3, 5, 9)  # a verified step twice as likely as any one stride

    def __init__(self, seed: int):
        self.seed = seed
        self.rngs: Any = weakref.WeakKeyDictionary()
        self.drawn = 0

    def install(self, monkeypatch: Any) -> "AnyDecisions":
        from ralmspec.speculation.stride import StrideScheduler

        monkeypatch.setattr(StrideScheduler, "decide", lambda sched: self.decide(sched))
        return self

    def decide(self, sched: Any) -> Any:
        from ralmspec.speculation.stride import StrideDecision

        rng = self.rngs.get(sched)
        if rng is None:
            rng = self.rngs[sched] = random.Random(self.seed * 1000 + len(self.rngs))
        self.drawn += 1
        overlap = sched.async_verify and rng.random() < 0.5
        return StrideDecision(rng.choice(self.STRIDES), None, None, None, overlap)


# test id -> the totals of its checks (filled only when COUNT_ENV is set)
RECORDED: dict[str, SpeculationTally] = {}
# test id -> the reason a check gave for not requiring speculation
EXEMPT: dict[str, str] = {}


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]


class SpeculationCheck:
    """Token identity of speculative runs with their naive oracle, plus how much they speculated."""

    def __init__(self) -> None:
        self.tally = SpeculationTally()

    def same(self, speculative: Any, naive: Any, stats: Any, where: Any = None) -> None:
        """Assert ``speculative == naive`` (tokens, or any comparable trace of a run) and count
        ``stats``, the speculative run's counters."""
        assert speculative == naive, f"speculative != naive at {where!r}:\n  {speculative!r}\n  {naive!r}"
        one = tally_of(stats)
        self.tally.add(one)
        if os.environ.get(COUNT_ENV) == "1":
            RECORDED.setdefault(_current_test(), SpeculationTally()).add(one)

    def ran(self, min_speculated: int = 1, min_rollbacks: int = 0, why: str | None = None) -> SpeculationTally:
        """Assert the compared runs speculated at least ``min_speculated`` steps and rolled back at
        least ``min_rollbacks`` times; ``min_speculated=0`` needs ``why`` (the test's reason)."""
        t = self.tally
        assert t.runs > 0, "no speculative run was compared with the naive loop"
        if min_speculated == 0:
            assert why, "a check that does not require speculation must say why (and have a forcing sibling)"
            if os.environ.get(COUNT_ENV) == "1":
                EXEMPT[_current_test()] = why
        assert t.speculated >= min_speculated, (
            f"only {t.speculated} speculated steps (need >= {min_speculated}) over {t.speculative_runs} speculative "
            f"runs ({t.silent_runs} speculated nothing, {t.verified_steps} verified steps): identity was "
            "checked mostly naive against naive")
        assert t.rollbacks >= min_rollbacks, (
            f"only {t.rollbacks} rollbacks (need >= {min_rollbacks}) over {t.speculated} speculated steps: "
            "the rollback path was not exercised")
        assert t.accepted + t.rollbacks <= t.speculated, t  # each rolled-back round rejected one speculated step
        return t


def summary_lines() -> list[str]:
    """The recorded checks as a table, one row per test (``RALMSPEC_COUNT_SPECULATION=1``)."""
    if not RECORDED:
        return ["no speculative == naive check ran"]
    width = max(len(k) for k in RECORDED)
    head = f"{'test':<{width}} {'runs':>5} {'spec':>5} {'silent':>6} {'speculated':>10} {'accepted':>8} " \
           f"{'rollbacks':>9} {'verified':>8}"
    lines = [head, "-" * len(head)]
    for test, t in sorted(RECORDED.items()):
        lines.append(f"{test:<{width}} {t.runs:>5} {t.speculative_runs:>5} {t.silent_runs:>6} {t.speculated:>10} "
                     f"{t.accepted:>8} {t.rollbacks:>9} {t.verified_steps:>8}")
    for test, why in sorted(EXEMPT.items()):
        lines.append(f"a check with min_speculated=0 in {test}: {why}")
    return lines
