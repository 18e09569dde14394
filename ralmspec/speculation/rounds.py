"""The speculation core: steps, verification rounds, in-order application and rollback.

Vocabulary (docs/design.md §3). A *step* is one unit of output whose retrieval is guessed: it starts
at a position of the output, has the query that verification will search for, and the guess the
step was produced with. Steps are speculated one after another; a *round* sends the pending
(not yet submitted) steps to ONE batched verification. Rounds are applied strictly in the order
they were submitted. Applying a round is ``judge`` (a pure acceptance rule: how many steps from
the front are right, and the truth at the first wrong one; ``judge_each`` when the mode judges
each step with its own rule) followed by ``RoundBook.commit``:
the kept steps become verified; at a rejection the rejected step and every later step are
dropped (roll back by cutting the step list, nothing to restore) and every later round in flight
is cancelled (its steps are gone). So at any time the output is: verified steps, then
speculated steps, and only the verified prefix may leave the engine.

This module is pure bookkeeping: no LM, no knowledge base, no clock, no event loop. A round's
``handle`` is whatever the mode uses to run a verification (an ``asyncio.Task``, a wrapped
``concurrent.futures.Future``); the book only calls ``handle.cancel()``. The loop that drives a
book, and cuts the request's tokens where it cuts the steps, is ``speculation/driver.py``.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Sequence


class Status(Enum):
    """Where one request's speculation stands (asserted by the modes after every round)."""

    SPECULATING = "speculating"  # steps are being produced; nothing in flight or rounds in flight
    AWAITING_VERIFICATION = "awaiting verification"  # the output is complete but not all verified
    FINISHED = "finished"  # every step verified and the output is complete


@dataclass(eq=False)
class Step:
    """One guessed unit of output (identity semantics: a step is a place in one request)."""

    start: int  # position in the output where this step's work begins
    query: Any  # what verification searches for (RaLM: query text)
    guess: Any  # the speculated retrieval result the step was produced with (RaLM: doc id)
    verified: bool  # True once verification confirmed ``guess`` (or it came from a real search)
    end: int | None = None  # position where its work ends, once produced
    submitted: bool = False  # sent to a verification round
    extra: Any = None  # the mode's own per-step state (RaLM: a pending exact-guess refinement)


@dataclass(frozen=True)
class Verdict:
    """The acceptance rule's answer for one round."""

    accepted: int  # steps kept from the front of the round
    correction: Any  # the truth at the first rejected step; None when every step was kept


def judge(guesses: Sequence[Any], truths: Sequence[Any],
          same: Callable[[Any, Any], bool] = lambda g, t: g == t) -> Verdict:
    """Accept steps from the front while ``same(guess, truth)``; the first rejection ends the
    round and its truth is the correction. RaLM: guess = speculated doc id, truth = the
    knowledge base's top-1, ``same`` = equality."""
    if len(guesses) != len(truths):
        raise ValueError("one truth per speculated step is required")
    return judge_each((same(g, t), t) for g, t in zip(guesses, truths))


def judge_each(checks: Iterable[tuple[bool, Any]]) -> Verdict:
    """The same rule for a mode that judges each step itself: ``checks`` yields ``(keep,
    truth)`` for the round's steps in output order; steps are accepted from the front while
    ``keep``, and the first rejection ends the round with its ``truth`` as the correction.

    ``checks`` is consumed lazily and only up to the first rejection, so a truth that costs
    something or has effects (kNN-LM: a decision, cache inserts) is computed for the judged
    steps only. It must yield one pair per step of the round (``RoundBook.commit`` refuses a
    verdict that accepts more steps than the round holds)."""
    accepted = 0
    for keep, truth in checks:
        if not keep:
            return Verdict(accepted, truth)
        accepted += 1
    return Verdict(accepted, None)


@dataclass(eq=False)
class Round:
    """One submitted verification: its steps (in output order) and the running work."""

    steps: list[Step]  # exactly the steps sent, in output order
    handle: Any  # the running verification (anything with ``cancel()``)
    stride: int  # the stride OS^3 had chosen when the round was submitted
    submitted_at: float  # seconds (the mode's clock), for the trace
    overlap: bool = False  # verified beside decoding (asynchronous) rather than waited for


@dataclass
class RoundStats:
    """Counts of one request's speculation (the modes add their own timings)."""

    rounds: int = 0  # rounds applied
    speculated: int = 0  # steps verified in rounds (kept or not) that had produced output with their guess
    accepted: int = 0  # speculated steps kept
    rollbacks: int = 0  # rounds whose rejection cut produced output
    cancelled: int = 0  # later rounds cancelled by a rollback
    cancelled_steps: int = 0  # steps those rounds held (sent to verification, never judged)
    # steps verified in rounds before producing anything (a round's last step, its output not yet
    # started: RaLM's synchronous rounds): no output was made with their guess, so the round's
    # search was their retrieval, and a rejection there cuts nothing; not speculated
    verified_ahead: int = 0
    # accepted speculated steps per applied round -> how many rounds: the acceptance histogram
    histogram: Counter = field(default_factory=Counter)
    # steps per APPLIED round (one entry per ``rounds``; a cancelled round is in ``cancelled`` /
    # ``cancelled_steps`` instead: counted at submission, a pipeline's cancelled rounds made the
    # verification batches look more numerous than the rounds whose results were used)
    batch_sizes: list[int] = field(default_factory=list)
    strides: list[int] = field(default_factory=list)  # OS^3 stride chosen for each applied round


class RoundBook:
    """The steps and in-flight rounds of one request, and the only code that changes them.

    Invariants (checked by ``check``): steps are in output order and contiguous, and only the
    last one (the step being produced) can be unfinished (``end`` None); verified steps
    form a prefix of the list, ``n_verified`` long; every step of an in-flight round is
    submitted and unverified; rounds in flight are in submission order and cover disjoint steps.

    Cost: reading and applying touch only the unverified tail (``n_verified`` marks where it
    begins), so a mode with many small steps (kNN-LM: one per token) pays per round for the
    steps in play, not for the whole output; so do ``verified_end`` and ``verified_from`` (the
    verified output a stream is sent). ``check`` scans every step.
    """

    def __init__(self, first: Step):
        if not first.verified:
            raise ValueError("a request starts from a verified step (a real retrieval)")
        self.steps: list[Step] = [first]
        self.n_verified = 1  # length of the verified prefix of ``steps``
        self.inflight: deque[Round] = deque()
        self.stats = RoundStats()

    # -- reading -----------------------------------------------------------------------------
    @property
    def current(self) -> Step:
        """The step being produced (or just produced): the last one."""
        return self.steps[-1]

    def pending(self) -> list[Step]:
        """Produced-or-guessed steps not verified and not yet sent to a round, in order."""
        return [st for st in self.steps[self.n_verified:] if not st.submitted]

    def all_verified(self) -> bool:
        return self.n_verified == len(self.steps)

    def verified_end(self, default: int) -> int:
        """End of the verified prefix of finished steps (``default`` if there is none). Only the
        last step can be unfinished (``check``), so this reads at most two steps."""
        nv = self.n_verified
        if nv and self.steps[nv - 1].end is None:
            nv -= 1
        end = self.steps[nv - 1].end if nv else None
        return default if end is None else end

    def verified_from(self, start: int) -> list[Step]:
        """The finished verified steps that start at or after ``start``, in order (read back
        from the end of the verified prefix: linear in what it returns, not in the output)."""
        out: list[Step] = []
        i = self.n_verified - 1
        while i >= 0 and self.steps[i].start >= start:
            if self.steps[i].end is not None:
                out.append(self.steps[i])
            i -= 1
        out.reverse()
        return out

    def status(self, complete: bool) -> Status:
        if not complete:
            return Status.SPECULATING
        return Status.FINISHED if self.all_verified() and not self.inflight else Status.AWAITING_VERIFICATION

    # -- the three phases ----------------------------------------------------------------------
    def add(self, step: Step) -> None:
        """Append the next step (its start is the end of the current one)."""
        if step.verified and self.n_verified == len(self.steps):
            self.n_verified += 1
        self.steps.append(step)

    def submit(self, steps: list[Step], handle: Any, stride: int, now: float, overlap: bool = False) -> Round:
        """Record a round sent to verification (the caller started ``handle`` with exactly
        ``steps``' queries, in order)."""
        if not steps or any(st.submitted or st.verified for st in steps):
            raise ValueError("a round holds pending steps only")
        for st in steps:
            st.submitted = True
        rnd = Round(list(steps), handle, stride, now, overlap=overlap)
        self.inflight.append(rnd)
        return rnd

    def commit(self, rnd: Round, verdict: Verdict) -> Step | None:
        """Apply the verdict of the OLDEST round in flight: its first ``accepted`` steps become
        verified. On a rejection the rejected step and every later step leave the list, every
        later round in flight is cancelled, and the rejected step is returned (the mode restarts
        it with ``verdict.correction``); otherwise ``None``."""
        if not self.inflight or self.inflight[0] is not rnd:
            raise ValueError("rounds are applied strictly in submission order")
        if not 0 <= verdict.accepted <= len(rnd.steps):
            raise ValueError(f"a verdict of {verdict.accepted} accepted steps for a round of {len(rnd.steps)}")
        self.inflight.popleft()
        kept = rnd.steps[:verdict.accepted]
        for st in kept:
            st.verified = True
        steps, nv = self.steps, self.n_verified
        while nv < len(steps) and steps[nv].verified:
            nv += 1
        self.n_verified = nv
        # only a step that produced output (``end`` set) was speculated: its output was made with a
        # guess not yet verified. Only the last step can be unproduced (``check``); judged before it
        # produced anything, it is a verified step (``RoundStats.verified_ahead``), not a speculated one
        produced = sum(st.end is not None for st in rnd.steps)
        kept_produced = sum(st.end is not None for st in kept)
        s = self.stats
        s.rounds += 1
        s.batch_sizes.append(len(rnd.steps))
        s.strides.append(rnd.stride)
        s.speculated += produced
        s.accepted += kept_produced
        s.verified_ahead += int(produced < len(rnd.steps) and verdict.accepted >= produced)  # judged, not dropped
        s.histogram[kept_produced] += 1
        if verdict.accepted == len(rnd.steps):
            return None
        bad = rnd.steps[verdict.accepted]
        del steps[steps.index(bad, nv):]
        s.rollbacks += int(bad.end is not None)  # an unproduced step's rejection cuts nothing
        self.abort()
        return bad

    def abort(self) -> None:
        """Cancel every round in flight (a rollback, an error, or the end). Idempotent."""
        while self.inflight:
            rnd = self.inflight.popleft()
            rnd.handle.cancel()
            self.stats.cancelled += 1
            self.stats.cancelled_steps += len(rnd.steps)

    def check(self) -> None:
        """Assert the invariants (linear in the steps: RaLM calls it after every round, kNN-LM,
        with one step per token, once per request)."""
        seen_unverified = False
        for a, b in zip(self.steps, self.steps[1:]):
            if a.end is None:
                raise AssertionError("only the last step may be unfinished")
            if a.end != b.start:
                raise AssertionError("steps are not contiguous")
        prefix = 0
        for st in self.steps:
            if st.verified and seen_unverified:
                raise AssertionError("verified steps must form a prefix")
            seen_unverified |= not st.verified
            prefix += not seen_unverified
        if prefix != self.n_verified:
            raise AssertionError(f"n_verified is {self.n_verified}, the verified prefix {prefix} steps")
        members = [st for rnd in self.inflight for st in rnd.steps]
        if len(set(map(id, members))) != len(members):
            raise AssertionError("two rounds in flight share a step")
        if any(st.verified or not st.submitted for st in members):
            raise AssertionError("a round in flight holds a verified or unsubmitted step")


class Action(Enum):
    """What the request does next (``next_action``)."""

    STEP = "step"  # produce the next step (LM chunk + the next guess or verified retrieval)
    SUBMIT = "submit"  # send the pending steps to one batched verification
    WAIT = "wait"  # wait for the oldest round in flight and apply it
    FINISH = "finish"  # the output is complete and verified


def next_action(pending: int, inflight: int, stride: int, complete: bool, max_inflight: int,
                eager: bool) -> Action:
    """The round policy, from counts alone.

    ``pending`` steps wait for a round; ``inflight`` rounds run; ``stride`` is OS^3's choice (0:
    speculation does not pay, take verified steps); ``complete``: no more output is needed.
    Pending steps are submitted once there are ``stride`` of them, at the end, or (``eager``,
    asynchronous mode) as soon as no round is in flight, so the verifier is never idle while
    there is something to verify; a full pipeline (``max_inflight`` rounds) waits for its
    oldest round. Before a verified step (stride 0) everything in flight is settled.
    """
    if pending and (complete or pending >= stride or (eager and inflight == 0)):
        return Action.WAIT if inflight >= max_inflight else Action.SUBMIT
    if complete:
        return Action.WAIT if inflight else Action.FINISH
    if stride == 0 and inflight:
        return Action.WAIT
    return Action.STEP


def histogram_dict(h: Counter) -> dict[str, int]:
    """The acceptance histogram as JSON-friendly {"accepted steps": rounds}, sorted."""
    return {str(k): h[k] for k in sorted(h)}
