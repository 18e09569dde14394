"""Per-request speculation cache of passages (docs/design.md §1).

``top1(query)`` ranks the cached doc ids with the retriever's own ``score`` and the canonical
tie-break (score desc, then doc id asc), so whenever the knowledge base's true top-1 is cached
the speculation is right. The cache holds at most ``capacity`` doc ids; eviction is LRU, where
an insert or a ``top1`` answer counts as a use. Prefetched top-k lists are inserted from rank k
to rank 1, so the best-ranked passages are the most recently used and survive eviction longest.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

from ralmspec.retrieval.base import Hit, Retriever


class SpeculationCache:
    def __init__(self, retriever: Retriever, capacity: int):
        if capacity < 1:
            raise ValueError("cache capacity must be >= 1")
        self.retriever = retriever
        self.capacity = capacity
        self._ids: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, doc_id: int) -> bool:
        return doc_id in self._ids

    def doc_ids(self) -> list[int]:
        return list(self._ids)

    def _touch(self, doc_id: int) -> None:
        if doc_id in self._ids:
            self._ids.move_to_end(doc_id)
            return
        self._ids[doc_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
            self.evictions += 1

    def add(self, hits: Sequence[Hit] | Iterable[int]) -> None:
        """Insert one ranked list (best first): worst first, so rank 1 ends most recent."""
        ids = [h.doc_id if isinstance(h, Hit) else int(h) for h in hits]
        for doc_id in reversed(ids):
            self._touch(doc_id)

    def use(self, doc_id: int) -> None:
        """Count a use of ``doc_id`` (an answer computed elsewhere from ``doc_ids()``)."""
        if doc_id in self._ids:
            self._ids.move_to_end(doc_id)

    def top1(self, query: str) -> int | None:
        """The cached passage the knowledge base would rank first, or None if empty."""
        if not self._ids:
            return None
        best = self.retriever.rank(query, list(self._ids), k=1)[0].doc_id
        self._touch(best)
        return best
