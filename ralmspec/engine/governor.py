"""LoadGovernor: may speculation run on a shared server right now? Pure policy, no I/O.

OS^3 (``speculation/stride.py``) judges ONE request's latency: overlapping its retrieval with
its own decoding pays when its LM would otherwise wait. On a server with several requests in
flight that idle LM time is already filled by the OTHER requests' chunks (a naive request waiting
for its retrieval leaves the LM to its neighbours). When the LM worker is busy nearly all the
time there is nothing left for speculation to fill, and it only costs throughput: rolled-back
chunks are decoded twice, speculative requests stop stepping in lock-step so LM and search batches
shrink (measured 2026-11-29, tiny on the real KB, 8 clients: 4.0 -> 2.3 prompts per LM call,
3.7 -> 1.5 queries per search, 0.83x throughput), and a guess's query encoding competes with
the LM for the same cores.

Rule: the LM worker's busy fraction over the last ``window_s`` seconds (time inside backend
calls / window) is the load signal. With at least ``min_active`` requests running, speculation is
PAUSED once the fraction reaches ``pause_at`` and RESUMED once it falls below ``resume_at``
(hysteresis: a speculating server loads its LM more than a naive one, so one threshold would
flip every window). Except when the knowledge-base worker is busy ``kb_bottleneck_at`` of the
window AND batching amortizes its calls: then retrieval is the bottleneck, speculation's larger
verification batches are what raises throughput, and it is neither paused nor kept paused.
"Batching amortizes" is measured, not assumed (``BatchCostFit``): a least-squares line
``seconds = fixed + per_query * queries`` through the latest knowledge-base calls, and the fixed
part must be at least ``kb_fixed_share_at`` of a mean call. An exact scan of 1M vectors is
mostly fixed cost (one pass over memory, measured share ~0.6); the small real knowledge base is
mostly per-query cost (the query encodings of naive steps run inside its calls, share < 0.1),
so there a busy knowledge base does not mean speculation can help: measured 2026-11-29 with
tiny, 32 clients, a governor that let requests speculate whenever that KB was busy gave 0.90x
throughput and 1.09x p95. While paused, requests take
verified steps: retrieve, then generate, exactly the naive step. When retrieval is the
bottleneck (an expensive knowledge base) the LM mostly stays below the thresholds too (measured:
EMULATED 1M, 8 clients, naive LM busy 38%, speculative 74%).

Outputs never depend on it: paused or not, every emitted token is verified (docs/design.md §2 invariant 1).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ralmspec.errors import ConfigError
from ralmspec.speculation.stride import fit_line


class BusyWindow:
    """Busy intervals of one worker; ``fraction(now)`` = busy seconds in ``[now - window_s, now]``
    / the window (the time since ``t0`` while that is shorter). Busy = at least one call running
    (calls may overlap: ``start`` / ``stop`` nest). Only the intervals of the last ``window_s``
    seconds are kept, whether ``fraction`` is asked or not (a server whose requests never
    speculate, or with the governor off, never asks it: one interval per call piled up)."""

    def __init__(self, window_s: float, t0: float):
        self.window_s = window_s
        self.t0 = t0
        self._done: deque[tuple[float, float]] = deque()  # disjoint, in time order
        self._done_s = 0.0  # their total length: fraction() is asked before every round, O(1)
        self._open: float | None = None
        self._depth = 0

    def start(self, t: float) -> None:
        self._depth += 1
        if self._depth == 1:
            self._open = t

    def stop(self, t: float) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0 and self._open is not None:
            self._done.append((self._open, t))
            self._done_s += t - self._open
            self._open = None
            self._forget(t - self.window_s)

    def _forget(self, lo: float) -> None:
        """Drop the intervals that ended by ``lo``: outside every window from now on."""
        while self._done and self._done[0][1] <= lo:
            s, e = self._done.popleft()
            self._done_s -= e - s

    def fraction(self, now: float) -> float:
        lo = now - self.window_s
        self._forget(lo)
        busy = self._done_s
        if self._done and self._done[0][0] < lo:  # only the oldest interval can cross the window's edge
            busy -= lo - self._done[0][0]
        if self._open is not None:
            busy += now - max(self._open, lo)
        span = min(self.window_s, now - self.t0)
        return min(1.0, busy / span) if span > 0 else 0.0


class BatchCostFit:
    """Least-squares line ``seconds = fixed + per_query * queries`` through the latest ``n``
    knowledge-base calls (distinct queries, seconds). ``fixed_share()`` is ``fixed / seconds``
    at the mean batch: the part of a call that more queries per call would amortize; None until
    ``min_calls`` calls of at least two different sizes were seen. The line is refitted once per
    observed call, not each time it is asked: the governor asks before every round of every request."""

    def __init__(self, n: int = 64, min_calls: int = 8):
        self._pts: deque[tuple[int, float]] = deque(maxlen=n)
        self.min_calls = min_calls
        self._share: float | None = None

    def observe(self, queries: int, seconds: float) -> None:
        self._pts.append((int(queries), float(seconds)))
        self._share = self._fit()

    def fixed_share(self) -> float | None:
        return self._share

    def _fit(self) -> float | None:
        pts = self._pts
        if len(pts) < self.min_calls:
            return None
        mt = sum(t for _, t in pts) / len(pts)
        line = fit_line(pts)
        if line is None or mt <= 0:
            return None
        fixed = min(mt, max(0.0, line[0]))
        return fixed / mt


@dataclass(frozen=True)
class GovernorConfig:
    enabled: bool = True
    window_s: float = 3.0
    pause_at: float = 0.85  # LM busy fraction that pauses speculation
    resume_at: float = 0.6  # ... and the one below which it resumes
    min_active: int = 2  # with fewer requests running, OS^3 alone decides
    # knowledge-base busy fraction from which the KB counts as THE bottleneck: speculation (more
    # queries per search) is then never paused, and a pause ends; None: the KB is not looked at
    kb_bottleneck_at: float | None = 0.97
    # ... and only when the fixed part of a knowledge-base call (BatchCostFit) is at least this
    # share of a mean call: more queries per call must make each one cheaper
    kb_fixed_share_at: float = 0.3

    def __post_init__(self) -> None:
        if not (isinstance(self.window_s, (int, float)) and self.window_s > 0):
            raise ConfigError(f"governor window_s must be > 0 seconds, got {self.window_s!r}")
        if not 0.0 < self.resume_at <= self.pause_at <= 1.0:
            raise ConfigError("governor thresholds need 0 < resume_at <= pause_at <= 1, got "
                              f"resume_at={self.resume_at!r}, pause_at={self.pause_at!r}")
        if self.kb_bottleneck_at is not None and not 0.0 < self.kb_bottleneck_at <= 1.0:
            raise ConfigError(f"governor kb_bottleneck_at must be in (0, 1], got {self.kb_bottleneck_at!r}")
        if not 0.0 <= self.kb_fixed_share_at <= 1.0:
            raise ConfigError(f"governor kb_fixed_share_at must be in [0, 1], got {self.kb_fixed_share_at!r}")
        if not isinstance(self.min_active, int) or self.min_active < 1:
            raise ConfigError(f"governor min_active must be an integer >= 1, got {self.min_active!r}")


class LoadGovernor:
    """The server-wide switch of the module doc. ``lm`` / ``kb`` are the LM and knowledge-base
    workers' ``BusyWindow``s, ``kb_fit`` the knowledge base's ``BatchCostFit`` (None: the KB
    rule never applies); the caller passes the clock and the number of running requests."""

    def __init__(self, config: GovernorConfig, lm: BusyWindow, kb: BusyWindow | None = None,
                 kb_fit: BatchCostFit | None = None):
        self.config = config
        self.lm = lm
        self.kb = kb
        self.kb_fit = kb_fit
        self.paused = False
        self.pauses = 0  # times speculation was paused
        self.paused_s = 0.0  # seconds spent paused
        self._since: float | None = None
        self.last_fraction = 0.0

    def allows_speculation(self, now: float, active: int) -> bool:
        """Update the state from the LM's busy fraction and say whether a request may speculate."""
        c = self.config
        if not c.enabled:
            return True
        f = self.lm.fraction(now)
        kb_bound = (self.kb is not None and c.kb_bottleneck_at is not None
                    and self.kb.fraction(now) >= c.kb_bottleneck_at and self.kb_amortizes())
        self.last_fraction = f
        loaded = active >= c.min_active
        if not self.paused and loaded and f >= c.pause_at and not kb_bound:
            self.paused, self._since = True, now
            self.pauses += 1
        elif self.paused and (not loaded or f < c.resume_at or kb_bound):
            self._resume(now)
        return not self.paused

    def request_ended(self, now: float, active: int) -> None:
        """A request ended and ``active`` still run or wait for a slot (a waiting one takes the
        ended one's slot at once): below ``min_active`` the server is no longer
        loaded, so a pause ends (``allows_speculation``'s own rule) now, not at the next ask of a
        speculative request, which may be long after: a server idle or running only naive
        requests showed speculation paused and counted those seconds in ``paused_s``."""
        if self.paused and active < self.config.min_active:
            self._resume(now)

    def _resume(self, now: float) -> None:
        """End the pause, adding its seconds to ``paused_s``."""
        self.paused_s += now - (self._since if self._since is not None else now)
        self.paused, self._since = False, None

    def kb_amortizes(self) -> bool:
        """More queries per knowledge-base call make each cheaper (module doc); unknown: no."""
        share = self.kb_fixed_share()
        return share is not None and share >= self.config.kb_fixed_share_at

    def kb_fixed_share(self) -> float | None:
        return self.kb_fit.fixed_share() if self.kb_fit is not None else None

    def stats(self, now: float) -> dict:
        paused_s = self.paused_s + (now - self._since if self.paused and self._since is not None else 0.0)
        share = self.kb_fixed_share()
        return {"enabled": self.config.enabled, "paused": self.paused, "pauses": self.pauses,
                "paused_s": round(paused_s, 4), "lm_busy_fraction": round(self.last_fraction, 4),
                "kb_busy_fraction": round(self.kb.fraction(now), 4) if self.kb is not None else None,
                "kb_fixed_share": None if share is None else round(share, 4),
                "pause_at": self.config.pause_at, "resume_at": self.config.resume_at,
                "window_s": self.config.window_s}
