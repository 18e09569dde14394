"""EMULATED large knowledge base: the answers of the real one, the search cost of a bigger flat index.

Why: the shipped knowledge base has ~3.8k passages, so an exact search costs a few ms and
retrieval is only a few percent of a naive step (docs/design.md §9); the paper's regime (a 21M-passage
Wikipedia, retrieval ~95% of the time) cannot be reproduced with real text on this machine.

What ``PaddedCostRetriever`` does, exactly:

- every ``search_sync(queries, k)`` first asks the REAL retriever (the exact FAISS index over the
  real passages) and returns its answer unchanged; so answers, cache hits, acceptance and the
  generated tokens are those of the real knowledge base, and token identity with the naive loop
  is still checked on real retrieval results;
- then it runs a REAL FAISS ``IndexFlatIP.search`` of the same query vectors (MiniLM, the same
  ones the real search used, from the encoder's cache) against ``pad`` synthetic random unit
  vectors, with the same ``k`` (+ the re-scoring margin) and the same path as the real exact
  retriever (FAISS for one query, one GEMM for a batch), and throws that result away. That is
  the work an exact flat index with ``len(corpus) + pad`` vectors does (same batching, same
  threads, competing for the same 2 cores as the LM), up to the ``len(corpus)`` real rows it
  already scanned;
- ``score`` (used by the speculation cache) is the real retriever's: scoring a handful of cached
  passages costs the same in a large index.

What it does NOT emulate: how a larger corpus would change *which* passages are retrieved (and
therefore the speculation hit rate), nor the cost of approximate indexes (HNSW/IVF scale
sub-linearly), nor memory effects beyond what the padded scan itself causes. Every table and plot
that uses it labels the knowledge base "emulated".
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from ralmspec.config import SpeculationConfig
from ralmspec.errors import ConfigError
from ralmspec.retrieval.base import Hit, Retriever
from ralmspec.retrieval.dense import FlatScan

PAD_CHUNK = 100_000
CALIBRATED_BATCHES = (2, 3, 4, 5, 6, 8)  # verification batch sizes whose scan path is timed at build


def build_pad_index(n: int, dim: int, seed: int = 0, progress=None):
    """A FAISS ``IndexFlatIP`` with ``n`` random unit vectors of dimension ``dim`` (deterministic in seed)."""
    import faiss

    if n < 1 or dim < 1:
        raise ConfigError(f"pad size and dimension must be >= 1, got n={n}, dim={dim}")
    index = faiss.IndexFlatIP(dim)
    rng = np.random.default_rng(seed)
    done = 0
    while done < n:
        m = min(PAD_CHUNK, n - done)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        index.add(x)
        done += m
        if progress is not None:
            progress(m)
    return index


class PaddedCostRetriever(Retriever):
    """The real ``inner`` retriever's answers + the real cost of scanning ``pad`` more vectors (EMULATION).

    ``inner`` must be a dense retriever with an ``encoder`` (``encode_queries``); ``pad_index``
    a FAISS index over synthetic vectors of the encoder's dimension (``build_pad_index``).
    Counters: ``pad_searches`` (calls), ``pad_queries`` (queries), ``pad_seconds`` (time in the
    padded scan only).
    """

    def __init__(self, inner: Retriever, pad_index, label: str | None = None):
        encoder = getattr(inner, "encoder", None)
        if encoder is None or not hasattr(encoder, "encode_queries"):
            raise ConfigError("an emulated (padded) knowledge base needs a dense retriever with a query encoder")
        if pad_index.d != encoder.dim:
            raise ConfigError(f"pad index dimension {pad_index.d} != encoder dimension {encoder.dim}")
        self.inner = inner
        self.encoder = encoder
        self._margin = int(inner.config.rescore_margin)  # the real search asks for k + margin
        self.pad_index = pad_index
        self._scan = FlatScan(pad_index)  # the same path as the real exact retriever
        self.pad = int(pad_index.ntotal)
        self.corpus = inner.corpus
        self.kind = f"{inner.kind}+pad{self.pad}"
        self.label = label or emulated_label(len(inner.corpus), self.pad)
        self._lock = threading.Lock()
        self.pad_searches = 0
        self.pad_queries = 0
        self.pad_seconds = 0.0

    def search_sync(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        import time

        hits = self.inner.search_sync(queries, k)
        if queries:
            q = self.encoder.encode_queries(list(queries))  # cached by the real search just above
            t = time.perf_counter()
            self._scan.search(q, min(k + self._margin, self.pad))  # the extra work; result discarded
            dt = time.perf_counter() - t
            with self._lock:
                self.pad_searches += 1
                self.pad_queries += len(queries)
                self.pad_seconds += dt
        return hits

    def calibrate(self, sizes: Sequence[int] | None = None) -> None:
        """Time the pad scan's two batch paths before any request (``calibrate_pad_scan``)."""
        calibrate_pad_scan(self._scan, self._margin, self.pad, sizes)

    def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        return self.inner.score(query, doc_ids)

    def close(self) -> None:
        self.inner.close()


def calibrate_pad_scan(scan: FlatScan, margin: int, pad: int, sizes: Sequence[int] | None = None) -> None:
    """Time a pad scan's two batch paths (``FlatScan.calibrate``) for ``sizes`` (default
    ``CALIBRATED_BATCHES``) before any request: OS^3 then prices each verification batch from
    the path the scan keeps, at the engine's default top-k (``prefetch``) + the re-scoring
    ``margin``, as a padded search asks. Takes a few seconds at 1M vectors, one thread."""
    scan.calibrate(CALIBRATED_BATCHES if sizes is None else sizes, min(SpeculationConfig().prefetch + margin, pad))


def emulate_larger_knowledge_base(retriever: Retriever, pad: int, seed: int = 0, log=None) -> Retriever:
    """``retriever`` itself for ``pad`` = 0, else the EMULATED larger exact knowledge base
    (``PaddedCostRetriever`` over ``pad`` synthetic vectors; labelled by its ``label``). The
    knowledge-base opener (``retrieval/open.py``) applies ``RetrievalConfig.emulate_pad`` with it;
    the config has checked the pad (>= 0, exact only)."""
    if not pad:
        return retriever
    if log is not None:
        log(f"building the EMULATION pad: {pad:,} synthetic vectors ...")
    padded = PaddedCostRetriever(retriever, build_pad_index(pad, retriever.encoder.dim, seed=seed))
    if log is not None:
        log(f"timing the pad's scan paths for batches of {CALIBRATED_BATCHES[0]}-{CALIBRATED_BATCHES[-1]} ...")
    padded.calibrate()
    return padded


def emulated_label(real: int, pad: int) -> str:
    """How an emulated knowledge base is named in every table and plot."""
    return f"EMULATED {real + pad:,} (real {real:,} + {pad:,} synthetic, flat-scan cost only)"


def real_label(real: int) -> str:
    return f"real {real:,} passages"


class PaddedShard:
    """One knowledge-base shard (``shard_index.DenseShard``) + the real cost of scanning ``pad``
    synthetic vectors per search (EMULATION, as ``PaddedCostRetriever`` does for a whole index):
    answers and scores are the real shard's, unchanged; after each search, a real flat scan of
    the same query vectors over the shard's pad is run and thrown away. An N-shard EMULATED
    knowledge base gives each shard 1/N of the pad, so every shard scans as much as a real
    shard of the emulated size would (``experiments/shards.py``)."""

    def __init__(self, inner, pad_index, margin: int):
        if pad_index.d != inner.dim:
            raise ConfigError(f"pad index dimension {pad_index.d} != shard dimension {inner.dim}")
        self.inner = inner
        self.kind = inner.kind
        self.range = inner.range
        self.pad = int(pad_index.ntotal)
        self._margin = int(margin)
        self._scan = FlatScan(pad_index)

    def calibrate(self, sizes: Sequence[int] | None = None) -> None:
        """Time the shard pad's two batch paths before any search (``calibrate_pad_scan``), as the
        in-process EMULATED knowledge base does: a shard's first searches of a new batch size are
        then not the slower path's trials."""
        calibrate_pad_scan(self._scan, self._margin, self.pad, sizes)

    def search(self, payloads: np.ndarray, k: int) -> list[list[Hit]]:
        hits = self.inner.search(payloads, k)
        if len(payloads):
            self._scan.search(np.ascontiguousarray(payloads, dtype=np.float32), min(k + self._margin, self.pad))
        return hits

    def score(self, payload: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
        return self.inner.score(payload, doc_ids)
