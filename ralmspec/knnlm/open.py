"""One place to open a kNN-LM datastore: what ``KNNLM`` and ``SpeculativeKNNLM`` search.

``open_datastore(path, ray=..., shards=...)`` reads the folder's manifest and decides:

- a **whole** datastore (``datastore.load_datastore``) opens in this process;
- a **sharded** one (``sharded.py``) opens with every shard in this process, or, with ``ray``
  (``ralmspec knnlm ... --shards N`` / ``--ray-address``), one Ray actor per shard;
- the search parameters (``nprobe``, ``ef_search``, ``rescore_margin``, ``gemm_min_batch``;
  None: the manifest's) apply to whichever it is.

``warm_datastore(ds, k)`` runs the searches a speculative request makes first, so that a server's
first request does not pay the datastore's first-use costs inside its measurements.

The tokens are the same either way (tested). The knowledge bases of document-level RaLM have
their own opener, ``ralmspec.retrieval.open`` (another manifest, another config); the two share
the Ray machinery of ``ralmspec.cluster``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ralmspec.cluster import RayShardConfig
from ralmspec.config import is_int
from ralmspec.errors import ConfigError
from ralmspec.knnlm.datastore import Datastore, is_sharded_datastore, load_datastore
from ralmspec.knnlm.sharded import ShardedDatastore, open_ray_sharded_datastore, open_sharded_datastore


def open_datastore(path: str | os.PathLike, *, ray: RayShardConfig | None = None, shards: int | None = None,
                   nprobe: int | None = None, ef_search: int | None = None, rescore_margin: int | None = None,
                   gemm_min_batch: int | None = None) -> Datastore | ShardedDatastore:
    """The datastore at ``path``: whole, sharded in this process, or (``ray`` given) sharded on
    Ray. ``shards``, if given, must equal the folder's number of shards (a whole datastore has
    none). ``IndexNotFoundError`` for a missing or incomplete folder, ``ConfigError`` for a bad
    manifest, shard count or search parameter. Close a sharded one (``close()``) when done."""
    if shards is not None and not is_int(shards, 1):
        raise ConfigError(f"shards (--shards) must be an integer >= 1, got {shards!r}")
    search = dict(nprobe=nprobe, ef_search=ef_search, rescore_margin=rescore_margin, gemm_min_batch=gemm_min_batch)
    if ray is not None:
        return open_ray_sharded_datastore(path, ray, shards=shards, **search)
    if shards is not None or is_sharded_datastore(path):
        return open_sharded_datastore(path, shards=shards, **search)
    return load_datastore(path, **search)


def warm_datastore(ds: Datastore | ShardedDatastore, k: int) -> float:
    """One single-query and one batched search of stored keys (the naive step's and the
    verification's paths), so what a datastore builds on first use (a flat index's GEMM keys and
    key norms, the kernels' first calls; in every shard) is built now. Measured 2026-12-06 (100k
    x 128 flat, one thread): the first batched search 68-98 ms, the next ones ~10 ms; OS^3 took
    that first one for the cost of a verification and fell back to naive steps for the rest of
    the first request. Returns the seconds it took; the answers are not used."""
    t0 = time.perf_counter()
    rows = max(2, ds.params.gemm_min_batch)
    q = np.asarray(ds.key_vectors(np.arange(min(rows, ds.n))), dtype=np.float32)
    ds.search(q[:1], k)
    ds.search(q, k)
    return time.perf_counter() - t0
