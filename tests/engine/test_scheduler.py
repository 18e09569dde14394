"""The multi-request scheduler: token identity at concurrency, cross-request batching,
admission control / back-pressure, cancellation and deadlines. Real tiny LM, real indexes."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
from ralmspec.engine.core import RalmEngine
from ralmspec.engine.governor import GovernorConfig
from ralmspec.engine.scheduler import (
    SchedulerLoopError,
    BatchingLMClient, BatchingSearchClient, QueueFullError, RequestTimeoutError, Scheduler, SchedulerConfig,
)
from ralmspec.errors import ConfigError
from tests.identity import SpeculationCheck, engine_trace, forces_speculation, naive_then_scheduled

N_CONCURRENT = 16
GENS = [GenerationConfig(stride=s, query_len=16, max_new_tokens=10, passage_tokens=64) for s in (1, 2, 4)]
LONG = GenerationConfig(stride=1, query_len=16, max_new_tokens=400, passage_tokens=64)
# a fixed stride verified beside decoding: speculates whatever the timings (OS^3, even without its
# naive fallback, may choose one-step synchronous rounds: the naive loop)
FORCED = SpeculationConfig(os3=False, fixed_stride=3, async_verify=True)


@pytest.fixture(scope="module")
def questions():
    from ralmspec.data.loaders import default_questions

    return [q.question for q in default_questions()[100:100 + N_CONCURRENT]]


def _request_plan(i: int) -> tuple[GenerationConfig, SpeculationConfig, bool]:
    """Mixed workload: every 4th request naive; speculative ones vary async / prefetch / OS^3."""
    spec = SpeculationConfig(async_verify=bool(i % 2), prefetch=(1, 20, 5)[i % 3], os3=bool((i // 2) % 2),
                             fixed_stride=(2, 3)[i % 2], cache_capacity=(4, 64)[(i // 3) % 2])
    return GENS[i % 3], spec, i % 4 != 0


# the load governor (engine/governor.py): off, so every speculative path runs; "pausing": it
# pauses speculation as soon as the LM is busy at all and resumes when idle, so requests switch
# between speculative rounds and verified steps mid-answer
GOVERNORS = {"off": GovernorConfig(enabled=False),
             "pausing": GovernorConfig(window_s=0.05, pause_at=0.2, resume_at=0.1, min_active=2,
                                       kb_bottleneck_at=None)}


@pytest.mark.parametrize("kind,governor,lm", [("exact", "off", "tiny"), ("bm25", "off", "tiny"),
                                              ("exact", "pausing", "tiny"), ("exact", "off", "tiny bf16 batched")])
def test_concurrent_requests_identical_to_oracle_and_batched_across_requests(kind, governor, lm, small_indexes, tiny_lm,
                                                                             questions):
    """``tiny bf16 batched``: what ``ralmspec serve`` runs on a CPU with bfloat16 instructions
    (the requests' decode steps also share forwards there)."""
    if lm == "tiny":
        lm = tiny_lm
    else:
        from ralmspec.lm.models import load_lm

        lm = load_lm("tiny", dtype="bfloat16", runner="batched")
    engine = RalmEngine(lm, small_indexes[kind], EngineConfig())
    plans = [_request_plan(i) for i in range(len(questions))]
    if governor == "pausing":  # four long requests outlive the rest: once fewer than min_active run,
        # the pause ends and they speculate, so answers switch from verified steps to rounds
        plans = [(replace(g, max_new_tokens=40) if i % 4 == 1 else g, sp, s) for i, (g, sp, s) in enumerate(plans)]
    sessions_before = lm.cached_sessions

    config = SchedulerConfig(max_concurrent=N_CONCURRENT, max_queue=0, governor=GOVERNORS[governor])
    oracle, results, stats = naive_then_scheduled(engine, [(q, *plan) for q, plan in zip(questions, plans)], config)
    check = SpeculationCheck()
    for i, (a, b) in enumerate(zip(oracle, results)):
        check.same(engine_trace(b), engine_trace(a), b.stats, where=(kind, i, plans[i]))
        assert b.mode == ("speculative" if plans[i][2] else "naive")
    forced = sum(sp and forces_speculation(s) for _, s, sp in plans)  # fixed-stride speculative requests
    assert stats["completed"] == N_CONCURRENT and stats["active"] == 0 and stats["rejected"] == 0
    # the point of the scheduler: work of DIFFERENT requests shared backend calls
    assert stats["lm_batch_sizes"]["max"] > 1, stats["lm_batch_sizes"]
    assert stats["kb_batch_callers"]["max"] > 1, stats["kb_batch_callers"]
    assert stats["kb_mixed_k_calls"] > 0, "naive (k=1) and speculative (k=prefetch) searches never shared a call"
    if governor == "off":  # nothing pauses speculation: every fixed-stride request speculates
        check.ran(min_speculated=forced, min_rollbacks=1)
    else:
        check.ran(min_speculated=1)
        switched = [r for r in results if r.mode == "speculative" and r.stats["paused_steps"] and r.stats["speculated"]]
        assert switched, "no answer switched between paused (verified) steps and speculation"
        paused = sum(r.stats.get("paused_steps", 0) for r in results)
        rounds = sum(r.stats.get("rounds", 0) for r in results)
        assert paused > 0 and stats["governor"]["pauses"] > 0, "the governor never paused: the test proves nothing"
        assert rounds > 0, "no speculative round at all: requests never resumed speculating"
        assert stats["governor"]["kb_fixed_share"] is not None, "the KB rule's cost fit was never fed"
    assert lm.cached_sessions == sessions_before, "finished requests left KV sessions behind"
    if lm.runner.name == "batched":
        assert max(lm.runner.live_rows) > 1, "no decode forward stepped two requests"


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf", "bm25"])
def test_top_k_lists_are_prefixes_so_merging_k_is_exact(kind, small_indexes, questions):
    """merge_k relies on it: the top-k_max list cut to k equals a top-k search, for every kind."""
    r = small_indexes[kind]
    full = r.search_sync(questions, 20)
    for k in (1, 3, 7):
        assert [h[:k] for h in full] == r.search_sync(questions, k)


def test_batching_search_client_merges_callers_and_k(small_indexes, questions):
    r = small_indexes["exact"]
    calls = [(questions[0:3], 1), (questions[2:6], 5), (questions[0:1], 20), (questions[6:7], 2)]

    async def go():
        client = BatchingSearchClient(r)
        try:
            out = await asyncio.gather(*(client.search(q, k) for q, k in calls))
        finally:
            await client.aclose()
        return client, out

    client, out = asyncio.run(go())
    for (q, k), got in zip(calls, out):
        assert got == r.search_sync(q, k)
    assert client.calls == 1 and client.mixed_k_calls == 1
    assert client.batch_callers.counts() == {4: 1}
    assert client.batch_queries.counts() == {7: 1}  # duplicates searched once


def test_batching_search_client_without_merge_k_splits_by_k(small_indexes, questions):
    r = small_indexes["bm25"]

    async def go():
        client = BatchingSearchClient(r, merge_k=False)
        try:
            out = await asyncio.gather(client.search(questions[:2], 1), client.search(questions[2:4], 3),
                                       client.search(questions[4:5], 1))
        finally:
            await client.aclose()
        return client, out

    client, out = asyncio.run(go())
    assert out == [r.search_sync(questions[:2], 1), r.search_sync(questions[2:4], 3), r.search_sync(questions[4:5], 1)]
    assert client.mixed_k_calls == 0 and client.calls == 2


def test_batching_lm_client_one_call_and_isolates_a_bad_prompt(tiny_lm):
    good = [[101, 2023, 2003, 1037], [101, 7592, 2088], [101, 2054, 2003, 1996, 3007]]
    bad_prompt = [tiny_lm.vocab_size + 5]

    async def go():
        client = BatchingLMClient(tiny_lm)
        try:
            return client, await asyncio.gather(
                *(client.greedy(p, 3, f"bl-{i}") for i, p in enumerate(good)),
                client.greedy(bad_prompt, 3, "bl-bad"), client.greedy(good[0], 5, "bl-n5"),
                return_exceptions=True)
        finally:
            for s in ("bl-0", "bl-1", "bl-2", "bl-bad", "bl-n5"):
                client.release(s)
            await client.aclose()

    client, out = asyncio.run(go())
    expected = tiny_lm.greedy(good, 3) + [None, tiny_lm.greedy([good[0]], 5)[0]]
    for i in (0, 1, 2, 4):
        assert out[i] == expected[i]
    assert isinstance(out[3], ConfigError)
    # one dispatched batch, six backend calls: the four n=3 prompts together (failed), each of
    # them again alone, and the n=5 prompt
    assert client.batch_sizes.counts() == {4: 1, 1: 5} and client.calls == 6
    assert tiny_lm.cached_length("bl-0") == 0


class _CountingLM:
    """``lm`` with every ``generate`` call's number of prompts recorded."""

    def __init__(self, lm):
        self.lm, self.calls = lm, []

    def generate(self, prompts, n, sessions=None, sampling=None):
        self.calls.append(len(prompts))
        return self.lm.generate(prompts, n, sessions, sampling)

    def release(self, session):
        self.lm.release(session)


def test_lm_batch_sizes_count_the_backend_calls_not_the_dispatched_batches(tiny_lm):
    """Chunks of different lengths gathered in one batch run as one backend call per length:
    ``batch_sizes`` (``/metrics`` ``ralmspec_lm_batch_size``, "prompts per LM backend call") and
    ``calls`` count those calls. They counted the batch as one call of all its prompts: three
    requests with strides 2, 2 and 3 showed one call of 3 prompts where the LM ran one of 2 and
    one of 1, so a server whose requests used different strides looked batched when it was not."""
    lm = _CountingLM(tiny_lm)
    prompts = [[101, 2023, 2003, 1037], [101, 7592, 2088], [101, 2054, 2003, 1996, 3007]]

    async def go():
        client = BatchingLMClient(lm)
        try:
            await asyncio.gather(*(client.greedy(p, n, f"bc-{i}") for i, (p, n) in enumerate(zip(prompts, (2, 2, 3)))))
        finally:
            for i in range(3):
                client.release(f"bc-{i}")
            await client.aclose()
        return client

    client = asyncio.run(go())
    assert sorted(lm.calls) == [1, 2]
    assert client.batch_sizes.counts() == {1: 1, 2: 1} and client.calls == 2


def test_a_governor_pause_ends_when_the_server_is_no_longer_loaded(small_indexes, tiny_lm, questions):
    """Two short speculative requests paused beside a long naive one (which never asks the
    governor) all end: speculation is not shown paused on the idle server, and its paused
    seconds stop growing. It stayed paused until the next speculative request: ``/metrics``
    showed ``ralmspec_governor_paused 1`` on an idle server and counted its idle seconds in
    ``ralmspec_governor_paused_seconds_total``."""
    engine = RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())
    short = GenerationConfig(stride=2, query_len=16, max_new_tokens=8, passage_tokens=64)
    long = GenerationConfig(stride=2, query_len=16, max_new_tokens=96, passage_tokens=64)
    gov = GovernorConfig(pause_at=0.01, resume_at=0.01, kb_bottleneck_at=None)  # any LM work pauses

    async def go():
        async with Scheduler(engine, SchedulerConfig(max_concurrent=4, governor=gov)) as sched:
            await asyncio.gather(sched.generate(questions[0], gen=long, speculate=False),
                                 *(sched.generate(q, gen=short, spec=FORCED, speculate=True) for q in questions[1:3]))
            first = sched.stats()["governor"]
            await asyncio.sleep(0.3)
            return first, sched.stats()["governor"], sched.active

    first, later, active = asyncio.run(go())
    assert active == 0 and first["pauses"] >= 1, first  # the case pauses
    assert first["paused"] is False and later["paused"] is False
    assert later["paused_s"] == first["paused_s"]


def test_a_pause_holds_while_a_queued_request_takes_the_ended_ones_slot():
    """Two slots, three requests: when the first ends, the queued third takes its slot at once,
    so the LM stays loaded by two requests. The ending request ended the pause anyway (it passed
    the running count alone, 1 < min_active): with the LM 70% busy (between resume_at and
    pause_at) speculation then stayed on under a steady queue, the hysteresis broken."""
    import time
    from types import SimpleNamespace

    class KB:
        search = None

    class Engine:  # each request asks the governor, then waits for its gate
        closed, lm, retriever = False, SimpleNamespace(release=lambda session: None), KB()

        def __init__(self):
            self.gates: dict[str, asyncio.Event] = {}

        async def generate(self, prompt, **kwargs):
            gate = self.gates[prompt] = asyncio.Event()
            kwargs["may_speculate"]()
            await gate.wait()
            return prompt

    async def go():
        engine = Engine()
        gov = GovernorConfig(min_active=2, kb_bottleneck_at=None)
        sched = Scheduler(engine, SchedulerConfig(max_concurrent=2, max_queue=4, governor=gov))
        tasks = [asyncio.create_task(sched.generate(p)) for p in "ABC"]
        while len(engine.gates) < 2:
            await asyncio.sleep(0)
        g = sched.governor
        g.paused, g._since, g.pauses = True, time.perf_counter(), 1  # the LM saturated by A and B
        g.lm.fraction = lambda now: 0.7  # then busy between resume_at (0.6) and pause_at (0.85)
        assert sched.active == 2 and sched.queued == 1
        engine.gates["A"].set()
        await tasks[0]
        while "C" not in engine.gates:
            await asyncio.sleep(0)
        state = (sched.active, g.paused, g.pauses)  # C has asked the governor
        for p in "BC":
            engine.gates[p].set()
        await asyncio.gather(*tasks)
        await sched.aclose()
        return state, g.paused

    (active, paused_with_c, pauses), paused_after = asyncio.run(go())
    assert active == 2 and paused_with_c is True and pauses == 1  # never below two requests: still paused
    assert paused_after is False  # and the pause ends once the server is no longer loaded


def test_queue_full_is_immediate_back_pressure(small_indexes, tiny_lm, questions):
    engine = RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())
    gen = GENS[1]

    async def go():
        sched = Scheduler(engine, SchedulerConfig(max_concurrent=1, max_queue=1))
        try:
            t1 = asyncio.create_task(sched.generate(questions[0], gen=gen, spec=FORCED))
            t2 = asyncio.create_task(sched.generate(questions[1], gen=gen, speculate=False))
            await asyncio.sleep(0)
            assert sched.active == 1 and sched.queued == 1
            with pytest.raises(QueueFullError, match="max_queue=1"):
                await sched.generate(questions[2], gen=gen)
            r1, r2 = await t1, await t2
        finally:
            await sched.aclose()
        o1 = await engine.generate(questions[0], gen=gen, speculate=False)
        o2 = await engine.generate(questions[1], gen=gen, speculate=False)
        return sched, (r1, r2), (o1, o2)

    sched, got, want = asyncio.run(go())
    check = SpeculationCheck()
    for r, w in zip(got, want):
        check.same(r.token_ids, w.token_ids, r.stats)
    check.ran(min_speculated=1)  # the first (speculative) request; the second is naive
    assert sched.counters.rejected == 1 and sched.counters.completed == 2


async def _wait_released(lm, session, timeout=10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while lm.cached_length(session) and loop.time() < end:
        await asyncio.sleep(0.01)


def test_cancelled_request_frees_slot_and_session_at_once(small_indexes, tiny_lm, questions):
    engine = RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())

    async def go():
        sched = Scheduler(engine, SchedulerConfig(max_concurrent=1, max_queue=4))
        first = asyncio.Event()
        got: list[int] = []
        try:
            long = asyncio.create_task(sched.generate(questions[3], gen=LONG,
                                                      on_tokens=lambda t: (got.extend(t), first.set())))
            await asyncio.wait_for(first.wait(), 60)
            (session,) = sched.active_sessions
            waiting = asyncio.create_task(sched.generate(questions[4], gen=GENS[0], speculate=False))
            await asyncio.sleep(0)
            assert sched.queued == 1
            long.cancel()
            with pytest.raises(asyncio.CancelledError):
                await long
            assert session not in sched.active_sessions
            await _wait_released(tiny_lm, session)
            released = tiny_lm.cached_length(session) == 0
            after = await waiting  # the freed slot went to the queued request
        finally:
            await sched.aclose()
        oracle = await engine.generate(questions[4], gen=GENS[0], speculate=False)
        return sched, got, released, after, oracle

    sched, got, released, after, oracle = asyncio.run(go())
    assert 0 < len(got) < LONG.max_new_tokens
    assert released, "the cancelled request's KV session was not released"
    assert after.token_ids == oracle.token_ids
    assert sched.counters.cancelled == 1 and sched.active == 0 and sched.queued == 0


def test_deadline_raises_typed_timeout_and_frees_everything(small_indexes, tiny_lm, questions):
    engine = RalmEngine(tiny_lm, small_indexes["bm25"], EngineConfig())

    async def go():
        sched = Scheduler(engine, SchedulerConfig(max_concurrent=2, request_timeout_s=0.3))
        seen: list[int] = []
        try:
            task = asyncio.create_task(sched.generate(questions[5], gen=LONG, on_tokens=seen.extend))
            await asyncio.sleep(0)
            (session,) = sched.active_sessions
            with pytest.raises(RequestTimeoutError, match="deadline"):
                await task
            await _wait_released(tiny_lm, session)
            return sched, session, seen
        finally:
            await sched.aclose()

    sched, session, seen = asyncio.run(go())
    assert sched.active == 0 and sched.counters.timed_out == 1
    assert tiny_lm.cached_length(session) == 0
    assert len(seen) < LONG.max_new_tokens


@pytest.mark.parametrize("field,value", [("max_concurrent", 0), ("max_queue", -1), ("request_timeout_s", 0),
                                         ("retrieval_timeout_s", -2.0), ("max_lm_batch", True),
                                         ("batch_window_s", 5.0), ("retrieval_timeout_s", float("nan")),
                                         ("request_timeout_s", float("nan"))])
def test_scheduler_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        SchedulerConfig(**{field: value})


def test_closed_scheduler_refuses(small_indexes, tiny_lm):
    from ralmspec.engine.scheduler import SchedulerClosedError

    engine = RalmEngine(tiny_lm, small_indexes["bm25"], EngineConfig())

    async def go():
        sched = Scheduler(engine)
        await sched.aclose()
        with pytest.raises(SchedulerClosedError):
            await sched.generate("who wrote hamlet", gen=GENS[0])
        async with Scheduler(engine) as sched:  # closed on the way out
            assert (await sched.generate("who wrote hamlet", gen=GENS[0])).token_ids
        with pytest.raises(SchedulerClosedError):
            await sched.generate("who wrote hamlet", gen=GENS[0])

    asyncio.run(go())


def test_a_scheduler_belongs_to_one_event_loop_at_a_time(small_indexes, tiny_lm, questions):
    """A second thread's loop sending a request while the first loop's request runs is refused
    with a ``SchedulerLoopError`` that says what to do (it ran on: futures of one loop resolved
    from the other's thread, 'Task exception was never retrieved ... bound to a different event
    loop', and a wait for a slot failed with a RuntimeError). Once the first loop's requests
    have ended, the scheduler moves to the next loop, queueing there included: its semaphore
    was bound to the first loop."""
    import threading

    engine = RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())
    gen = GenerationConfig(stride=2, query_len=16, max_new_tokens=24, passage_tokens=64)
    sched = Scheduler(engine, SchedulerConfig(max_concurrent=1, max_queue=4))
    started, done = threading.Event(), threading.Event()
    refused: list[BaseException] = []

    async def first():
        task = asyncio.create_task(sched.generate(questions[0], gen=gen, speculate=False))
        while sched.active == 0:
            await asyncio.sleep(0.001)
        started.set()
        await asyncio.to_thread(done.wait, 60)
        return await task

    def second():
        assert started.wait(60)
        try:
            asyncio.run(sched.generate(questions[1], gen=gen, speculate=False))
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            refused.append(exc)
        done.set()

    t = threading.Thread(target=second)
    t.start()
    res = asyncio.run(first())
    t.join(60)
    assert len(refused) == 1 and isinstance(refused[0], SchedulerLoopError), refused
    assert "another event loop" in str(refused[0]) and res.token_ids

    async def queued():  # a new loop: two requests, one slot, so one waits on the slots
        return await asyncio.gather(*(sched.generate(q, gen=gen, speculate=False) for q in questions[:2]))

    again = asyncio.run(queued())
    assert again[0].token_ids == res.token_ids and sched.counters.completed == 3
