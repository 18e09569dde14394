"""A knowledge base split into shards: the exact merge (pure policy) and the ``ShardedRetriever``.

Shards are contiguous doc-id ranges ``[start, stop)`` covering ``0..N-1`` in order. Every shard
answers with its own top-k, with GLOBAL doc ids and the canonical float64 scores of the
unsharded metric (``shard_index.py`` makes them bit-identical). Then:

- **Merge is exact** (:func:`merge_topk`): the canonical order is a total order on (score desc,
  doc id asc); each element of the global top-k is among the top-k of its own shard under that
  order, so the global top-k is the top-k of the union of the shards' top-k lists, and
  ``rank_hits`` over the union returns it with the same ids, order and scores.
- **Scores route by range** (:func:`route_ids`): ``score(query, doc_ids)`` asks each doc's own
  shard and puts the numbers back in the caller's order, so the speculation cache ranks with
  exactly the numbers ``search`` reports.

The mechanism that reaches the shards is a ``ShardBackend``: ``LocalShards`` here (in-process,
what ``ralmspec generate --index SHARDED_DIR`` uses and the tests compare against), or Ray
actors (``ray_shards.RayShards``). Queries are turned into what shards consume ONCE, in the
caller, by a ``QueryCodec`` (dense: MiniLM vectors encoded one query at a time, the encoder's
batch-invariance contract; BM25: the query's token strings): shards then hold no model, every
shard scores the same bits, and the encoder's LRU cache (which the engine warms on its worker)
stays useful.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from ralmspec.config import is_int
from ralmspec.data.corpus import Corpus
from ralmspec.errors import ConfigError
from ralmspec.retrieval.base import Hit, Retriever, check_k, rank_hits


# --------------------------------------------------------------------------- pure policy


@dataclass(frozen=True)
class ShardRange:
    """Global doc ids ``[start, stop)`` held by one shard (non-empty)."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ConfigError(f"a shard holds a non-empty doc-id range, got [{self.start}, {self.stop})")

    @property
    def size(self) -> int:
        return self.stop - self.start


def contiguous_ranges(n: int, shards: int) -> tuple[ShardRange, ...]:
    """``n`` doc ids cut into ``shards`` contiguous ranges whose sizes differ by at most one."""
    if not is_int(shards, 1):
        raise ConfigError(f"the number of shards must be a positive integer, got {shards!r}")
    if shards > n:
        raise ConfigError(f"cannot cut {n} passages into {shards} non-empty shards")
    base, extra = divmod(n, shards)
    out, start = [], 0
    for i in range(shards):
        stop = start + base + (1 if i < extra else 0)
        out.append(ShardRange(start, stop))
        start = stop
    return tuple(out)


def check_ranges(ranges: Sequence[ShardRange], n: int) -> None:
    """ConfigError unless ``ranges`` tile ``[0, n)`` in order."""
    expect = 0
    for r in ranges:
        if r.start != expect:
            raise ConfigError(f"shard ranges must tile [0, {n}) in order; a shard starts at {r.start}, not {expect}")
        expect = r.stop
    if expect != n or not ranges:
        raise ConfigError(f"shard ranges cover [0, {expect}) but the knowledge base has {n} passages")


def merge_topk(per_shard: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The global top-k from each shard's top-k (global ids): score desc, then lower doc id."""
    ids = [h.doc_id for hits in per_shard for h in hits]
    scores = [h.score for hits in per_shard for h in hits]
    return rank_hits(ids, scores, k)


def route_ids(doc_ids: Sequence[int] | np.ndarray, ranges: Sequence[ShardRange]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Group ``doc_ids`` by shard: ``[(shard, positions in doc_ids, global ids)]``, shards in order.

    Ids must be in ``[ranges[0].start, ranges[-1].stop)`` (checked by the caller).
    """
    ids = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
    starts = np.array([r.start for r in ranges], dtype=np.int64)
    which = np.searchsorted(starts, ids, side="right") - 1
    out = []
    for s in np.unique(which):
        pos = np.flatnonzero(which == s)
        out.append((int(s), pos, ids[pos]))
    return out


# --------------------------------------------------------------------------- contracts


class ShardSearcher(Protocol):
    """One shard's index (``shard_index.DenseShard`` / ``BM25Shard``): global ids in and out."""

    kind: str
    range: ShardRange

    def search(self, payloads: Any, k: int) -> list[list[Hit]]:
        """Per query payload, this shard's top-min(k, size) with global ids, canonical order."""

    def score(self, payload: Any, doc_ids: np.ndarray) -> np.ndarray:
        """Canonical float64 scores of global ``doc_ids`` (all in this shard) for one query."""


class ShardBackend(Protocol):
    """How the shards are reached. Any failure to reach one raises ``RetrievalError``."""

    ranges: tuple[ShardRange, ...]

    def search(self, payloads: Any, k: int) -> list[list[list[Hit]]]:
        """``[shard][query]`` -> that shard's top-k for every query of the batch."""

    def score(self, calls: Sequence[tuple[int, Any, np.ndarray]]) -> list[np.ndarray]:
        """For each ``(shard, payload, global ids)``, the scores of those ids on that shard."""

    def close(self) -> None:
        """Release the shards (idempotent)."""


class QueryCodec(Protocol):
    """Query texts -> what the shards consume; a deterministic function of each text alone."""

    def batch(self, queries: Sequence[str]) -> Any:
        """Payloads of a batch, in a form the backend can slice or send whole."""

    def one(self, query: str) -> Any:
        """The payload of one query."""


class DenseCodec:
    """Dense queries: the encoder's float32 vectors, each query encoded alone (LRU-cached)."""

    def __init__(self, encoder: Any):
        self.encoder = encoder

    def batch(self, queries: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_queries(list(queries))

    def one(self, query: str) -> np.ndarray:
        return self.encoder.encode_queries([query])[0]


class TokenCodec:
    """BM25 queries: the query's token strings in order (``sparse.QueryTokenizer``)."""

    encoder = None  # no dense encoder: the engine's guesser sees a sparse retriever

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def batch(self, queries: Sequence[str]) -> list[list[str]]:
        return [self.tokenizer.tokens(q) for q in queries]

    def one(self, query: str) -> list[str]:
        return self.tokenizer.tokens(query)


# --------------------------------------------------------------------------- mechanisms


class LocalShards:
    """All shards in this process (no Ray): the reference the Ray backend must equal."""

    def __init__(self, shards: Sequence[ShardSearcher]):
        self.shards = list(shards)
        self.ranges = tuple(s.range for s in self.shards)

    def search(self, payloads: Any, k: int) -> list[list[list[Hit]]]:
        return [s.search(payloads, k) for s in self.shards]

    def score(self, calls: Sequence[tuple[int, Any, np.ndarray]]) -> list[np.ndarray]:
        return [self.shards[i].score(payload, ids) for i, payload, ids in calls]

    def close(self) -> None:
        self.shards = []


class ShardedRetriever(Retriever):
    """A ``Retriever`` over shards: fan out, exact merge; ``score`` routed to each doc's shard.

    Contract: for ``exact``, ``ivf`` (shards split from one trained index) and ``bm25`` the
    answers are those of the unsharded index, bit for bit (ids, order, float64 scores); for
    ``hnsw`` (one graph per shard) they are the exact merge of the shards' own answers, which can
    differ from one unsharded graph (approximate search). ``corpus`` is the whole text store,
    held by the caller (the engine reads passages from it).
    """

    def __init__(self, corpus: Corpus, kind: str, backend: ShardBackend, codec: QueryCodec):
        check_ranges(backend.ranges, len(corpus))
        self.corpus = corpus
        self.kind = kind
        self.backend = backend
        self.codec = codec
        self.encoder = getattr(codec, "encoder", None)  # the engine warms its cache on a worker
        self.n_shards = len(backend.ranges)
        self.index_dir: str | None = None  # set by the opener

    def search_sync(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        check_k(k)
        queries = list(queries)
        for q in queries:
            if not isinstance(q, str):
                raise ConfigError(f"queries must be strings, got {type(q).__name__}")
        if not queries:
            return []
        per_shard = self.backend.search(self.codec.batch(queries), int(k))
        return [merge_topk([rows[i] for rows in per_shard], int(k)) for i in range(len(queries))]

    def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        ids = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return []
        n = len(self.corpus)
        if ids.min() < 0 or ids.max() >= n:
            raise ConfigError(f"doc ids must be in [0, {n}), got {int(ids.min())}..{int(ids.max())}")
        payload = self.codec.one(query)
        routes = route_ids(ids, self.backend.ranges)
        got = self.backend.score([(s, payload, gids) for s, _pos, gids in routes])
        out = np.empty(ids.size, dtype=np.float64)
        for (_s, pos, _gids), scores in zip(routes, got):
            out[pos] = scores
        return out.tolist()

    def worker_memory(self, timeout_s: float) -> list[dict[str, Any]]:
        """The shard processes' memory (``cluster.actors_memory`` rows) where the backend runs
        them apart (Ray actors); empty for shards in this process."""
        fn = getattr(self.backend, "worker_memory", None)
        return fn(timeout_s) if fn is not None else []

    def close(self) -> None:
        self.backend.close()
