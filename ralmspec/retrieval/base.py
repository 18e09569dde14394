"""The Retriever contract shared by every knowledge base (dense, sparse, remote).

Contract (docs/design.md §2, invariant 2):
- ``search_sync(queries, k)`` returns, per query, the top-k ``Hit``s sorted by score
  descending, ties broken by the lower doc id. The answer for a query is a deterministic
  function of the query text alone: identical ids, order and scores whether the query is
  searched alone or inside any batch.
- ``score(query, doc_ids)`` returns the *same* numbers ``search`` would report for those
  docs (same metric, same arithmetic). The speculation cache ranks with it, so a cached
  top-1 equals the knowledge base's top-1 whenever the true top-1 is in the cache.
"""

from __future__ import annotations

import abc
from typing import NamedTuple, Sequence

import numpy as np

from ralmspec.config import is_int
from ralmspec.data.corpus import Corpus
from ralmspec.errors import ConfigError
from ralmspec.threads import to_thread


class Hit(NamedTuple):
    doc_id: int
    score: float


def rank_hits(doc_ids: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, k: int) -> list[Hit]:
    """Top-k of (doc_id, score) pairs: score descending, then doc id ascending."""
    ids = np.asarray(doc_ids, dtype=np.int64)
    sc = np.asarray(scores, dtype=np.float64)
    if ids.size == 0:
        return []
    order = np.lexsort((ids, -sc))[:k]
    return [Hit(int(ids[i]), float(sc[i])) for i in order]


def check_k(k: object) -> None:
    """ConfigError unless ``k`` is a positive integer (bool excluded; numpy integers accepted)."""
    if not is_int(k, 1, numpy=True):
        raise ConfigError(f"k must be a positive integer, got {k!r}")


class Retriever(abc.ABC):
    """A knowledge base over ``corpus``. Subclasses implement ``search_sync`` and ``score``."""

    kind: str = "abstract"
    corpus: Corpus

    @abc.abstractmethod
    def search_sync(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Batched top-k search (blocking; FAISS / BM25 release the GIL)."""

    @abc.abstractmethod
    def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        """Scores of ``doc_ids`` for ``query`` with exactly the metric of ``search``."""

    async def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Async batched search; runs ``search_sync`` in a worker thread."""
        return await to_thread(self.search_sync, list(queries), k)

    def rank(self, query: str, doc_ids: Sequence[int], k: int = 1) -> list[Hit]:
        """Top-k among ``doc_ids`` by ``score`` with the canonical tie-break."""
        ids = list(doc_ids)
        if not ids:
            return []
        return rank_hits(ids, self.score(query, ids), k)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (remote sessions, GPU memory)."""
