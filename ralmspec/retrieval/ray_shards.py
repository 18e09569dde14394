"""Knowledge-base shards as Ray actors: the mechanism behind ``ralmspec serve --shards N``.

Policy (exact merge, routing of ``score``) lives in ``sharded.py``; the shard's arithmetic in
``shard_index.py``. This module places one actor per shard and sends each search to every
actor; ``ralmspec.cluster`` starts or joins Ray and turns every Ray failure into ``RetrievalError``.

- **One actor per shard** (``ShardActor``) loads its shard folder (``load_shard``) from a path
  that must be readable on the host it lands on (a shared filesystem, or the same folder copied
  to every host). Actors are spread over the cluster's nodes (``SPREAD``), run ``threads``
  FAISS/torch threads each, and answer ``max_concurrency`` calls at once (a ``score`` of a few
  cached docs need not wait behind a batched search).
- **Queries are encoded once, in the caller** (``sharded.DenseCodec``): the MiniLM model is not
  copied into every actor, every shard receives the very same float32 vector (the encoder's
  one-query-at-a-time batch invariance holds once, in one place), and the encoder's LRU cache,
  which the engine warms on its worker, serves every shard. BM25 shards receive token strings.
- **Faults**: a shard actor that dies (killed, OOM, host lost) fails the calls it had in flight
  with ``RetrievalError`` naming the shard; Ray restarts it (``max_restarts``; it reloads its
  folder), and the next call to that shard first waits (within ``start_timeout_s``) until the
  new actor answers, so the requests after a failure succeed. No retry of a failed call here: the engine
  already retries a failed verification (``retrieval_retries``) and, when it keeps failing,
  answers HTTP 503 without releasing an unverified token. A call that takes longer than
  ``call_timeout_s`` is a ``RetrievalError`` too.
- **Ray itself** (starting, joining, reusing a cluster; actor groups, restarts, errors):
  ``ralmspec.cluster``, shared with the kNN-LM datastore shards and the LM replicas.
- **EMULATED pad** (``RetrievalConfig.emulate_pad``): split over the shards, each actor builds
  its part (``emulated.PaddedShard``); it is never sent over the wire.

Ray is an optional dependency: without it every entry point raises ``ConfigError`` saying how to
install it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ralmspec.cluster import RayCluster, RayShardConfig, RayShardGroup, ShardActorBase, import_ray
from ralmspec.config import RetrievalConfig
from ralmspec.errors import ConfigError
from ralmspec.retrieval.base import Hit
from ralmspec.retrieval.emulated import PaddedShard, build_pad_index
from ralmspec.retrieval.encoder import QueryEncoder
from ralmspec.retrieval.shard_index import (
    load_corpus_checked, load_shard, make_codec, open_sharded_manifest, shard_ranges,
)
from ralmspec.retrieval.sharded import ShardedRetriever, ShardRange


class ShardActor(ShardActorBase):
    """The body of one knowledge-base shard actor (wrapped with ``ray.remote`` by ``RayShards``)."""

    def __init__(self, shard_dir: str, config: RetrievalConfig, threads: int, latency_s: float = 0.0,
                 pad: int = 0, pad_seed: int = 0, malloc_trim_s: float = 0.0):
        self._setup(threads if config.kind != "bm25" else 0, latency_s, malloc_trim_s)
        self.shard = load_shard(shard_dir, config)
        if pad:  # EMULATED larger shard (emulated.PaddedShard): the pad is made here, never sent
            self.shard = PaddedShard(self.shard, build_pad_index(pad, self.shard.dim, seed=pad_seed),
                                     config.rescore_margin)
            self.shard.calibrate()


class RayShards(RayShardGroup):
    """``ShardBackend`` over one Ray actor per knowledge-base shard (module doc)."""

    what = "knowledge-base shard"
    role = "kb_shard"

    def __init__(self, shard_dirs: Sequence[str], ranges: Sequence[ShardRange], config: RetrievalConfig,
                 ray_config: RayShardConfig, cluster: RayCluster):
        n, pad = len(shard_dirs), config.emulate_pad
        pads = [pad // n + (1 if i < pad % n else 0) for i in range(n)]
        self._start(ShardActor, [(d, config, ray_config.threads, ray_config.emulated_latency_s, pads[i], i,
                                  ray_config.malloc_trim_s)
                                 for i, d in enumerate(shard_dirs)], ranges, ray_config, cluster)

    def search(self, payloads: Any, k: int) -> list[list[list[Hit]]]:
        return self._fan_out("search", payloads, k)

    def score(self, calls: Sequence[tuple[int, Any, np.ndarray]]) -> list[np.ndarray]:
        return self._routed("score", calls)


def open_ray_sharded(index_dir: str, config: RetrievalConfig, ray_config: RayShardConfig | None = None,
                     encoder: QueryEncoder | None = None, shards: int | None = None) -> ShardedRetriever:
    """The sharded index at ``index_dir`` with every shard in a Ray actor (module doc).

    ``shards``, if given, must equal the index's number of shards; ``config.emulate_pad``
    synthetic vectors (EMULATED) are split over the shards. The caller holds the corpus
    text and encodes queries; raises ConfigError without Ray, RetrievalError if a shard cannot
    start. If this call connects to Ray (nothing connected yet), ``close()`` of the returned
    retriever also disconnects (and stops a local cluster): a process opening several sharded
    knowledge bases should connect first (``RayCluster``) and close that last.
    """
    ray_config = ray_config or RayShardConfig()
    import_ray()
    index_dir, m = open_sharded_manifest(index_dir, config)
    ranges = shard_ranges(m)
    if shards is not None and shards != len(ranges):
        raise ConfigError(f"--shards {shards} but the index at {index_dir} has {len(ranges)} shards; "
                          f"build one with: ralmspec index build --retriever {m['kind']} --shards {shards} --out DIR")
    codec = make_codec(m, config, encoder)
    corpus = load_corpus_checked(index_dir, m)
    cluster = RayCluster(ray_config)
    try:
        backend = RayShards([os.path.join(index_dir, s["dir"]) for s in m["shards"]], ranges, config, ray_config,
                            cluster)
    except BaseException:
        cluster.close()
        raise
    r = ShardedRetriever(corpus, m["kind"], backend, codec)
    r.index_dir = index_dir
    return r
