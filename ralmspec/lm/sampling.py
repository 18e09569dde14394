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

Where the rule is evaluated
---------------------------
Logits on the CPU: on the host with numpy (``draw``). Logits on CUDA: on the device with torch
(``draw_on_device``), so that a runner can feed the drawn token to its next step without a host
round trip (one sync per chunk, as for greedy tokens). The two evaluations are the same rule:
steps 2, 4 and 5 give the same bits (a float64 division, the same noise, made on the host, and
an argmax whose ties go to the lowest id), so with ``top_p == 1`` the token is identical; in
step 3 the exponentials and the sums of the nucleus edge are the device's float64 arithmetic,
which may round differently in the last bit than numpy's: a token exactly at the edge could then
be kept on one and not the other (never seen in the tests' random cases). Every runner of one
device evaluates the rule in the same place (``SeededPick``), so a run's tokens never depend on
the runner, and the naive and speculative loops draw alike.
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


def draw_on_device(logits: Any, sampling: Sampling, position: int) -> Any:
    """The token drawn at absolute ``position`` (module doc), as a 0-d long tensor on the device
    of ``logits`` (a 1-D torch tensor), computed there without reading anything back: the noise is
    made on the host and copied over (asynchronously on CUDA), the nucleus is a full sort of the
    vocabulary (static shapes: microseconds on a GPU, milliseconds on a CPU)."""
    import torch  # not at module level: the engine's scheduler imports Sampling from here without torch

    z = logits.detach().reshape(-1).double()
    if sampling.greedy:
        return torch.argmax(z)
    z = z / sampling.temperature
    g = torch.from_numpy(gumbel_noise(sampling.seed, position, z.shape[0]))
    if z.is_cuda:  # from pinned memory the copy is queued behind the running steps, no host wait
        g = g.pin_memory()
    g = g.to(z.device, non_blocking=True)
    score = z + g
    if sampling.top_p < 1.0:
        score = score.masked_fill(~nucleus_mask(z, sampling.top_p), float("-inf"))
    return torch.argmax(score)  # ties -> the first (lowest) id, on the CPU and on CUDA


def nucleus_mask(z: Any, top_p: float) -> Any:
    """Rule step 3 with torch ops on ``z``'s device: a bool mask of the nucleus. The ids in
    ``(-z, id)`` order (a stable descending sort) are kept while the running sum of ``w`` BEFORE
    them is below ``top_p * W``, i.e. up to and including the first id where it reaches it."""
    import torch

    w = torch.exp(z - z.max())
    need = top_p * w.sum()
    order = torch.sort(z, descending=True, stable=True).indices
    ws = w[order]
    before = torch.cat([ws.new_zeros(1), torch.cumsum(ws, 0)[:-1]])  # running sums, shifted by one
    return torch.zeros_like(z, dtype=torch.bool).scatter_(0, order, before < need)


class SeededPick:
    """A runner's ``pick`` for one prompt's ``Sampling``: token ``i`` of the continuation is the
    draw at absolute position ``sampling.start + i``. Called (``pick(logits, i)``) it returns an
    int; ``on_device`` the 0-d tensor, for runners that keep tokens on the device. Both evaluate
    the rule where the logits are (module doc), so a runner that syncs per token and one that
    syncs per chunk draw the same tokens."""

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling

    def __call__(self, logits: Any, i: int) -> int:
        if getattr(logits, "is_cuda", False):
            return int(self.on_device(logits, i))
        return draw(logits, self.sampling, self.sampling.start + i)

    def on_device(self, logits: Any, i: int) -> Any:
        return draw_on_device(logits, self.sampling, self.sampling.start + i)
