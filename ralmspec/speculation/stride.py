"""OS^3: the optimal speculation stride scheduler (DESIGN §1). Pure policy, no I/O.

Symbols: ``a`` = seconds of one speculative step (cache lookup + query + LM chunk),
``b(s)`` = seconds of one batched verification of ``s`` queries, ``γ`` = probability that one
speculated passage is right. Per round of stride ``s`` the expected number of verified chunks is
``(1-γ^s)/(1-γ)``; the round costs ``s·a + b`` synchronously and
``γ^s·((s-1)·a + max(a,b)) + (1-γ^s)·(s·a + b)`` with asynchronous verification. The scheduler
picks the ``s`` in ``[1, s_max]`` that maximises verified chunks per second, searching upward
from 1 while the objective does not fall.

Estimates: ``a`` = the latest step latency; ``b(s)`` = a least-squares line through the latest
verification latency seen at each batch size (constant when only one size was seen);
``γ`` = Σ matched / (Σ matched + rounds with a mismatch) over the last ``window`` rounds,
capped at ``gamma_max``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


def expected_verified_chunks(gamma: float, s: int) -> float:
    """E[chunks kept per round] = Σ_{i<s} γ^i = (1-γ^s)/(1-γ)."""
    if gamma >= 1.0:
        return float(s)
    return (1.0 - gamma**s) / (1.0 - gamma)


def round_time(a: float, b: float, gamma: float, s: int, async_verify: bool) -> float:
    """Expected seconds of one round of stride ``s``."""
    if not async_verify:
        return s * a + b
    g = gamma**s
    return g * ((s - 1) * a + max(a, b)) + (1.0 - g) * (s * a + b)


def best_stride(a: float, b_of_s, gamma: float, async_verify: bool, s_max: int) -> int:
    """Smallest-first hill climb on verified chunks per second; ``b_of_s(s)`` gives b."""
    def objective(s: int) -> float:
        t = round_time(a, b_of_s(s), gamma, s, async_verify)
        return expected_verified_chunks(gamma, s) / t if t > 0 else float("inf")

    s, best = 1, objective(1)
    while s < s_max:
        nxt = objective(s + 1)
        if nxt < best:
            break
        s, best = s + 1, nxt
    return s


@dataclass
class StrideDecision:
    stride: int
    a: float | None
    b: float | None
    gamma: float | None


class StrideScheduler:
    """Chooses the speculation stride for the next round.

    ``os3=False`` returns ``fixed_stride`` always (the paper's ablation). With OS^3 on, the
    stride is 1 until one step latency, one verification latency and one round are observed.
    """

    def __init__(self, os3: bool = True, fixed_stride: int = 3, async_verify: bool = False,
                 s_max: int = 16, window: int = 5, gamma_max: float = 0.6):
        self.os3 = os3
        self.fixed_stride = fixed_stride
        self.async_verify = async_verify
        self.s_max = s_max
        self.gamma_max = gamma_max
        self._a: float | None = None
        self._b_by_size: dict[int, float] = {}
        self._rounds: deque[tuple[int, bool]] = deque(maxlen=window)  # (matched, had_mismatch)

    def observe_step(self, seconds: float) -> None:
        self._a = seconds

    def observe_verification(self, batch_size: int, seconds: float) -> None:
        self._b_by_size[batch_size] = seconds

    def observe_round(self, speculated: int, matched: int) -> None:
        self._rounds.append((matched, matched < speculated))

    def gamma(self) -> float | None:
        if not self._rounds:
            return None
        matched = sum(m for m, _ in self._rounds)
        mismatched_rounds = sum(1 for _, bad in self._rounds if bad)
        if matched + mismatched_rounds == 0:
            return None
        return min(self.gamma_max, matched / (matched + mismatched_rounds))

    def verification_cost(self, s: int) -> float | None:
        """b(s): least-squares line over the sizes seen (constant if only one)."""
        pts = sorted(self._b_by_size.items())
        if not pts:
            return None
        if len(pts) == 1:
            return pts[0][1]
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        my = sum(y for _, y in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
        slope = max(slope, 0.0)  # verification never gets cheaper with more queries
        return max(my + slope * (s - mx), min(y for _, y in pts) * 0.5)

    def decide(self) -> StrideDecision:
        if not self.os3:
            return StrideDecision(self.fixed_stride, self._a, None, self.gamma())
        g = self.gamma()
        b1 = self.verification_cost(1)
        if self._a is None or b1 is None or g is None:
            return StrideDecision(1, self._a, b1, g)
        s = best_stride(self._a, lambda k: self.verification_cost(k), g, self.async_verify, self.s_max)
        return StrideDecision(s, self._a, b1, g)

    def next_stride(self) -> int:
        return self.decide().stride
