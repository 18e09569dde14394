"""One batch-invariant runner shared by decoding threads: their one-token steps run as ONE forward.

The kNN-LM server (``ralmspec/serving/knnlm_app.py``) decodes each request in a thread of its own, one
token at a time (``IncrementalDecoder``: a step, a k-NN search, a decision, the next step). With
a runner per thread every step is its own forward. :class:`SharedRunner` lets the threads share
the ``batched`` runner (``StaticRunner`` with ``batch_rows`` > 1, docs/lm-runner.md): a thread's
``step_hidden`` is a call at a lane of the threads' :class:`~ralmspec.rendezvous.Rendezvous`,
and the steps that meet there run as one ``batch_rows``-row forward
(``StaticRunner.step_hidden_rows``); when they run is the rendezvous rule (its module doc).

Why a session's tokens do not depend on its neighbours: the batch-invariant mode runs EVERY step,
a lone session's included, as a forward of exactly ``batch_rows`` rows with attention per row,
so a row's bits are the same alone and in any mix (tested in ``tests/lm/test_batched_runner.py``
and, through this class, in ``tests/lm/test_shared_runner.py``). Who meets whom decides speed
only. Every other verb (``open``, ``prefill_block``, ``crop``, ``free``) runs at once under the
runner's lock: the runner is used by one thread at a time.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from ralmspec.errors import ConfigError
from ralmspec.rendezvous import Rendezvous


class SharedRunner:
    """The ``open`` / ``prefill_block`` / ``step_hidden`` / ``crop`` / ``free`` verbs of a
    batch-invariant runner (module doc), safe to call from the members of ``rendezvous``, one
    session per thread. ``gather_s``: the step lane's longest wait for more steps (None: its mean
    forward time; ``ralmspec/rendezvous.py``)."""

    def __init__(self, runner: Any, rendezvous: Rendezvous, gather_s: float | None = None):
        rows = int(getattr(runner, "batch_rows", 1))
        if rows < 2 or not hasattr(runner, "step_hidden_rows"):
            raise ConfigError(f"sharing an LM runner between decoding threads needs the batched runner "
                              f"(--lm-runner batched), got {getattr(runner, 'name', type(runner).__name__)!r}")
        self.runner = runner
        self.name = runner.name
        self.capacity = runner.capacity
        self.batch_rows = rows
        self.vocab_size = int(runner.decoder.embed.num_embeddings)  # the rows a token id indexes
        self._lock = threading.Lock()  # the runner: one call at a time
        self.steps = rendezvous.lane(self._step_rows, max_items=rows, gather_s=gather_s)

    def open(self) -> Any:
        with self._lock:
            return self.runner.open()

    def free(self, kv: Any) -> None:
        with self._lock:
            self.runner.free(kv)

    def crop(self, kv: Any, keep: int) -> Any:
        with self._lock:
            return self.runner.crop(kv, keep)

    def prefill_block(self, kv: Any, ids: Sequence[int], *, last: bool,
                      want_hidden: bool = False) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
        with self._lock:
            return self.runner.prefill_block(kv, ids, last=last, want_hidden=want_hidden)

    def step_hidden(self, kv: Any, token: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Feed ``token`` to ``kv``: ``(kv, logits, final hidden state)``, the bits of the same step
        alone, run in one forward with the other members' steps that meet it (module doc)."""
        logits, hidden = self.steps.call((kv, int(token)))
        return kv, logits, hidden

    def _step_rows(self, items: list[tuple[Any, int]]) -> list[Any]:
        """One forward of the steps ``items``; a step past its slot's length, or of a token
        outside the vocabulary (an IndexError in the forward, failing every step beside it),
        fails alone."""
        out: list[Any] = [None] * len(items)
        ok = []
        for i, (kv, token) in enumerate(items):
            try:
                if not 0 <= token < self.vocab_size:
                    raise ConfigError(f"token {token} is outside the vocabulary [0, {self.vocab_size})")
                self.runner.check_fits(kv.length + 1)
                ok.append(i)
            except ConfigError as exc:
                out[i] = exc
        if ok:
            with self._lock, torch.inference_mode():
                logits, hidden = self.runner.step_hidden_rows([items[i][0] for i in ok], [items[i][1] for i in ok])
            for r, i in enumerate(ok):
                out[i] = (logits[r], hidden[r])
        return out

    def stats(self) -> dict[str, Any]:
        """The step lane's forwards by how many sessions they stepped, and the time spent waiting."""
        return {"runner": self.name, "batch_rows": self.batch_rows, **self.steps.stats()}


__all__ = ["SharedRunner"]
