"""The driver and OS^3 together, with FAKE component latencies (asyncio sleeps stand in for the LM
chunk and the knowledge-base search): what these tests isolate is the scheduler, i.e. which
rounds OS^3 overlaps and how the driver pipelines them. Every guess is right, so no rollback;
token identity is the real-engine tests' business (tests/engine, tests/knnlm).

The fakes run on a VIRTUAL clock (``VirtualTimeLoop``): a sleep takes exactly its seconds of
that clock and no real time, so what OS^3 measures, and what the tests time, is the fakes'
latencies alone. On the real clock a loaded machine (CI: two test workers on 2 cores) stretched
the 3-50 ms sleeps by a few ms each, unevenly: OS^3's decisions and the wall-time ratios
asserted here then depended on the machine's load."""

from __future__ import annotations

import asyncio

from ralmspec.config import OS3Config
from ralmspec.speculation.driver import Driver, Plan, StepKind
from ralmspec.speculation.rounds import Round, Step, Verdict, judge
from ralmspec.speculation.stride import OVERLAP_REFRESH_ROUNDS, SEARCH_REFRESH_STEPS, StrideScheduler


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when nothing is ready to run: it then jumps to the
    next timer instead of waiting for it (no threads here, so nothing else can wake it)."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__()

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        if not self._ready:
            due = [h.when() for h in self._scheduled if not h.cancelled()]
            if due:
                self._now = max(self._now, min(due))
        super()._run_once()


def run_virtual(coro):
    """``asyncio.run`` on a ``VirtualTimeLoop``."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def now() -> float:
    """The running loop's (virtual) clock."""
    return asyncio.get_running_loop().time()


class FakeLatencyMode:
    """A mode whose step sleeps ``step_s`` (the LM chunk) and whose verification sleeps
    ``verify_s`` (the batched search); one token per step, every guess right."""

    max_inflight = 1
    eager = False
    redecides_each_step = True
    encodes_beside = False
    regenerates = True

    def __init__(self, steps: int, step_s: float, verify_s: float):
        self.steps, self.step_s, self.verify_s = steps, step_s, verify_s
        self.overlapped_rounds: list[bool] = []

    def complete(self, tokens, n_prompt) -> bool:
        return len(tokens) - n_prompt >= self.steps

    def may_speculate(self) -> bool:
        return True

    def steps_left(self, tokens, n_prompt) -> None:
        return None

    async def start(self, drv: Driver) -> None:
        t = now()
        await asyncio.sleep(self.verify_s)  # the first step's real retrieval
        drv.sched.observe_retrieval(now() - t)
        drv.add(Step(len(drv.tokens), "q", 0, verified=True), kind=StepKind.FIRST)

    async def advance(self, drv: Driver, plan: Plan) -> None:
        book, t = drv.book, now()
        overlapped = bool(book.inflight)
        await asyncio.sleep(self.step_s)  # the chunk
        lm_s = now() - t
        drv.sched.observe_lm(lm_s)
        drv.extend([1])
        book.current.end = len(drv.tokens)
        if self.complete(drv.tokens, drv.n0):
            return
        if plan.stride == 0:  # a verified step: retrieve for real, as a probe that guessed right
            t_r = now()
            await asyncio.sleep(self.verify_s)
            drv.sched.observe_retrieval(now() - t_r)
            drv.sched.observe_search(1, now() - t_r)
            drv.probed(True)
            drv.add(Step(len(drv.tokens), "q", 0, verified=True), kind=StepKind.FALLBACK)
            drv.sched.observe_step(lm_s)  # a speculative step's cost: the chunk (the guess is free)
            return
        drv.add(Step(len(drv.tokens), "q", 0, verified=False))
        drv.sched.observe_step(now() - t, overlapped)

    def verify(self, drv: Driver, steps: list[Step], plan: Plan):
        self.overlapped_rounds.append(plan.overlap)

        async def search():
            t = now()
            await asyncio.sleep(self.verify_s)
            drv.sched.observe_search(len(steps), now() - t, plan.overlap)
            return [0] * len(steps)

        return asyncio.ensure_future(search())

    def judge(self, drv: Driver, rnd: Round, outcome) -> Verdict:
        return judge([st.guess for st in rnd.steps], outcome)

    def correct(self, drv, bad, truth, wasted):  # every guess is right
        raise AssertionError("no rollback expected")

    def settled(self, drv, rnd, verdict, rolled_back) -> None:
        pass


def _run(mode: FakeLatencyMode, costs: dict | None = None) -> Driver:
    """Run ``mode`` to its end on the virtual clock; ``mode.wall_s``: the virtual seconds it took."""
    cfg = OS3Config(os3=True, async_verify=True, naive_fallback=True, gamma_max=0.9)

    async def go() -> list[int]:
        t = now()
        out = await drv.run([7, 7])
        mode.wall_s = now() - t
        return out

    drv = Driver(mode, cfg, clock=now)  # the realized guard times on the same clock
    drv.sched.seed_costs(costs)
    out = run_virtual(go())
    assert out == [1] * mode.steps
    return drv


def test_fake_latency_verification_bound_rounds_are_overlapped_and_pipelined():
    """Search 4x a chunk, nothing shared between them (sleeps): OS^3 overlaps, and the driver
    produces the next round while a round is verified, so the request takes far less than
    its steps plus one search per round."""
    mode = FakeLatencyMode(steps=40, step_s=0.01, verify_s=0.04)
    drv = _run(mode)
    wall = mode.wall_s
    fig = drv.figures()
    assert fig["speculated"] > 0 and fig["rollbacks"] == 0
    assert sum(mode.overlapped_rounds) >= len(mode.overlapped_rounds) - 2  # all but the first rounds
    serial = 0.04 + 40 * 0.01 + len(mode.overlapped_rounds) * 0.04  # first retrieval, steps, searches in a row
    # measured on the 2-core VM: 0.67 of serial (b3dcbff's scheduler, with its longer strides: 0.81)
    assert wall < 0.85 * serial, (wall, serial, fig["strides"])


def test_fake_latency_stale_contention_estimate_does_not_keep_a_request_synchronous():
    """The engine's cost memory says a search beside decoding takes 20x longer (a stale,
    noisy measurement); nothing actually contends here. OS^3 starts synchronous, and after
    OVERLAP_REFRESH_ROUNDS rounds without an overlapped one it forgets the estimate, overlaps,
    measures the truth, and keeps overlapping."""
    warm = _run(FakeLatencyMode(steps=12, step_s=0.01, verify_s=0.04)).sched.costs()
    warm["_b_ov_by_size"] = {1: [0.8]}  # the stale estimate: 20x the real 40 ms
    warm["_a_ov"] = [0.05]
    warm["_rounds_alone"] = 0
    mode = FakeLatencyMode(steps=120, step_s=0.01, verify_s=0.04)  # room for 8 rounds of up to 9 steps, then more
    drv = _run(mode, warm)
    rounds = mode.overlapped_rounds
    assert drv.figures()["speculated"] > 0
    assert rounds[0] is False  # the stale estimate is believed at first
    assert True in rounds, rounds
    first_overlap = rounds.index(True)
    assert first_overlap <= OVERLAP_REFRESH_ROUNDS + 1, rounds
    assert all(rounds[first_overlap:]), rounds  # measured again: overlapping pays, it stays


def test_fake_latency_stale_batch_search_outlier_does_not_pin_the_engine_to_rounds_of_one():
    """The engine's cost memory holds one outlier for a batch of 4 (400 ms where a search takes
    ~20 ms whatever its size: a first-use cost). OS^3 believes it: longer rounds lose on paper,
    rounds of one overlapped with decoding pay, so it never measures a batch again. After
    SEARCH_REFRESH_STEPS[0] rounds without a batch the batch sizes are forgotten, a longer round
    measures them and the rest of the request runs longer rounds; without the refresh it stays
    at rounds of one and takes longer."""
    warm = _run(FakeLatencyMode(steps=12, step_s=0.005, verify_s=0.02)).sched.costs()
    warm["_b_by_size"] = {1: warm["_b_by_size"][1], 4: [0.4]}
    warm["_b_ov_by_size"], warm["_a_ov"] = {}, []

    def run(costs: dict) -> tuple[float, dict]:
        mode = FakeLatencyMode(steps=120, step_s=0.005, verify_s=0.02)
        fig = _run(mode, costs).figures()
        return mode.wall_s, fig

    refreshed_s, refreshed = run(warm)
    assert refreshed["strides"][:SEARCH_REFRESH_STEPS[0] - 2] == [1] * (SEARCH_REFRESH_STEPS[0] - 2)  # believed at first
    assert max(refreshed["strides"]) > 1, refreshed["strides"]
    stale_s, stale = run(warm | {"_next_refresh": 10 ** 9})  # no refresh
    assert set(stale["strides"]) == {1}, stale["strides"]
    assert refreshed_s < 0.8 * stale_s, (refreshed_s, stale_s)


class UnpricedGuessMode(FakeLatencyMode):
    """A FAKE-latency mode whose guess costs ``unpriced_s`` more than OS^3 is told (its
    ``observe_step`` reports the chunk only): on paper speculation wins, on the clock each guessed
    step costs more than a verified one."""

    def __init__(self, steps: int, step_s: float, verify_s: float, unpriced_s: float):
        super().__init__(steps, step_s, verify_s)
        self.unpriced_s = unpriced_s

    async def advance(self, drv: Driver, plan: Plan) -> None:
        if plan.stride:
            await asyncio.sleep(self.unpriced_s)
        await super().advance(drv, plan)


def test_fake_latency_realized_guard_falls_back_when_speculation_loses_on_the_clock(monkeypatch):
    """OS^3's model says speculate (a guessed step is priced at the chunk, 3 ms, against a naive
    step of 15 ms); each guessed step really takes 53 ms. The realized guard (stride.py's module
    doc) holds speculation off for ever longer stretches of verified steps; without it (its
    observation a no-op), OS^3 speculates to the end and the request takes longer."""
    def run() -> tuple[float, dict]:
        mode = UnpricedGuessMode(steps=64, step_s=0.003, verify_s=0.012, unpriced_s=0.05)
        drv = _run(mode)
        return mode.wall_s, drv.figures()

    guarded_s, guarded = run()
    monkeypatch.setattr(StrideScheduler, "observe_realized", lambda self, seconds, verified: None)
    unguarded_s, unguarded = run()
    assert unguarded["naive_steps"] <= 2 and unguarded["speculated"] > 56
    assert guarded["speculated"] > 0 and unguarded["held_steps"] == 0
    assert 0 < guarded["held_steps"] <= guarded["naive_steps"]
    assert guarded_s < 0.75 * unguarded_s  # measured on the 2-core VM: 0.57
