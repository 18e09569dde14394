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

import secrets
from typing import Any

import numpy as np

# The draw rule's parameters (``Sampling``) and their validation (``check_sampling_args``, the
# bounds MAX_TEMPERATURE / SEED_LIMIT) live with the configs: ``GenerationConfig`` builds them.
from ralmspec.config import Sampling

DRAWN_SEED_LIMIT = 2 ** 53  # a drawn seed survives a JSON round trip through a double


def draw_seed() -> int:
    """A fresh random seed (below 2**53, so JSON clients that read numbers as doubles keep it)."""
    return secrets.randbelow(DRAWN_SEED_LIMIT)


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
