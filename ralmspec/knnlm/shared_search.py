"""A datastore's search shared by decoding threads: the searches that meet run as ONE search.

Beside ``lm/shared_runner.py`` (their LM steps share forwards), the kNN-LM server's decoding
threads on the ``batched`` runner search through a :class:`SharedSearch`: each ``search`` is a
call at a lane of the threads' :class:`~ralmspec.rendezvous.Rendezvous`; the calls that meet
(with the same ``k``) become one ``Datastore.search`` of all their queries, which a flat index
answers with one GEMM over the keys instead of one scan per request. The datastore's search is
batch-invariant (``knnlm/datastore.py`` module doc: a query's neighbours and distances are the
same alone and in any batch, tested), so batching changes no result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ralmspec.rendezvous import Rendezvous

MAX_CALLS = 16  # searches per batch (each of a request's queries: 1 per naive token, s per verification)


class SharedSearch:
    """``search(queries, k)`` of ``datastore`` for the members of ``rendezvous`` (module doc).
    ``gather_s``: the lane's longest wait for more searches (None: its mean search time)."""

    def __init__(self, datastore: Any, rendezvous: Rendezvous, gather_s: float | None = None,
                 max_calls: int = MAX_CALLS):
        self.datastore = datastore
        self.lane = rendezvous.lane(self._search_all, max_items=max_calls, gather_s=gather_s)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``datastore.search(queries, k)``, run in one search with the calls that meet it."""
        return self.lane.call((np.asarray(queries), int(k)))

    def _search_all(self, items: list[tuple[np.ndarray, int]]) -> list[Any]:
        """One datastore search per distinct ``k`` over the calls' queries, split back per call; a
        call with bad queries (a ConfigError from the datastore) fails alone."""
        out: list[Any] = [None] * len(items)
        for k in sorted({k for _, k in items}):
            idx = [i for i, (q, kk) in enumerate(items) if kk == k]
            qs = [np.atleast_2d(items[i][0]) for i in idx]
            try:
                ids, d = self.datastore.search(np.concatenate(qs), k)
            except Exception:  # a malformed call must not fail the others: search them one by one
                for i in idx:
                    try:
                        out[i] = self.datastore.search(items[i][0], k)
                    except Exception as exc:
                        out[i] = exc
                continue
            row = 0
            for i, q in zip(idx, qs):
                out[i] = (ids[row:row + len(q)], d[row:row + len(q)])
                row += len(q)
        return out

    def stats(self) -> dict[str, Any]:
        return self.lane.stats()


__all__ = ["SharedSearch"]
