"""The speculation driver: ONE loop for every speculative mode (document-level RaLM, kNN-LM).

It owns the request's token list (prompt ids, then generated ids), the steps and rounds (a
``RoundBook``), OS^3 (a ``StrideScheduler``), rollback and the statistics. A *mode* supplies only
what differs between kinds of retrieval augmentation (``Mode``): how to produce output and guess
the next step, how to verify a round, the acceptance rule, and the verified step that replaces a
rejected one.

A round, as ``Driver.run`` reads it (gpt-fast's ``speculative_decode``: draft, verify in one
call, accept up to the first rejection; vLLM V1's schedule -> execute -> update, with the
``Plan`` / ``Verdict`` dataclasses between them):

1. schedule: ``schedule`` asks OS^3 for the stride and whether to verify beside decoding
   (``Plan``), then the pure ``next_action`` picks STEP, SUBMIT, WAIT or FINISH from the counts;
2. STEP (draft): ``mode.advance`` extends the output and adds the next step, guessed (the mode's
   guesser) or, at stride 0, retrieved for real;
3. SUBMIT (verify in one call): ``mode.verify`` starts ONE batched verification of the pending
   steps (an awaitable); a synchronous round is applied at once, an overlapped one runs beside
   the next steps;
4. WAIT (accept): ``apply`` awaits the oldest round, ``mode.judge`` gives the ``Verdict``,
   ``RoundBook.commit`` keeps the accepted prefix; at the first rejection ``rollback`` cuts the
   steps and the tokens from the rejected step on (here, and nowhere else) and continues from
   the mode's correction;
5. FINISH: the output is complete and every step verified; the tokens are returned.

Only verified tokens leave (``on_verified``, the result). Identity with the naive loop is the
modes' argument (their module docs): a kept step is exactly the naive loop's step there.

The figures (``SpeculationStats``), one definition each for every mode:
- ``rounds``: verification rounds applied; ``speculated``: steps sent to them (kept or not) that
  had produced output with their guess (tokens made before the guess was verified);
  ``accepted``: speculated steps kept; ``acceptance_rate`` = accepted / speculated;
  ``rollbacks``: rounds whose rejection cut produced output; ``cancelled``: later rounds in
  flight cancelled by a rollback, ``cancelled_steps`` the steps they held (sent to verification,
  never judged); ``verified_ahead``: steps a round judged before they produced
  anything (RaLM's synchronous round ends with the step about to run: the round's search is its
  retrieval, a rejection there cuts nothing), so neither speculated nor rolled back;
- ``verify_batch_sizes``: steps per applied round (one per ``rounds``: a cancelled round is
  in ``cancelled`` / ``cancelled_steps``, not here); ``strides``: the stride OS^3 had chosen
  for each applied round (a round holds fewer steps when the output completes first);
- ``acceptance_histogram``: accepted speculated steps per applied round -> how many rounds;
- ``wasted_tokens``: generated tokens cut by rollbacks (from the rejected step's start to the
  end of the output, the rejected step's own tokens included);
- ``verified_steps``: steps retrieved for real before their output (the first step, OS^3's
  fallback steps, governor-paused steps); ``naive_steps``: OS^3's fallback steps among them;
  ``held_steps``: those taken while OS^3's realized guard held speculation off (stride.py);
  ``paused_steps``: the governor's; ``probes`` / ``probe_hits``: fallback steps that also asked
  the cache, and how many of those guesses were right;
- ``verify_wait_s``: seconds the loop waited for verifications.
A step is a RaLM chunk (one retrieval) or a kNN-LM token (one k-NN search).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Awaitable, Callable, Protocol, Sequence

from ralmspec.config import OS3Config
from ralmspec.speculation.rounds import (Action, Round, RoundBook, Status, Step, Verdict, histogram_dict,
                                         next_action)
from ralmspec.speculation.stride import StrideScheduler


@dataclass(frozen=True)
class Plan:
    """The schedule of the next action: OS^3's stride (0: take a verified step), whether a
    round submitted now is verified beside decoding, and whether speculation is paused."""

    stride: int
    overlap: bool = False
    paused: bool = False  # the server's load governor paused speculation (stride 0)


class StepKind(Enum):
    """Why a step was added (``Driver.add``), for the figures."""

    GUESSED = "guessed"  # speculated: verified later in a round
    FIRST = "first"  # the request's first step: a real retrieval
    FALLBACK = "fallback"  # OS^3's naive fallback (stride 0): a real retrieval
    PAUSED = "paused"  # the server's governor paused speculation: a real retrieval


@dataclass
class SpeculationStats:
    """The driver's own counters (module doc); the round counters live in ``RoundBook.stats``."""

    steps: Counter = field(default_factory=Counter)  # StepKind -> steps added

    @property
    def verified_steps(self) -> int:
        """Steps retrieved for real before their output: first, fallback and paused steps."""
        return sum(n for kind, n in self.steps.items() if kind is not StepKind.GUESSED)

    probes: int = 0
    probe_hits: int = 0
    held_steps: int = 0
    wasted_tokens: int = 0
    verify_wait_s: float = 0.0


class Mode(Protocol):
    """What a kind of retrieval augmentation supplies to the driver.

    Attributes: ``max_inflight`` rounds may run at once; ``eager``: an overlapped round leaves as
    soon as no verification runs (``next_action``); ``redecides_each_step``: OS^3 is asked before
    every step (RaLM: a chunk's cost updates its estimates) rather than once per round (kNN-LM,
    whose steps are tokens); ``encodes_beside`` / ``regenerates``: OS^3's cost model
    (``StrideScheduler``)."""

    max_inflight: int
    eager: bool
    redecides_each_step: bool
    encodes_beside: bool
    regenerates: bool

    async def start(self, drv: Driver) -> None:
        """Add the first step (``StepKind.FIRST``, a real retrieval) and its tokens, if any."""

    async def advance(self, drv: Driver, plan: Plan) -> None:
        """STEP: extend the output and add the next step (guessed, or at stride 0 verified)."""

    def verify(self, drv: Driver, steps: list[Step], plan: Plan) -> Awaitable[Any]:
        """SUBMIT: start ONE batched verification of ``steps``; its result is the outcome."""

    def judge(self, drv: Driver, rnd: Round, outcome: Any) -> Verdict:
        """The acceptance rule for an applied round's outcome."""

    def correct(self, drv: Driver, bad: Step, truth: Any, wasted: int) -> tuple[Step, list[int]]:
        """The verified step (and its tokens) that replaces the rejected step ``bad``."""

    def settled(self, drv: Driver, rnd: Round, verdict: Verdict, rolled_back: bool) -> None:
        """After a round is applied (and any rollback done)."""

    def complete(self, tokens: Sequence[int], n_prompt: int) -> bool:
        """No more output is needed (length, stop token)."""

    def may_speculate(self) -> bool:
        """False pauses speculation (a loaded server's governor)."""

    def steps_left(self, tokens: Sequence[int], n_prompt: int) -> int | None:
        """Steps still allowed (a round's stride is clipped to it), or None: no clip."""


class Driver:
    """One request's speculation loop over a ``Mode`` (module doc). Use once."""

    def __init__(self, mode: Mode, os3: OS3Config,
                 on_verified: Callable[[list[int], list[Step]], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.mode, self.on_verified, self.clock = mode, on_verified, clock
        self.sched = StrideScheduler.of(os3, encodes_beside=mode.encodes_beside, regenerates=mode.regenerates)
        self.stats = SpeculationStats()
        self.tokens: list[int] = []  # prompt ids, then generated ids: verified, then speculated
        self.n0 = 0  # prompt length
        self.emitted = 0  # generated tokens already passed to on_verified
        self.book: RoundBook | None = None
        self.plan = Plan(0)
        # (clock, verified steps) where the current stretch of speculation was last judged: the
        # realized seconds OS^3's guard compares with a naive step (``StrideScheduler``)
        self.since: tuple[float, int] | None = None

    # ------------------------------------------------------------------ the loop
    async def run(self, prompt_ids: Sequence[int]) -> list[int]:
        """Decode after ``prompt_ids``; returns the generated tokens, all verified."""
        self.tokens, self.n0 = list(prompt_ids), len(prompt_ids)
        mode = self.mode
        try:
            await mode.start(self)
            book = self.book
            while True:
                while book.inflight and book.inflight[0].handle.done():
                    await self.apply()
                complete = mode.complete(self.tokens, self.n0)
                pending = book.pending()
                plan = self.schedule(len(pending), complete)
                action = next_action(len(pending), len(book.inflight), plan.stride, complete,
                                     mode.max_inflight, mode.eager and plan.overlap)
                if action is Action.SUBMIT:
                    self.submit(pending, plan)
                    if not plan.overlap:  # synchronous round: apply it now, and any overlapped
                        while book.inflight:  # round still ahead of it (OS^3 switched), so no step
                            await self.apply()  # runs beside a round priced as uncontended
                elif action is Action.WAIT:
                    await self.apply()
                elif action is Action.FINISH:
                    break
                else:
                    await self.step(plan)
        finally:
            if self.book is not None:
                self.book.abort()
        book.check()
        if book.status(complete=True) is not Status.FINISHED:  # cannot happen: FINISH needs it
            raise AssertionError("the request finished with unverified output")
        self.emit_verified()
        return self.tokens[self.n0:]

    def schedule(self, n_pending: int, complete: bool) -> Plan:
        """OS^3's plan for the next action: asked before every step, or (``redecides_each_step``
        off) once per round, when nothing is pending; the governor may pause speculation."""
        if not self.mode.redecides_each_step and (n_pending or complete):
            return self.plan
        if not self.mode.may_speculate():  # paused: no decision to price (a naive step's cost)
            self.plan = Plan(0, overlap=False, paused=True)
            return self.plan
        decision = self.sched.decide()
        stride = decision.stride
        left = self.mode.steps_left(self.tokens, self.n0)
        if stride and left is not None:
            stride = max(1, min(stride, left))
        self.plan = Plan(stride, decision.overlap)
        return self.plan

    # ------------------------------------------------------------------ the phases
    async def step(self, plan: Plan) -> None:
        """STEP: the mode's ``advance``, timed for OS^3's realized guard: a fallback step end to
        end is the naive step as realized; a guessed step opens a stretch of speculation."""
        t = self.clock()
        if not plan.stride:
            self.since = None
        elif self.since is None:
            self.since = (t, self.book.n_verified)
        fallbacks = self.stats.steps[StepKind.FALLBACK]
        await self.mode.advance(self, plan)
        # a fallback step was taken: not the output's last chunk (it retrieves nothing) nor a
        # guessed step while rounds were still in flight (the stride was 0 all the same)
        if self.stats.steps[StepKind.FALLBACK] > fallbacks:
            self.stats.held_steps += self.sched.holding()
            self.sched.observe_verified_step(self.clock() - t)
        self.emit_verified()

    def add(self, step: Step, tokens: Sequence[int] = (), kind: StepKind = StepKind.GUESSED) -> None:
        """Append the next step and the tokens it produced so far (more via ``extend``)."""
        if (kind is StepKind.GUESSED) == step.verified:
            raise ValueError(f"a {kind.value} step must be {'un' if kind is StepKind.GUESSED else ''}verified")
        self.stats.steps[kind] += 1
        if self.book is None:
            self.book = RoundBook(step)
        else:
            self.book.add(step)
        self.tokens += tokens

    def extend(self, tokens: Sequence[int]) -> None:
        """Append output of the current (last) step."""
        self.tokens += tokens

    def probed(self, hit: bool) -> None:
        """A fallback step also asked the cache; ``hit``: its guess was the truth (OS^3's
        acceptance sample, ``observe_probe``)."""
        self.stats.probes += 1
        self.stats.probe_hits += int(hit)
        self.sched.observe_probe(hit)

    def submit(self, steps: list[Step], plan: Plan) -> Round:
        handle = self.mode.verify(self, steps, plan)
        return self.book.submit(steps, handle, plan.stride, self.clock(), plan.overlap)

    async def apply(self) -> None:
        """Wait for the oldest round and apply it: the mode's verdict, the accepted prefix kept,
        a rollback at the first rejection."""
        book = self.book
        rnd = book.inflight[0]
        t = time.perf_counter()
        try:
            outcome = await rnd.handle
        finally:
            self.stats.verify_wait_s += time.perf_counter() - t
        if not book.inflight or book.inflight[0] is not rnd:  # cancelled meanwhile (cannot happen today)
            return
        verdict = self.mode.judge(self, rnd, outcome)
        self.sched.observe_round(len(rnd.steps), verdict.accepted, rnd.overlap)
        bad = book.commit(rnd, verdict)
        if bad is not None:
            self.rollback(bad, verdict.correction)
        self.mode.settled(self, rnd, verdict, bad is not None)
        if self.since is not None:  # the stretch of speculation so far, as realized
            now, verified = self.clock(), self.book.n_verified
            if verified > self.since[1]:
                self.sched.observe_realized(now - self.since[0], verified - self.since[1])
                self.since = (now, verified)
        self.emit_verified()

    def rollback(self, bad: Step, truth: Any) -> None:
        """The one rollback: ``RoundBook.commit`` cut the steps from ``bad`` on; cut the tokens
        there too and continue from the mode's verified correction."""
        wasted = len(self.tokens) - bad.start
        del self.tokens[bad.start:]
        self.stats.wasted_tokens += wasted
        step, tokens = self.mode.correct(self, bad, truth, wasted)
        self.book.add(step)
        self.tokens += tokens
        self.book.check()

    # ------------------------------------------------------------------ output
    def emit_verified(self) -> None:
        """Pass the newly verified tokens (and only those) to ``on_verified``, with the steps
        that produced them (whole steps: the verified prefix ends at a step's end)."""
        if self.on_verified is None:
            return
        upto = self.book.verified_end(self.n0)
        if upto - self.n0 > self.emitted:
            start = self.n0 + self.emitted
            self.on_verified(self.tokens[start: upto], self.book.verified_from(start))
            self.emitted = upto - self.n0

    def figures(self) -> dict[str, Any]:
        """The speculation figures of this request, one vocabulary for every mode (module doc)."""
        rs, s = self.book.stats, self.stats
        return {"rounds": rs.rounds, "speculated": rs.speculated, "accepted": rs.accepted,
                "rollbacks": rs.rollbacks, "cancelled": rs.cancelled, "cancelled_steps": rs.cancelled_steps,
                "verified_ahead": rs.verified_ahead,
                "acceptance_rate": rs.accepted / rs.speculated if rs.speculated else None,
                "verify_batch_sizes": list(rs.batch_sizes), "strides": list(rs.strides),
                "acceptance_histogram": histogram_dict(rs.histogram),
                "verified_steps": s.verified_steps, "naive_steps": s.steps[StepKind.FALLBACK],
                "paused_steps": s.steps[StepKind.PAUSED], "held_steps": s.held_steps,
                "probes": s.probes, "probe_hits": s.probe_hits, "wasted_tokens": s.wasted_tokens,
                "verify_wait_s": s.verify_wait_s}

