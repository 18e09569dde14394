"""A kNN-LM datastore split into shards (contiguous entry-id ranges), in-process or as Ray actors.

A :class:`ShardedDatastore` is a drop-in for :class:`~ralmspec.knnlm.datastore.Datastore` as
:class:`~ralmspec.knnlm.model.KNNLM` and :class:`~ralmspec.knnlm.speculative.SpeculativeKNNLM`
use it (``search``, ``distances``, ``key_vectors``, ``doc_end``, ``successors``, ``values``,
``n``, ``dim``, ``manifest``, ``model_name``, ``describe``), so kNN-LM decoding over shards is
token-identical to decoding over the whole datastore (tested).

Where things live
-----------------
- **Shards** hold the bulk: the keys (``d`` x 2 or 4 bytes per entry) and the search index.
  Shard ``i`` is an ordinary datastore folder over entries ``[start, stop)`` with LOCAL ids
  ``0..size-1`` (``shard-00i/``: keys, values, doc offsets cut at the shard's edges, manifest with
  ``"shard": {"start", "stop"}``, and ``index.faiss`` for approximate kinds), loaded by
  :func:`~ralmspec.knnlm.datastore.load_datastore` in its own process (Ray) or in this one.
- **The caller** (the decoding process) keeps the entry -> next-token ``values`` (int32, 4 bytes
  per entry, memory-mapped) and the document boundaries ``doc_offsets`` (8 bytes per document):
  the decoder reads the values of the ``k`` neighbours at every token, and documents cross shard
  edges (the successors ``i+1..i+m`` of a shard's last entries are in the next shard), so both
  are global. ``doc_end`` and ``successors`` are the whole datastore's functions of them.

Exactness
---------
- ``search`` sends the whole batch to every shard at once; each answers its canonical top-k
  (float64 squared L2 recomputed from its stored keys, ranked by distance then id) with global
  ids (local + start); :func:`~ralmspec.knnlm.datastore.rank_entries` over the union gives the
  global top-k. The order (distance asc, id asc) is total and an entry of the global top-k is in
  the top-k of its own shard, so for a **flat** (exact, certified) datastore the answer is the
  unsharded one: same ids, order and float64 distances (a distance is a function of the query
  and the one stored key, bit for bit).
- **ivf**: every shard gets a copy of the whole index's trained quantizer (and PQ codebooks)
  and each entry stays in its inverted list, so a query probes the same lists in every shard.
  The merged answer is the exact top-k of the probed entries whenever the unsharded candidate
  list (``k + rescore_margin`` by float32 distance) holds it, i.e. equal in practice (tested
  on the test datastore), not certified. **hnsw**: one graph per shard (same parameters); the
  answer is the exact merge of the shards' approximate answers and can differ.
- ``key_vectors`` / ``distances`` go to each id's own shard (``route_ids``) and come back in the
  caller's order: the speculation cache ranks with the numbers ``search`` reports.

Faults: a Ray shard that dies or times out fails the whole call with ``RetrievalError`` naming
it (never a partial merge); Ray restarts it and the next call waits for it (``ralmspec.cluster``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from ralmspec.cluster import RayCluster, RayShardConfig, RayShardGroup, ShardActorBase, import_ray
from ralmspec.config import is_int
from ralmspec.errors import ConfigError, IndexNotFoundError
from ralmspec.knnlm.datastore import (
    MANIFEST, Datastore, DatastoreBuildConfig, DatastoreLayout, SearchParams, check_queries, is_sharded_datastore,
    load_datastore, load_entries_array, make_faiss_index, prepare_out_dir, rank_entries, read_datastore_manifest,
    search_params,
)
from ralmspec.paths import link_or_copy, staged_folder
from ralmspec.retrieval.shard_index import ivf_list_of_ids
from ralmspec.retrieval.sharded import ShardRange, check_ranges, contiguous_ranges, route_ids

ROUTER_FILES = ("values.npy", "doc_offsets.npy")  # the whole datastore's, kept by the caller
_COPY_ROWS = 65536


# ---------------------------------------------------------------------------------- split


def _shard_index(kind: str, part32: np.ndarray, r: ShardRange, whole_ivf: Any, lists: np.ndarray | None,
                 info: dict[str, Any]) -> Any:
    """The FAISS index of one shard (None for flat: rebuilt from the keys at load)."""
    import faiss

    if kind == "flat":
        return None
    if kind == "ivf":  # the whole index's trained quantizer (+ PQ), each entry in its own list
        index = faiss.clone_index(whole_ivf)
        local = np.arange(r.size, dtype=np.int64)
        faiss.extract_index_ivf(index).add_core(r.size, faiss.swig_ptr(part32), faiss.swig_ptr(local),
                       faiss.swig_ptr(np.ascontiguousarray(lists[r.start:r.stop])))
        return index
    cfg = DatastoreBuildConfig(index="hnsw", hnsw_m=int(info.get("m", 32)),
                               hnsw_ef_construction=int(info.get("ef_construction", 64)),
                               hnsw_ef_search=int(info.get("ef_search", 64)))
    return make_faiss_index("hnsw", part32, cfg)[0]


def shard_datastore(src: str | os.PathLike, out_dir: str | os.PathLike, shards: int, *,
                    overwrite: bool = False) -> Path:
    """Split the (unsharded) datastore at ``src`` into ``shards`` contiguous entry-id ranges of
    near-equal size at ``out_dir`` (written aside and moved into place). Returns ``out_dir``."""
    import faiss

    src_p = Path(src)
    if is_sharded_datastore(src_p):
        raise ConfigError(f"{str(src_p)!r} is already sharded; split the whole datastore it came from")
    s = load_datastore(src_p, with_index=False)
    if is_int(shards, s.n + 1):
        raise ConfigError(f"cannot cut a datastore of {s.n} entries into {shards} non-empty shards")
    ranges = contiguous_ranges(s.n, shards)
    out = Path(out_dir)
    prepare_out_dir(out, overwrite)
    kind = s.index_kind
    whole_ivf = lists = None
    if kind == "ivf":
        whole_ivf = faiss.read_index(str(src_p / "index.faiss"))
        lists = ivf_list_of_ids(faiss.extract_index_ivf(whole_ivf), str(src_p))
        whole_ivf.reset()  # keep the trained quantizer (and PQ codebooks), drop the entries
    t0 = time.perf_counter()
    with staged_folder(out, f".{out.name}.shard-") as tmp:
        for name in ROUTER_FILES:
            link_or_copy(str(src_p / name), str(tmp / name))
        entries = []
        for i, r in enumerate(ranges):
            d = tmp / f"shard-{i:03d}"
            d.mkdir()
            keys = np.lib.format.open_memmap(d / "keys.npy", mode="w+", dtype=s.keys.dtype, shape=(r.size, s.dim))
            for a in range(r.start, r.stop, _COPY_ROWS):
                b = min(r.stop, a + _COPY_ROWS)
                keys[a - r.start:b - r.start] = s.keys[a:b]
            keys.flush()
            np.save(d / "values.npy", s.values[r.start:r.stop])
            inner = s.doc_offsets[(s.doc_offsets > r.start) & (s.doc_offsets < r.stop)] - r.start
            local_offsets = np.concatenate([[0], inner, [r.size]]).astype(np.int64)
            np.save(d / "doc_offsets.npy", local_offsets)
            part32 = np.ascontiguousarray(np.asarray(keys, dtype=np.float32))
            del keys
            index = _shard_index(kind, part32, r, whole_ivf, lists, s.manifest["index"])
            if index is not None:
                faiss.write_index(index, str(d / "index.faiss"))
            del part32, index
            shard_manifest = dict(s.manifest, count=r.size, documents=int(local_offsets.size - 1),
                                  shard={"index": i, "start": r.start, "stop": r.stop, "of": s.n})
            (d / MANIFEST).write_text(json.dumps(shard_manifest, indent=2))
            entries.append({"dir": d.name, "start": r.start, "stop": r.stop})
        manifest = dict(s.manifest, shards=entries, sharded_from={"path": str(s.path), "count": s.n},
                        shard_s=round(time.perf_counter() - t0, 3))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


# ---------------------------------------------------------------------------------- shards


class DatastoreShard:
    """One shard in a process: a datastore over entries ``[start, stop)``; global ids in and out."""

    def __init__(self, ds: Datastore):
        sh = ds.manifest.get("shard") or {}
        try:
            self.range = ShardRange(int(sh["start"]), int(sh["stop"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{str(ds.path)!r} is not a datastore shard (no valid \"shard\" range)") from exc
        if self.range.size != ds.n:
            raise ConfigError(f"datastore shard {str(ds.path)!r} holds {ds.n} entries, not {self.range.size}")
        self.ds = ds
        self.kind = f"knnlm-{ds.index_kind}"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """This shard's canonical top-min(k, size) of every query, with global ids."""
        ids, d = self.ds.search(queries, min(int(k), self.ds.n))
        return ids + self.range.start, d

    def key_vectors(self, ids: np.ndarray) -> np.ndarray:
        return self.ds.key_vectors(np.asarray(ids, dtype=np.int64) - self.range.start)

    def distances(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return self.ds.distances(query, np.asarray(ids, dtype=np.int64) - self.range.start)


def load_datastore_shard(shard_dir: str | os.PathLike, overrides: dict[str, Any] | None = None) -> DatastoreShard:
    return DatastoreShard(load_datastore(shard_dir, **(overrides or {})))


class DatastoreShardBackend(Protocol):
    """How the shards are reached (in-process or Ray). Any failure raises ``RetrievalError``."""

    ranges: tuple[ShardRange, ...]

    def search(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per shard, ``(global ids [b, k_s], distances [b, k_s])`` of the whole batch."""

    def key_vectors(self, calls: Sequence[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        """For each ``(shard, global ids)``, the float64 keys of those ids."""

    def distances(self, calls: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """For each ``(shard, query, global ids)``, the canonical distances of those ids."""

    def close(self) -> None:
        """Release the shards (idempotent)."""


class LocalDatastoreShards:
    """Every shard loaded in this process (no Ray): the reference the Ray backend must equal."""

    def __init__(self, shards: Sequence[DatastoreShard]):
        self.shards = list(shards)
        self.ranges = tuple(s.range for s in self.shards)

    def search(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [s.search(queries, k) for s in self.shards]

    def key_vectors(self, calls: Sequence[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        return [self.shards[i].key_vectors(ids) for i, ids in calls]

    def distances(self, calls: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        return [self.shards[i].distances(q, ids) for i, q, ids in calls]

    def close(self) -> None:
        self.shards = []


class DatastoreShardActor(ShardActorBase):
    """The body of one datastore shard actor: ``cluster.ShardActorBase``'s ``info`` / ``search``
    (threads, EMULATED latency) over a :class:`DatastoreShard`, plus the per-entry lookups."""

    def __init__(self, shard_dir: str, threads: int, latency_s: float = 0.0,
                 overrides: dict[str, Any] | None = None, malloc_trim_s: float = 0.0):
        self._setup(threads, latency_s, malloc_trim_s)
        self.shard = load_datastore_shard(shard_dir, overrides)

    def key_vectors(self, ids: np.ndarray) -> np.ndarray:
        return self.shard.key_vectors(ids)

    def distances(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        self._thread_setup()
        return self.shard.distances(query, ids)


class RayDatastoreShards(RayShardGroup):
    """One Ray actor per datastore shard (``cluster.RayShardGroup``: start, restart, errors)."""

    what = "kNN-LM datastore shard"
    role = "datastore_shard"

    def __init__(self, shard_dirs: Sequence[str], ranges: Sequence[ShardRange], ray_config: RayShardConfig,
                 cluster: RayCluster, overrides: dict[str, Any] | None = None):
        self._start(DatastoreShardActor, [(d, ray_config.threads, ray_config.emulated_latency_s, overrides,
                                           ray_config.malloc_trim_s)
                                          for d in shard_dirs], ranges, ray_config, cluster)

    def search(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return self._fan_out("search", queries, k)

    def key_vectors(self, calls: Sequence[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        return self._routed("key_vectors", calls)

    def distances(self, calls: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        return self._routed("distances", calls)


# ---------------------------------------------------------------------------------- datastore


class ShardedDatastore(DatastoreLayout):
    """A datastore over shards: searches fan out and merge exactly, per-entry lookups go to each
    entry's shard (module doc). Same interface as ``Datastore`` for the kNN-LM decoders; the
    document structure (``doc_end``, ``successors``) is the whole datastore's, kept here."""

    def __init__(self, path: Path, manifest: dict, values: np.ndarray, doc_offsets: np.ndarray,
                 backend: DatastoreShardBackend, params: SearchParams):
        super().__init__(path, manifest, values, doc_offsets, params)
        self.backend = backend
        self.n_shards = len(backend.ranges)
        check_ranges(backend.ranges, self.n)

    def _routed(self, method: str, ids: Any, width: int | None, *args: Any) -> np.ndarray:
        """``method`` of each id's shard, put back in the order of ``ids``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        shape = (ids.size,) if width is None else (ids.size, width)
        out = np.empty(shape, dtype=np.float64)
        if ids.size == 0:
            return out
        if ids.min() < 0 or ids.max() >= self.n:
            raise ConfigError(f"entry ids must be in [0, {self.n}), got {int(ids.min())}..{int(ids.max())}")
        routes = route_ids(ids, self.backend.ranges)
        got = getattr(self.backend, method)([(s, *args, gids) for s, _pos, gids in routes])
        for (_s, pos, _gids), part in zip(routes, got):
            out[pos] = part
        return out

    def key_vectors(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Stored keys of ``ids`` as float64 ``[len(ids), d]``, each from its own shard."""
        return self._routed("key_vectors", ids, self.dim)

    def distances(self, query: np.ndarray, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Canonical float64 squared L2 distances of ``ids`` to ``query`` (each entry's own shard)."""
        return self._routed("distances", ids, None, np.asarray(query, dtype=np.float64).reshape(-1))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Canonical k-NN over every shard: ``(ids int64 [n, k], distances float64 [n, k])``."""
        q, k = check_queries(queries, k, self.dim, self.n)
        parts = self.backend.search(q, k)
        ids = np.concatenate([p[0] for p in parts], axis=1)
        dists = np.concatenate([p[1] for p in parts], axis=1)
        out_ids = np.empty((q.shape[0], k), dtype=np.int64)
        out_d = np.empty((q.shape[0], k), dtype=np.float64)
        for r in range(q.shape[0]):
            out_ids[r], out_d[r] = rank_entries(ids[r], dists[r], k)
        return out_ids, out_d

    def describe(self) -> dict:
        return super().describe() | {"shards": self.n_shards,
                                     "backend": "ray" if isinstance(self.backend, RayDatastoreShards) else "local"}

    def close(self) -> None:
        self.backend.close()


# ---------------------------------------------------------------------------------- opening


def _open_manifest(path: str | os.PathLike, shards: int | None) -> tuple[Path, dict[str, Any], tuple[ShardRange, ...]]:
    p = Path(path).absolute()
    if not p.is_dir():
        raise IndexNotFoundError(f"kNN-LM datastore {str(p)!r} not found; build one with "
                                 "`ralmspec knnlm build --shards N --out DIR`")
    if not is_sharded_datastore(p):
        if (p / MANIFEST).is_file():
            raise ConfigError(f"{str(p)!r} is not a sharded datastore; split it with: ralmspec knnlm build "
                              f"--shards {shards or 'N'} --from-datastore {p} --out DIR")
        raise IndexNotFoundError(f"{str(p)!r} is not a kNN-LM datastore (no {MANIFEST})")
    m = read_datastore_manifest(p)
    try:
        ranges = tuple(ShardRange(int(s["start"]), int(s["stop"])) for s in m["shards"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the shard list of {str(p / MANIFEST)!r} is invalid; re-shard the datastore") from exc
    if shards is not None and shards != len(ranges):
        raise ConfigError(f"--shards {shards} but the datastore at {p} has {len(ranges)} shards; make one with: "
                          f"ralmspec knnlm build --shards {shards} --from-datastore WHOLE_DATASTORE --out DIR")
    missing = [f for f in ROUTER_FILES if not (p / f).is_file()]
    if missing:
        raise IndexNotFoundError(f"sharded datastore {str(p)!r} is incomplete (missing {', '.join(missing)})")
    return p, m, ranges


def _assemble(p: Path, m: dict[str, Any], backend: DatastoreShardBackend,
              overrides: dict[str, Any]) -> ShardedDatastore:
    try:
        values = load_entries_array(p / "values.npy", "iu", mmap=True)
        doc_offsets = load_entries_array(p / "doc_offsets.npy", "iu")
        if values.shape != (m.get("count"),) or doc_offsets.ndim != 1 or doc_offsets.size < 1 \
                or doc_offsets[0] != 0 or doc_offsets[-1] != values.shape[0]:
            raise ConfigError(f"sharded datastore {str(p)!r} is inconsistent (values {values.shape}, manifest "
                              f"count {m.get('count')}); re-shard it")
        return ShardedDatastore(p, m, values, doc_offsets, backend, search_params(m, **overrides))
    except BaseException:
        backend.close()
        raise


def _overrides(nprobe: int | None, ef_search: int | None, rescore_margin: int | None,
               gemm_min_batch: int | None) -> dict[str, Any]:
    return {k: v for k, v in dict(nprobe=nprobe, ef_search=ef_search, rescore_margin=rescore_margin,
                                  gemm_min_batch=gemm_min_batch).items() if v is not None}


def open_sharded_datastore(path: str | os.PathLike, *, shards: int | None = None, nprobe: int | None = None,
                           ef_search: int | None = None, rescore_margin: int | None = None,
                           gemm_min_batch: int | None = None) -> ShardedDatastore:
    """The sharded datastore at ``path`` with every shard loaded in this process (no Ray)."""
    p, m, _ranges = _open_manifest(path, shards)
    ov = _overrides(nprobe, ef_search, rescore_margin, gemm_min_batch)
    search_params(m, **ov)  # invalid overrides fail before any shard loads
    backend = LocalDatastoreShards([load_datastore_shard(p / s["dir"], ov) for s in m["shards"]])
    return _assemble(p, m, backend, ov)


def open_ray_sharded_datastore(path: str | os.PathLike, ray_config: RayShardConfig | None = None, *,
                               shards: int | None = None, nprobe: int | None = None, ef_search: int | None = None,
                               rescore_margin: int | None = None,
                               gemm_min_batch: int | None = None) -> ShardedDatastore:
    """The sharded datastore at ``path`` with every shard in a Ray actor.

    ``shards``, if given, must equal the datastore's number of shards. ConfigError without Ray,
    RetrievalError if a shard cannot start. If this call connects to Ray, ``close()`` of the
    returned datastore also disconnects (and stops a local cluster it started).
    """
    ray_config = ray_config or RayShardConfig()
    import_ray()
    p, m, ranges = _open_manifest(path, shards)
    ov = _overrides(nprobe, ef_search, rescore_margin, gemm_min_batch)
    search_params(m, **ov)
    cluster = RayCluster(ray_config)
    try:
        backend = RayDatastoreShards([str(p / s["dir"]) for s in m["shards"]], ranges, ray_config, cluster, ov)
    except BaseException:
        cluster.close()
        raise
    return _assemble(p, m, backend, ov)


__all__ = ["ShardedDatastore", "DatastoreShard", "LocalDatastoreShards", "RayDatastoreShards", "shard_datastore",
           "open_sharded_datastore", "open_ray_sharded_datastore", "is_sharded_datastore", "load_datastore_shard"]
