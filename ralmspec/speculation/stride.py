"""OS^3: the optimal speculation stride scheduler (docs/design.md §4). Pure policy, no I/O.

Symbols: ``a`` = seconds of one speculative step (guess + LM chunk, on the critical path),
``b(s)`` = seconds of one batched knowledge-base search of ``s`` encoded queries, ``e`` = seconds
of one query encoding that the verification worker runs BESIDE a step's chunk (0 for a guesser
that encodes on the critical path, where it is part of ``a``), ``γ`` = probability that one
speculated passage is right. Per round of stride ``s`` the expected number of verified chunks is
``(1-γ^s)/(1-γ)``. The round's steps are produced in ``p = s·max(a, e)`` (the worker encodes
each step's query while the LM produces the chunk: the later of the two pipelines ends the
round); the round costs ``p + b`` synchronously and ``γ^s·max(p, b) + (1-γ^s)·(p + b)`` with
asynchronous verification: the driver keeps producing the next round's ``s`` steps while a
round is searched (``rounds.next_action`` waits only when the next round is full), so a round
that is kept costs whichever is longer; a rejection discards the steps produced beside it, and
that round costs ``p + b``. The scheduler picks the ``s`` in ``[1, s_max]`` that maximises
verified chunks per second (every stride is evaluated, ties go to the smaller).

Falling back (docs/design.md §4: never slower than the naive loop): speculation is worth it only if its
expected seconds per verified step beat a naive step, ``lm + r`` (LM chunk + one real
retrieval). For RaLM a mismatched step's chunk must be generated again with the true passage,
so with probability ``1-γ^s`` a round costs one more step ``a`` (``seconds_per_step(...,
regen=True)``); kNN-LM's correction is decided from the verification itself, nothing is
regenerated (``regenerates=False``). One rule for both modes. When even the best stride loses,
``decide`` returns stride 0: the engine then takes verified steps (retrieve, then generate),
still probing the cache to keep ``γ`` current. That comparison takes the best stride (chosen
with ``γ`` capped at ``gamma_max``) at the ``γ`` MEASURED: the cap hedges how long a stride may
be, not whether speculating pays. Judged at the cap, a guesser that is always right (the
``oracle`` bound: γ = 1, capped to 0.9) is priced as if a round in ten lost a step, ~10% too
high at stride 3: enough to tip the comparison where the costs are close (tiny, EMULATED 1M,
one thread, 2026-12-05: the oracle took naive steps where its rounds cost half as much).
With the fallback on, the scheduler also returns 0 until ``a``, ``b`` and ``γ`` are known
(those verified steps measure them), instead of speculating blind at stride 1. On an engine
that already served requests they are known from the start: the costs are carried over
(``seed_costs``), and so is the acceptance the previous request ended with, as a PRIOR: alone
until this request's first round is judged (so a request does not spend its first steps, one
full knowledge-base round trip each, re-measuring what the engine already knows), then as
``PRIOR_ROUNDS`` pseudo-rounds beside the request's own (so one early probe that hit does not
read as γ = 1: ``last`` then ran rounds of 9 that failed, 2026-12-05). The γ a request ends with,
prior included, is the next one's prior: the engine's acceptance, remembered across requests.

Decoupled costs (docs/design.md §4): ``a`` = LM chunk + guess, as measured on the critical path (the
``exact`` guess encodes the query there; the others do not). Every other guesser on a dense
knowledge base has the worker encode the step's query beside the chunk (``encodes_beside``), on
its own thread, while the searches run on the knowledge base's thread: three pipelines, so the
encodings cost ``e`` per step in ``max(a, e)``, not inside ``b``. Every encoding is counted
exactly once. (Until 2026-12-05 ``b(s) = s·e + search(s)`` put the encodings in series with the
search: for the ``oracle`` bound on 2 CPU cores, EMULATED 1M, it priced a kept round of 4 at
276 ms where 170 ms were measured, and OS^3 ran strides of 1-2 and naive steps at 1.1-1.4x
where a fixed stride of 4 gave 2.0x.) ``e`` is the median of the encodings measured beside the
LM (contended), a fallback step's probe encoding until one was.

Contention (asynchronous mode): a step that runs while a verification is in flight, and a
verification that runs beside decoding, are slower than alone when both compete for the same
cores and memory bandwidth (2-core machine, measured 2026-11-28: a 1M-vector scan 112 -> 188 ms,
an LM chunk 7.4 -> 9.9 ms). So ``a`` is kept twice (alone, overlapped), and a search beside
decoding is predicted as the alone line times a contention factor ``κ`` (the median ratio of
the searches measured beside decoding to the alone line at their sizes), so one search measured
at one batch size says how much slower every size is. Each round, OS^3 compares the best
synchronous round (alone costs) with the best asynchronous one (overlapped costs; the alone ones
until contention was measured) and picks the faster (``StrideDecision.overlap``).
The overlapped costs are only measured by overlapped rounds, so a noisy one could keep OS^3
synchronous for good; after ``OVERLAP_REFRESH_ROUNDS`` rounds in a row without an overlapped
one they are forgotten, and the next decision predicts an overlapped round with the alone costs
(it then wins: with equal costs overlapping is never slower), which measures them again.

Stale batch sizes: ``search(s)`` for ``s > 1`` is measured only by rounds of that size, so while
OS^3 falls back (a fallback step searches one query) or runs rounds of one, nothing refreshes it.
One bad sample (a first-use outlier: a fresh flat datastore's first batched search took 68-98 ms
instead of ~10 ms, 2026-12-06; on a GPU, a kernel's first call at a new shape) then predicts that
longer rounds lose, for the rest of the request and, with the costs carried over, for every later
request of the engine. So after ``SEARCH_REFRESH_STEPS[0]`` fallback steps and rounds in a row
without a search of more than one query, those searches are forgotten (one query's, refreshed by
every fallback step, stay): the line is flat at ``search(1)``, optimism until measured, and if γ
says longer rounds pay, the next decision runs one and measures its size again. If that
measurement confirms the forgotten cost (not under half of it), batches really are that dear
here: each refresh costs one losing round, so the interval doubles (up to
``SEARCH_REFRESH_STEPS[1]``: at most one such round per 256 steps once it has doubled four
times); if it was an outlier, the interval goes back to the first value. (Forgetting only the
sizes dearer than their queries one by one would cost nothing where costs are sane, but misses
outliers under that bound: session 19's 89 ms for 7 queries is one where one query takes over
12.7 ms, as the naive search of that 100k-entry datastore does on 2 threads, 14.2 ms.) The count
runs across requests with the carried costs; it forgot nothing in the tiny ``bench`` runs
(embedded and EMULATED 1M, the engine's costs carried through each run's questions), in
kNN-LM's bench or in a tiny server: there rounds of several queries come well within 16 steps.

The realized guard (docs/design.md §4): the cost model can be wrong by a few percent (an
encoder that partly overlaps the chunks, overheads it does not price), and where speculating
and a naive step are predicted close, that is enough to keep OS^3 in rounds that lose (``last``
on 2 CPU cores, 2026-12-05: 0.85-0.95x of the naive loop). So the fallback also looks at what
HAPPENED, whatever the model says: the driver reports the wall seconds of speculation between
two judged rounds and the steps verified meanwhile (``observe_realized``), and each fallback
step's wall seconds, end to end (``observe_verified_step``: the naive step as realized). The
guard judges the latest intervals that cover the time of ``GUARD_STEPS`` naive steps (two
intervals at least): if they verified fewer steps than naive steps would have in that time,
speculation is losing. A window of time, not of steps: a guesser whose long rounds fail verifies
one step per round, so a window of 8 verified steps let ``last`` waste 6 rounds of 8 chunks at
``--gamma-max 0.98`` (0.79x), and one of 4 steps judged ``exact`` (1.3x) on a single rollback.
When it is losing ``decide`` returns 0 for the next ``hold`` fallback steps (probing as ever),
and the intervals are forgotten so that speculation, tried again after the hold, is judged
afresh. The guard only moves the fallback, so without ``naive_fallback`` it is off. The hold doubles each time the guard trips again
(``GUARD_HOLD``: from its first to its last value; a judgement that speculation wins resets it),
so a guesser that keeps losing spends ever fewer steps trying, and one that wins after a noisy
stretch loses only a few steps. The hold left and the next hold's length travel to the engine's
next request with the costs (this guesser lost on this machine: a request of 16 steps would
otherwise spend its first rounds finding that out again); the intervals do not.

Estimates: every latency is the median of its last ``SAMPLES`` measurements (one noisy LM chunk
or search does not swing the stride): ``a``, the LM chunk, the naive retrieval ``r``, ``e`` (one
query encoding) and, per batch size, ``search``; ``search(s)`` = a least-squares line through
the per-size medians (constant when only one size was seen; once two batch sizes were seen, fitted
on the batches, one query being its own point), flat beyond the largest size measured
(``_line``: optimism until measured); ``γ`` = Σ matched / (Σ matched +
rounds with a mismatch) over the last ``window`` rounds (a fallback step's probe is a round of
one, counted for rounds beside decoding too: ``observe_probe``), with the seeded prior's
pseudo-rounds, capped at ``gamma_max``.
"""

from __future__ import annotations

import copy
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from ralmspec.config import OS3Config

SAMPLES = 5  # latencies: the median of the last SAMPLES measurements
GUARD_STEPS = 8  # the realized guard judges the latest speculation covering this many naive steps' time
GUARD_HOLD = (4, 64)  # fallback steps after the guard trips: the first hold, doubling up to the last
PRIOR_ROUNDS = 2.0  # the seeded acceptance weighs as this many rounds beside the request's own
OVERLAP_REFRESH_ROUNDS = 8  # forget the overlapped costs after this many rounds without one
SEARCH_REFRESH_STEPS = (16, 256)  # steps and rounds without a batch search before batch sizes are forgotten: first, last


def expected_verified_chunks(gamma: float, s: int) -> float:
    """E[chunks kept per round] = Σ_{i<s} γ^i = (1-γ^s)/(1-γ)."""
    if gamma >= 1.0:
        return float(s)
    return (1.0 - gamma**s) / (1.0 - gamma)


def round_time(a: float, b: float, gamma: float, s: int, async_verify: bool, e: float = 0.0) -> float:
    """Expected seconds of one round of stride ``s``: ``max(s·a, s·e) + b`` synchronously (``e``:
    seconds per step of the query encodings the worker runs beside the chunks, ``b`` the search);
    asynchronously a kept round runs beside the next round's steps (``max(s·a, s·e, b)``: the LM,
    the worker and the knowledge base in a pipeline) and a rejected one does not."""
    produced = s * max(a, e)  # the round's chunks, and its queries encoded beside them
    if not async_verify:
        return produced + b
    g = gamma**s
    return g * max(produced, b) + (1.0 - g) * (produced + b)


def median(xs: list[float]) -> float | None:
    """The median of ``xs`` (None when empty)."""
    return statistics.median(xs) if xs else None


def push(samples: list[float], x: float) -> None:
    """Append ``x``, keeping the last ``SAMPLES``."""
    samples.append(float(x))
    if len(samples) > SAMPLES:
        samples.pop(0)


def seconds_per_step(a: float, b: float, gamma: float, s: int, async_verify: bool,
                     regen: bool = True, e: float = 0.0) -> float:
    """Expected seconds per verified step of a round of stride ``s`` (``round_time``); ``regen``:
    a mismatch costs one more step ``a`` (the corrected step's chunk is generated again)."""
    t = round_time(a, b, gamma, s, async_verify, e)
    if regen:
        t += (1.0 - gamma**s) * a
    return t / expected_verified_chunks(gamma, s)


def best_stride(a: float, b_of_s, gamma: float, async_verify: bool, s_max: int, e: float = 0.0) -> int:
    """The stride in ``[1, s_max]`` with the most verified chunks per second (ties: the smaller);
    ``b_of_s(s)`` gives b. Every stride is evaluated: with a measured search line the objective
    need not be unimodal (a 1-query search takes its own path, so stride 2 can look worse than
    both 1 and 4; a hill climb from 1 stopped there, 2026-12-05)."""
    def objective(s: int) -> float:
        t = round_time(a, b_of_s(s), gamma, s, async_verify, e)
        return expected_verified_chunks(gamma, s) / t if t > 0 else float("inf")

    return max(range(1, max(1, s_max) + 1), key=lambda s: (objective(s), -s))


@dataclass
class StrideDecision:
    stride: int
    a: float | None
    b: float | None
    gamma: float | None
    # asynchronous mode: verify this round beside decoding (True) or wait for it (False), the
    # one OS^3 predicts faster with the costs measured under contention (module doc)
    overlap: bool = False


class StrideScheduler:
    """Chooses the speculation stride for the next round.

    ``os3=False`` returns ``fixed_stride`` always (the paper's ablation). With OS^3 on, the
    stride is 1 until one step latency, one verification latency and one round are observed;
    with ``naive_fallback`` it is 0 ("take a verified step") while the best stride is predicted
    to be slower than a naive step (needs ``observe_lm`` and ``observe_retrieval`` too).
    """

    def __init__(self, os3: bool = True, fixed_stride: int = 3, async_verify: bool = False,
                 s_max: int = 16, window: int = 5, gamma_max: float = 0.9, naive_fallback: bool = False,
                 encodes_beside: bool = False, regenerates: bool = True):
        self.os3 = os3
        self.regenerates = regenerates  # a rejected step's output is generated again (RaLM's chunk)
        self.encodes_beside = encodes_beside  # the worker encodes each step's query beside its chunk (module doc)
        self.naive_fallback = naive_fallback
        self.fixed_stride = fixed_stride
        self.async_verify = async_verify
        self.s_max = s_max
        self.gamma_max = gamma_max
        # latency samples (seconds), the last SAMPLES of each; estimates are their medians
        self._a: list[float] = []  # a speculative step alone (LM chunk + guess)
        self._a_ov: list[float] = []  # a step while a verification ran beside it
        self._lm: list[float] = []  # an LM chunk
        self._r: list[float] = []  # a naive retrieval (encoding + search of one query)
        self._encode: list[float] = []  # one query encoding on the worker, beside the LM
        self._encode_alone: list[float] = []  # one on the critical path (a fallback step's probe)
        self._b_by_size: dict[int, list[float]] = {}  # searches alone, by batch size
        self._b_ov_by_size: dict[int, list[float]] = {}  # searches that ran beside decoding
        self._rounds_alone = 0  # rounds in a row without an overlapped one (OVERLAP_REFRESH_ROUNDS)
        self._rounds: deque[tuple[int, bool]] = deque(maxlen=window)  # (matched, had_mismatch)
        # rounds verified beside decoding: their steps were guessed from a cache that had not
        # received the previous round's prefetch yet, so their acceptance is estimated apart
        self._rounds_ov: deque[tuple[int, bool]] = deque(maxlen=window)
        self._gamma_prior: float | None = None  # the engine's earlier requests' γ (seed_costs)
        # the realized guard (module doc): (wall seconds, steps verified) of speculation between
        # judged rounds, the fallback steps' wall seconds, the steps left to hold, the next hold
        self._realized: deque[tuple[float, int]] = deque(maxlen=64)
        self._verified_wall: list[float] = []
        self._hold = 0
        self._next_hold = GUARD_HOLD[0]
        # stale batch sizes (module doc): fallback steps and rounds since the last search of more
        # than one query, the refresh interval, and the medians forgotten at the last refresh
        self._since_batch = 0
        self._next_refresh = SEARCH_REFRESH_STEPS[0]
        self._forgotten: dict[int, float] | None = None

    @classmethod
    def of(cls, cfg: OS3Config, encodes_beside: bool = False, regenerates: bool = True) -> StrideScheduler:
        """The scheduler for a mode's ``OS3Config`` (``encodes_beside`` / ``regenerates``: the
        mode's cost model, above)."""
        return cls(os3=cfg.os3, fixed_stride=cfg.fixed_stride, async_verify=cfg.async_verify, s_max=cfg.s_max,
                   window=cfg.window, gamma_max=cfg.gamma_max, naive_fallback=cfg.naive_fallback,
                   encodes_beside=encodes_beside, regenerates=regenerates)

    # ------------------------------------------------------------------ measurements
    def observe_step(self, seconds: float, overlapped: bool = False) -> None:
        """One speculative step (LM chunk + guess); ``overlapped``: a verification ran meanwhile."""
        push(self._a_ov if overlapped else self._a, seconds)

    def observe_lm(self, seconds: float) -> None:
        """One LM chunk alone (the naive step's LM part)."""
        push(self._lm, seconds)

    def observe_retrieval(self, seconds: float) -> None:
        """One real single-query retrieval (query encoding + search): the naive step's ``r``."""
        push(self._r, seconds)

    def observe_search(self, batch_size: int, seconds: float, overlapped: bool = False) -> None:
        """One knowledge-base search of ``batch_size`` already-encoded queries (``overlapped``:
        while the LM decoded)."""
        push((self._b_ov_by_size if overlapped else self._b_by_size).setdefault(batch_size, []), seconds)
        if batch_size > 1:
            self._since_batch = 0
            if self._forgotten is not None:  # the first batch since a refresh: was the old cost an outlier?
                forgotten = _line(self._forgotten)
                if forgotten is not None and seconds < 0.5 * forgotten(batch_size):
                    self._next_refresh = SEARCH_REFRESH_STEPS[0]
                self._forgotten = None

    observe_verification = observe_search  # modes whose verification encodes nothing (kNN-LM)

    def observe_encode(self, seconds: float, beside: bool = False) -> None:
        """One query encoding: on the worker beside the LM (``beside``), or on the critical path."""
        push(self._encode if beside else self._encode_alone, seconds)

    def observe_realized(self, seconds: float, verified: int) -> None:
        """Speculation took ``seconds`` (wall) between two judged rounds and ``verified`` steps were
        verified meanwhile; the guard judges the last such intervals (module doc)."""
        if not self.naive_fallback or verified < 1 or seconds < 0.0:
            return
        realized = self._realized
        realized.append((float(seconds), int(verified)))
        naive = self.naive_reference()
        if naive is None:
            return
        span = GUARD_STEPS * naive  # the window: this many naive steps' time
        seconds_in = sum(sec for sec, _ in realized)
        while len(realized) > 2 and seconds_in - realized[0][0] >= span:
            seconds_in -= realized.popleft()[0]
        if len(realized) < 2 or seconds_in < span:
            return
        if sum(n for _, n in realized) * naive <= seconds_in:  # losing: hold, then judge afresh
            self._hold = self._next_hold
            self._next_hold = min(GUARD_HOLD[1], 2 * self._next_hold)
            realized.clear()
        else:  # winning
            self._next_hold = GUARD_HOLD[0]

    def observe_verified_step(self, seconds: float) -> None:
        """One fallback step, end to end (real retrieval, cache probe, LM chunk): the naive step
        as realized; it also counts down the guard's hold."""
        push(self._verified_wall, seconds)
        self._hold = max(0, self._hold - 1)
        self._count_without_batch()

    def _count_without_batch(self) -> None:
        """A fallback step or a round: after ``_next_refresh`` of them in a row without a search
        of more than one query, forget those searches (module doc "Stale batch sizes")."""
        self._since_batch += 1
        if self._since_batch < self._next_refresh or 1 not in self._b_by_size:
            return
        stale = {k: median(v) for k, v in self._b_by_size.items() if k > 1}
        if not stale:
            return
        self._b_by_size = {1: self._b_by_size[1]}
        self._b_ov_by_size = {k: v for k, v in self._b_ov_by_size.items() if k == 1}
        self._forgotten = stale
        self._since_batch = 0
        self._next_refresh = min(SEARCH_REFRESH_STEPS[1], 2 * self._next_refresh)

    def holding(self) -> bool:
        """The realized guard holds speculation off (module doc)."""
        return self._hold > 0

    def observe_probe(self, hit: bool) -> None:
        """A fallback step's probe: whether the guesser's own guess was the true passage. One
        sample of acceptance for synchronous AND overlapped rounds: it is the freshest one either
        has while no round runs, so γ beside decoding does not stay at a stale stretch's value
        (``last``, 2 CPU cores, 2026-12-05: 0.67 beside decoding after a hold whose probes
        measured 0.20, so OS^3 resumed rounds that lost)."""
        self._count_round(1, int(hit))
        self._rounds_ov.append((int(hit), not hit))

    def observe_round(self, speculated: int, matched: int, overlapped: bool = False) -> None:
        """A judged round of ``speculated`` steps, ``matched`` of them accepted."""
        self._count_round(speculated, matched, overlapped)
        self._count_without_batch()

    def _count_round(self, speculated: int, matched: int, overlapped: bool = False) -> None:
        """A round or a probe: an acceptance sample, and the overlapped costs' refresh count."""
        (self._rounds_ov if overlapped else self._rounds).append((matched, matched < speculated))
        self._rounds_alone = 0 if overlapped else self._rounds_alone + 1
        if self._rounds_alone >= OVERLAP_REFRESH_ROUNDS and (self._a_ov or self._b_ov_by_size):
            # the overlapped costs are only refreshed by overlapped rounds: forget stale ones, so
            # the next decision tries overlapping with the alone costs and measures them again
            self._a_ov, self._b_ov_by_size = [], {}

    # ------------------------------------------------------------------ estimates
    def step_cost(self) -> float | None:
        """``a``: a speculative step alone (median)."""
        return median(self._a)

    def overlapped_step_cost(self) -> float | None:
        """A speculative step beside a verification (median; the alone ``a`` until measured)."""
        return median(self._a_ov) if self._a_ov else self.step_cost()

    def needs_estimates(self) -> bool:
        """OS^3 with the fallback cannot compare yet: ``a``, ``b(1)`` or ``γ`` is unknown (the
        fallback's verified steps must measure them, a cache probe included)."""
        return self.os3 and self.naive_fallback and (
            not self._a or self.search_cost(1) is None or self.gamma() is None)

    def naive_step_cost(self) -> float | None:
        """The model's naive step: an LM chunk + one real retrieval (medians)."""
        if not self._r or not (self._lm or self._a):
            return None
        return median(self._lm if self._lm else self._a) + median(self._r)

    def naive_reference(self) -> float | None:
        """The realized guard's yardstick: the median fallback step as realized (wall), the
        model's naive step until one was measured."""
        return median(self._verified_wall) if self._verified_wall else self.naive_step_cost()

    def gamma(self, overlapped: bool = False, capped: bool = True) -> float | None:
        """γ of synchronous rounds (or of rounds verified beside decoding); each falls back to
        the other until it has been observed, and both to the seeded prior (``seed_costs``)
        until this request's first round. ``capped``: at most ``gamma_max``."""
        rounds = self._rounds_ov if overlapped else self._rounds
        if not rounds:
            rounds = self._rounds if overlapped else self._rounds_ov
        prior = self._gamma_prior
        if not rounds:
            return prior if prior is None or not capped else min(self.gamma_max, prior)
        matched = float(sum(m for m, _ in rounds))
        mismatched_rounds = float(sum(1 for _, bad in rounds if bad))
        if prior is not None:  # the engine's earlier acceptance, as PRIOR_ROUNDS pseudo-rounds
            matched += PRIOR_ROUNDS * prior
            mismatched_rounds += PRIOR_ROUNDS * (1.0 - prior)
        if matched + mismatched_rounds == 0:
            return None
        seen = matched / (matched + mismatched_rounds)
        return min(self.gamma_max, seen) if capped else seen

    def search_cost(self, s: int, overlapped: bool = False) -> float | None:
        """search(s) (``search_line``)."""
        line = self.search_line(overlapped)
        return None if line is None else line(s)

    def encode_cost(self) -> float:
        """``e``: one query encoding on the worker beside the LM (median; a probe's encoding on
        the critical path until one was measured there); 0 when the worker encodes nothing."""
        if not self.encodes_beside:
            return 0.0
        return median(self._encode) or median(self._encode_alone) or 0.0

    def search_line(self, overlapped: bool = False) -> Callable[[int], float] | None:
        """``s -> search(s)``: a least-squares line through the per-size medians of the searches
        alone (constant if one size was seen); beside decoding, that line times the contention
        factor ``κ`` (module doc), or the overlapped searches' own line while none ran alone.
        None before any search."""
        return self._search_lines()[overlapped]

    def _search_lines(self) -> tuple[Callable[[int], float] | None, Callable[[int], float] | None]:
        """The (alone, beside decoding) search lines of ``search_line``, the alone line built
        once for both."""
        alone = _line({k: median(v) for k, v in self._b_by_size.items()})
        if not self._b_ov_by_size:
            return alone, alone
        ov = {k: median(v) for k, v in self._b_ov_by_size.items()}
        ratios = [] if alone is None else [sec / alone(k) for k, sec in ov.items() if alone(k) > 0]
        if not ratios:
            return alone, _line(ov)
        kappa = median(ratios)
        return alone, lambda s: kappa * alone(s)

    # ------------------------------------------------------------------ the decision
    def decide(self) -> StrideDecision:
        a, g = self.step_cost(), self.gamma()
        if not self.os3:
            return StrideDecision(self.fixed_stride, a, None, g, self.async_verify)
        b_alone, b_ov = self._search_lines()
        b1 = None if b_alone is None else b_alone(1)
        if a is None or b1 is None or g is None:
            # nothing to compare yet: with the fallback, verified steps collect the estimates;
            # without it, a synchronous stride-1 round measures the costs alone (an overlapped
            # one would only measure them under contention, and the alone ones never)
            return StrideDecision(0 if self.naive_fallback else 1, a, b1, g, False)
        if self.naive_fallback and self.holding():  # speculation lost as realized (module doc)
            return StrideDecision(0, a, b1, g, False)
        # the best synchronous round (alone costs) and, if allowed, the best asynchronous one
        # (costs under contention); the one with fewer seconds per verified step wins
        plans = [(a, b_alone, g, False)]
        if self.async_verify:
            plans.append((self.overlapped_step_cost(), b_ov, self.gamma(True), True))
        e = self.encode_cost()
        best = None
        for a_plan, b_of, gam, overlap in plans:
            s = best_stride(a_plan, b_of, gam, overlap, self.s_max, e)
            cost = seconds_per_step(a_plan, b_of(s), gam, s, overlap, self.regenerates, e)
            if best is None or cost < best[0]:
                best = (cost, s, overlap, a_plan, b_of)
        _, s, overlap, a_plan, b_of = best
        naive = self.naive_step_cost()
        if self.naive_fallback and naive is not None:
            # gamma_max hedges how long a stride is; whether to speculate at all is judged at
            # the γ measured (module doc "Falling back")
            g_seen = self.gamma(overlap, capped=False)
            if seconds_per_step(a_plan, b_of(s), g_seen, s, overlap, self.regenerates, e) >= naive:
                return StrideDecision(0, a, b1, g, overlap)
        return StrideDecision(s, a, b1, g, overlap)

    # the measured costs, carried from one request to the next on the same engine by costs() /
    # seed_costs(), with the realized guard's hold and the stale-batch-size count (module doc:
    # a request may be shorter than the refresh interval); acceptance belongs to one
    # request's text, so it travels only as a prior (``gamma``)
    _COSTS = ("_a", "_a_ov", "_lm", "_r", "_encode", "_encode_alone", "_b_by_size", "_b_ov_by_size",
              "_rounds_alone", "_verified_wall", "_hold", "_next_hold", "_since_batch", "_next_refresh",
              "_forgotten")

    def costs(self) -> dict:
        """The measured costs, and the γ this request ended with (``gamma_prior``), to seed
        the scheduler of the engine's next request."""
        out = {k: copy.deepcopy(getattr(self, k)) for k in self._COSTS}
        out["gamma_prior"] = self.gamma(capped=False)
        return out

    def seed_costs(self, costs: dict | None) -> None:
        """Start from costs measured by earlier requests (machine properties: LM step, search,
        encoding and their contention; a ``costs()`` dict); this request's own measurements
        join them. Their ``gamma_prior`` stands in for γ until this request's first round
        is judged, then weighs as ``PRIOR_ROUNDS`` rounds beside this request's own."""
        if not costs:
            return
        for k in self._COSTS:
            setattr(self, k, copy.deepcopy(costs[k]))
        self._gamma_prior = costs.get("gamma_prior")

    def next_stride(self) -> int:
        return self.decide().stride


def _line(points: dict[int, float]) -> Callable[[int], float] | None:
    """``s -> seconds`` from ``points`` (batch size -> median seconds); None for no points.

    A least-squares line (``_fit``). One query is its own point once two batch sizes were
    measured: the line is then fitted on the batches, because one query may take another path
    than a batch (FAISS's own 1-query scan; a batch shares ONE pass over the index), and a line
    from that point through small batches is far too steep (measured 2026-12-05, 1M-vector flat
    scan, one thread: 1 query 128 ms, 2: 204, 3: 271, 4: 226, 8: 380; the line through 1-3 put
    8 at ~600 ms and kept OS^3 at strides of 2-3)."""
    pts = sorted(points.items())
    if not pts:
        return None
    batches = [(x, y) for x, y in pts if x >= 2]
    if pts[0][0] == 1 and len(batches) >= 2:
        one, fit = pts[0][1], _fit(batches)
        return lambda s: one if s <= 1 else fit(s)
    return _fit(pts)


def fit_line(pts: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """``(intercept, slope)`` of the least-squares line through ``pts`` (x, y), the slope never
    below 0 (a cost never falls with more work); None when fewer than two distinct x were seen.
    The one fit behind OS^3's search line (``_fit``) and the load governor's knowledge-base
    batch cost (``engine/governor.py`` ``BatchCostFit``)."""
    n = len(pts)
    if n < 2:
        return None
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    slope = max(sum((x - mx) * (y - my) for x, y in pts) / sxx, 0.0)
    return my - slope * mx, slope


def _fit(pts: list[tuple[int, float]]) -> Callable[[int], float]:
    """The least-squares line through ``pts`` (sorted by size, at least one): constant for one
    point, never falling with ``s``, never below half the cheapest point, and flat beyond the
    largest size measured (optimism until measured: a size never tried is never measured, so
    the decision may pick a larger stride once; its search then joins the fit)."""
    line = fit_line(pts)
    if line is None:
        return lambda s: pts[0][1]
    intercept, slope = line
    floor = min(y for _, y in pts) * 0.5
    hi = pts[-1][0]
    return lambda s: max(intercept + slope * min(s, hi), floor)
