"""Exact sampling: each generated token is a pure function of (seed, its position, its logits).

The draw rule (the LM contract of ``ralmspec.lm.base`` refers to it)
--------------------------------------------------------------------
For the token at absolute position ``p`` of the generated answer (0 = the first new token),
with logits ``l`` (one float per vocabulary id, ``V`` of them) and ``Sampling(temperature T,
top_p, seed)``:

1. ``T == 0``: greedy, ``argmax(l)``, ties -> lowest id. Not computed here: the backends keep
   their own argmax, so greedy output is bit for bit what it was before sampling existed.
2. ``z = float64(l) / T``; ``q = softmax(z)`` (float64, on the CPU).
3. Nucleus: order the ids by ``(-z, id)``; keep the shortest prefix whose cumulative ``q``
   reaches ``top_p`` (at least one id; ``top_p == 1`` keeps every id).
4. Noise: ``r = Philox4x64(key = seed + 2**64 * p, counter = 0).random_raw(V)`` (numpy's
   ``Philox`` bit generator, a counter-based generator: the stream is a function of the key
   alone); ``u[v] = ((r[v] >> 11) + 0.5) / 2**53`` in (0, 1); ``g[v] = -log(-log(u[v]))``
   (standard Gumbel noise, one value per vocabulary id).
5. The token is ``argmax over the nucleus of z[v] + g[v]``, ties -> lowest id (Gumbel-max:
   an exact sample of ``q`` restricted to the nucleus and renormalised).

So the draw depends on nothing but ``(seed, p, l, T, top_p)``: not on the process, the thread,
the batch, whether the token is produced inside a multi-token chunk or alone, nor on how many
times the position was generated before. A speculative loop that rolls back and regenerates
position ``p`` from the same prompt replays exactly the draw the naive loop makes there.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ralmspec.errors import ConfigError

MAX_TEMPERATURE = 2.0
SEED_LIMIT = 2 ** 63  # seeds are non-negative integers below this (fits an int64)
DRAWN_SEED_LIMIT = 2 ** 53  # a drawn seed survives a JSON round trip through a double


def check_sampling_args(temperature: Any, top_p: Any, seed: Any) -> None:
    """``ConfigError`` naming the first invalid value (temperature in [0, 2], top_p in (0, 1],
    seed ``None`` or an integer in [0, 2**63))."""
    num = (int, float)
    if isinstance(temperature, bool) or not isinstance(temperature, num) or not math.isfinite(temperature) \
            or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise ConfigError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] "
                          f"(0 = greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, num) or not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")


def draw_seed() -> int:
    """A fresh random seed (below 2**53, so JSON clients that read numbers as doubles keep it)."""
    return secrets.randbelow(DRAWN_SEED_LIMIT)


@dataclass(frozen=True)
class Sampling:
    """How one prompt's continuation is decoded: the draw rule's parameters and the absolute
    position (index in the generated answer) of the first new token; token ``i`` of the
    continuation is drawn at position ``start + i``."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    start: int = 0

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_p, self.seed)
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ConfigError(f"sampling start position must be an integer >= 0, got {self.start!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def at(self, start: int) -> Sampling:
        return replace(self, start=start)


def gumbel_noise(seed: int, position: int, size: int) -> np.ndarray:
    """Standard Gumbel noise ``[size]`` (float64) for ``(seed, position)`` (rule step 4)."""
    gen = np.random.Philox(key=int(seed) + (int(position) << 64), counter=0)
    raw = gen.random_raw(size)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2 ** 53)
    return -np.log(-np.log(u))


def nucleus(z: np.ndarray, top_p: float) -> np.ndarray:
    """Ids of the top-p nucleus of ``softmax(z)`` in ascending id order (rule step 3).

    Exactly: with ``w = exp(z - max z)`` and ``W = sum(w)`` (numpy's sum over the ids in id
    order), the ids in ``(-z, id)`` order up to and including the first one where the running
    (sequential) sum of ``w`` reaches ``top_p * W``. Only the largest candidates are sorted
    (all ids with ``z`` at or above the k-th largest value, k growing until the mass is
    reached), which gives the same prefix, bit for bit, as sorting the whole vocabulary.
    """
    size = z.shape[0]
    if top_p >= 1.0:
        return np.arange(size)
    w = np.exp(z - z.max())
    need = top_p * w.sum()
    k = 64
    while True:
        if k < size:
            cand = np.flatnonzero(z >= np.partition(z, size - k)[size - k])  # ties at the edge included
        else:
            cand = np.arange(size)
        order = cand[np.lexsort((cand, -z[cand]))]
        i = int(np.searchsorted(np.cumsum(w[order]), need, side="left"))
        if i < order.shape[0] or k >= size:
            return np.sort(order[:i + 1])
        k *= 8


def draw(logits: Any, sampling: Sampling, position: int) -> int:
    """The token drawn at absolute ``position`` from ``logits`` (module doc). ``logits`` is a
    1-D torch tensor or array of one float per vocabulary id."""
    if hasattr(logits, "detach"):  # torch tensor (any device, any dtype)
        logits = logits.detach().double().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if sampling.greedy:
        return int(np.argmax(z))
    z = z / sampling.temperature
    ids = nucleus(z, sampling.top_p)
    g = gumbel_noise(sampling.seed, position, z.shape[0])
    return int(ids[int(np.argmax(z[ids] + g[ids]))])
