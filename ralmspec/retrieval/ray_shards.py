"""Knowledge-base shards as Ray actors: the mechanism behind ``ralmspec serve --shards N``.

Policy (exact merge, routing of ``score``) lives in ``sharded.py``; the shard's arithmetic in
``shard_index.py``. This module only starts or joins Ray, places one actor per shard, sends
each search to every actor, and turns every Ray failure into ``RetrievalError``.

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
  folder), and the next call to that shard first waits (within its timeout) until the new actor
  answers, so the requests after a failure succeed. No retry of a failed call here: the engine
  already retries a failed verification (``retrieval_retries``) and, when it keeps failing,
  answers HTTP 503 without releasing an unverified token. A call that takes longer than
  ``call_timeout_s`` is a ``RetrievalError`` too.
- **Ray itself**: with no ``address``, a local cluster is started in this process with a bounded
  number of CPUs, no dashboard, no usage reporting, and every Ray socket on 127.0.0.1; with an
  ``address`` (``ray start --head`` elsewhere) this process joins that cluster. ``RayCluster``
  remembers whether it connected, and only then disconnects (shutting down a cluster it started).
  If Ray is already initialised in this process (tests), it is used as it is.

Ray is an optional dependency (``pip install -e ".[ray]"``): nothing here imports it at module
import time, and without it every entry point raises ``ConfigError`` saying how to install it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ralmspec.config import RetrievalConfig
from ralmspec.errors import ConfigError, RetrievalError
from ralmspec.retrieval.base import Hit
from ralmspec.retrieval.encoder import QueryEncoder
from ralmspec.retrieval.sharded import ShardedRetriever, ShardRange

log = logging.getLogger(__name__)

RAY_INSTALL_HINT = 'pip install -e ".[ray]"'
RESTART_POLL_S = 0.05


def import_ray() -> Any:
    """The ``ray`` module, or ConfigError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"sharded knowledge bases run on Ray, which is not installed here: {RAY_INSTALL_HINT} "
                          "(or serve without --shards / --ray-address)") from e
    return ray


def ray_available() -> bool:
    try:
        import_ray()
    except ConfigError:
        return False
    return True


@dataclass(frozen=True)
class RayShardConfig:
    """Where the shard actors run and how they are called."""

    address: str | None = None  # an existing cluster ("HOST:PORT" of `ray start --head`, or "auto"); None: start one
    num_cpus: int = 2  # CPUs of the local cluster started when address is None
    object_store_mb: int = 256  # object store of that local cluster (shard answers are small)
    actor_cpus: float = 0.0  # CPUs Ray reserves per shard actor (placement only; 0 packs any number per host)
    threads: int = 1  # FAISS / torch threads inside each shard actor
    max_concurrency: int = 2  # calls one shard actor serves at once (threads)
    max_restarts: int = 16  # times Ray restarts a dead shard actor (-1: forever)
    call_timeout_s: float = 30.0  # one fan-out (all shards) must answer within this
    start_timeout_s: float = 180.0  # every actor must have loaded its shard within this
    emulated_latency_s: float = 0.0  # EMULATED extra latency of every shard search (experiments, fault tests)
    emulate_pad: int = 0  # EMULATED: synthetic vectors scanned per search, split over the shards (dense only)

    def __post_init__(self) -> None:
        if self.num_cpus < 1 or self.threads < 1 or self.max_concurrency < 1 or self.object_store_mb < 80:
            raise ConfigError("num_cpus, threads and max_concurrency must be >= 1 and object_store_mb >= 80")
        if self.actor_cpus < 0 or self.emulated_latency_s < 0 or self.emulate_pad < 0 or self.max_restarts < -1:
            raise ConfigError("actor_cpus, emulated_latency_s and emulate_pad must be >= 0, max_restarts >= -1")
        if self.call_timeout_s <= 0 or self.start_timeout_s <= 0:
            raise ConfigError("timeouts must be > 0")


class RayCluster:
    """This process's connection to Ray (see module doc): start a loopback cluster, join one, or reuse."""

    def __init__(self, config: RayShardConfig):
        ray = import_ray()
        self.ray = ray
        self.owned = False  # True: this object called ray.init, so close() calls ray.shutdown()
        if ray.is_initialized():
            self.mode = "existing"
            return
        common = dict(include_dashboard=False, log_to_driver=False, configure_logging=False, namespace="ralmspec")
        if config.address:
            self.mode = f"joined {config.address}"
            ray.init(address=config.address, **common)
        else:
            self.mode = "local"
            _loopback_only()
            ray.init(num_cpus=config.num_cpus, object_store_memory=config.object_store_mb << 20,
                     _node_ip_address="127.0.0.1", **common)
        self.owned = True

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        self.owned = False


def _loopback_only() -> None:
    """Make the local cluster about to start listen on 127.0.0.1 only, and report nothing.

    Ray binds its GCS, raylet and workers to the node IP, which it resolves to the host's
    external address even when given 127.0.0.1, unless "clusters" are disabled (its own setting
    for laptops). Set for this process and the Ray processes it spawns (they inherit the
    environment). Only called when this process starts the cluster itself; it stays set for the
    life of the process (the Ray connection is process-wide anyway), so such a process should not
    later join a multi-host cluster.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # if ray was imported before the variable was set


class ShardActor:
    """The body of one shard actor (wrapped with ``ray.remote`` by ``RayShards``)."""

    def __init__(self, shard_dir: str, config: RetrievalConfig, threads: int, latency_s: float = 0.0,
                 pad: int = 0, pad_seed: int = 0):
        self._setup(threads if config.kind != "bm25" else 0, latency_s)
        from ralmspec.retrieval.shard_index import load_shard

        self.shard = load_shard(shard_dir, config)
        if pad:  # EMULATED larger shard (emulated.PaddedShard): the pad is made here, never sent
            from ralmspec.retrieval.emulated import PaddedShard, build_pad_index

            if config.kind == "bm25":
                raise ConfigError("an EMULATED pad is a flat scan of vectors: dense shards only")
            self.shard = PaddedShard(self.shard, build_pad_index(pad, self.shard.dim, seed=pad_seed),
                                     config.rescore_margin)

    def _setup(self, threads: int, latency_s: float) -> None:
        """Threads of this actor's searches (0: leave the libraries' defaults) and the EMULATED
        extra latency of each search. Shared with the kNN-LM datastore shard actor."""
        self.threads = threads
        if threads:
            _set_threads(threads)
        self.latency_s = latency_s

    def info(self) -> dict[str, Any]:
        import socket

        return {"kind": self.shard.kind, "start": self.shard.range.start, "stop": self.shard.range.stop,
                "pid": os.getpid(), "host": socket.gethostname()}

    def search(self, payloads: Any, k: int) -> list[list[Hit]]:
        if self.latency_s:
            time.sleep(self.latency_s)
        self._thread_setup()
        return self.shard.search(payloads, k)

    def score(self, payload: Any, doc_ids: np.ndarray) -> np.ndarray:
        self._thread_setup()
        return self.shard.score(payload, doc_ids)

    def _thread_setup(self) -> None:
        # OpenMP's thread count is per calling thread, and a threaded actor serves calls from a pool
        if self.threads:
            import faiss

            faiss.omp_set_num_threads(self.threads)


def _set_threads(n: int) -> None:
    """FAISS (this thread) and torch (process-wide: the batched exact scan) threads of a dense shard."""
    import faiss

    faiss.omp_set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - torch is only used by the flat GEMM path
        pass



def get_results(ray: Any, refs: Sequence[Any], which: Sequence[int], what: str, timeout_s: float,
                restarting: set[int], lock: threading.Lock, error: type[Exception], name: str,
                passthrough: tuple[type[Exception], ...] = ()) -> list[Any]:
    """Every result of ``refs`` (one call per actor of ``which``), in order, within ``timeout_s``
    in all; else the first failure as ``error`` naming the actor. An actor seen dead goes into
    ``restarting`` (the next call waits for Ray's restart: ``wait_restarted``). An exception the
    actor's code raised that is one of ``passthrough`` (and not ``error``) is re-raised as it is.
    Shared by the shard and LM actor groups."""
    deadline = time.monotonic() + timeout_s
    out = []
    for i, ref in zip(which, refs):
        try:
            out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
        except ray.exceptions.GetTimeoutError as e:
            raise error(f"{name} {i} did not answer {what} within {timeout_s:g} s") from e
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if passthrough and isinstance(cause, passthrough) and not isinstance(cause, error):
                raise cause from None
            raise error(f"{name} {i} failed ({what}): {cause!r}") from e
        except ray.exceptions.RayActorError as e:
            with lock:
                restarting.add(i)
            raise error(f"{name} {i} is down ({what}): {type(e).__name__}: {e}; Ray restarts it") from e
        except ray.exceptions.RayError as e:
            raise error(f"{name} {i} failed ({what}): {e}") from e
    return out


def wait_restarted(ray: Any, actors: Sequence[Any], which: Sequence[int], restarting: set[int],
                   lock: threading.Lock, timeout_s: float, error: type[Exception], what: str) -> None:
    """Block until every actor of ``which`` last seen dead (in ``restarting``) answers its
    ``info()`` again (Ray restarts it), then forget it; ``error`` past ``timeout_s`` or when
    the actor is dead for good (restarts exhausted). Shared by the shard and LM actor groups."""
    with lock:
        waiting = [i for i in which if i in restarting]
    deadline = time.monotonic() + timeout_s
    for i in waiting:
        while True:
            try:
                ray.get(actors[i].info.remote(), timeout=max(0.0, deadline - time.monotonic()))
                break
            except ray.exceptions.ActorDiedError as e:  # out of restarts: dead for good
                raise error(f"{what} {i} is dead (restarts exhausted)") from e
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                if time.monotonic() >= deadline:
                    raise error(f"{what} {i} did not come back in time") from e
                time.sleep(RESTART_POLL_S)
        with lock:
            restarting.discard(i)

class RayShardGroup:
    """One Ray actor per contiguous id range: start them, call them, and turn every Ray failure into
    ``RetrievalError`` naming the shard (module doc). The mechanism shared by the knowledge-base
    shards (``RayShards``) and the kNN-LM datastore shards (``knnlm.sharded.RayDatastoreShards``).
    ``close()`` kills the actors and disconnects from Ray if ``cluster`` started the connection."""

    what = "knowledge-base shard"  # how errors name one actor

    def _start(self, actor_cls: type, actor_args: Sequence[tuple], ranges: Sequence[ShardRange],
               ray_config: RayShardConfig, cluster: RayCluster) -> None:
        """Start ``actor_cls(*actor_args[i])`` for shard ``i``; wait until every one has loaded and
        holds the range it should (its ``info()`` reports ``start`` / ``stop``)."""
        if len(actor_args) != len(ranges) or not ranges:
            raise ConfigError("one shard folder per shard range is needed")
        ray = cluster.ray
        self.ray = ray
        self.cluster = cluster
        self.config = ray_config
        self.ranges = tuple(ranges)
        opts: dict[str, Any] = dict(max_restarts=ray_config.max_restarts, max_task_retries=0,
                                    num_cpus=ray_config.actor_cpus, max_concurrency=ray_config.max_concurrency,
                                    scheduling_strategy="SPREAD")
        self._lock = threading.Lock()
        self._restarting: set[int] = set()  # shards whose actor was seen dead (Ray restarts it)
        remote_cls = ray.remote(actor_cls)
        self.actors = [remote_cls.options(**opts).remote(*args) for args in actor_args]
        try:
            infos = self._get([a.info.remote() for a in self.actors], range(len(self.actors)), "start",
                              ray_config.start_timeout_s)
        except RetrievalError:
            self.close()
            raise
        for i, (info, r) in enumerate(zip(infos, self.ranges)):
            if (info["start"], info["stop"]) != (r.start, r.stop):
                self.close()
                raise ConfigError(f"shard {i} holds ids [{info['start']}, {info['stop']}) but the manifest says "
                                  f"[{r.start}, {r.stop}); re-shard it")
        self.infos = infos

    def _get(self, refs: list[Any], shards: Sequence[int], what: str, timeout_s: float | None = None) -> list[Any]:
        """Every result, in order; the first failure (naming its shard) as ``RetrievalError``.

        A shard whose call failed because its actor died is remembered as restarting: the next
        call to it first waits (within that call's timeout) until Ray has restarted it.
        """
        return get_results(self.ray, refs, shards, what,
                           timeout_s if timeout_s is not None else self.config.call_timeout_s,
                           self._restarting, self._lock, RetrievalError, self.what)

    def _wait_restarted(self, shards: Sequence[int]) -> None:
        """Wait for the shards last seen dead to be answering again (RetrievalError past the call timeout)."""
        wait_restarted(self.ray, self.actors, shards, self._restarting, self._lock,
                       self.config.call_timeout_s, RetrievalError, self.what)

    def _fan_out(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every shard at once; the answers in shard order (all or an error)."""
        everyone = range(len(self.actors))
        self._wait_restarted(everyone)
        # payloads are small (query vectors, token lists): Ray inlines them in each task
        return self._get([getattr(a, method).remote(*args) for a in self.actors], everyone, method)

    def _routed(self, method: str, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        """For each ``(shard, *args)`` of ``calls``, ``method(*args)`` on that shard, all at once."""
        shards = [c[0] for c in calls]
        self._wait_restarted(shards)
        return self._get([getattr(self.actors[c[0]], method).remote(*c[1:]) for c in calls], shards, method)

    def pids(self) -> list[int]:
        """Process id of every shard actor now (for fault tests and diagnostics)."""
        return [info["pid"] for info in self._fan_out("info")]

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone / Ray already shut down
                pass
        self.actors = []
        self.cluster.close()


class RayShards(RayShardGroup):
    """``ShardBackend`` over one Ray actor per knowledge-base shard (module doc)."""

    def __init__(self, shard_dirs: Sequence[str], ranges: Sequence[ShardRange], config: RetrievalConfig,
                 ray_config: RayShardConfig, cluster: RayCluster):
        n = len(shard_dirs)
        pads = [ray_config.emulate_pad // n + (1 if i < ray_config.emulate_pad % n else 0) for i in range(n)]
        self._start(ShardActor, [(d, config, ray_config.threads, ray_config.emulated_latency_s, pads[i], i)
                                 for i, d in enumerate(shard_dirs)], ranges, ray_config, cluster)

    def search(self, payloads: Any, k: int) -> list[list[list[Hit]]]:
        return self._fan_out("search", payloads, k)

    def score(self, calls: Sequence[tuple[int, Any, np.ndarray]]) -> list[np.ndarray]:
        return self._routed("score", calls)


def open_ray_sharded(index_dir: str, config: RetrievalConfig, ray_config: RayShardConfig | None = None,
                     encoder: QueryEncoder | None = None, shards: int | None = None) -> ShardedRetriever:
    """The sharded index at ``index_dir`` with every shard in a Ray actor (module doc).

    ``shards``, if given, must equal the index's number of shards. The caller holds the corpus
    text and encodes queries; raises ConfigError without Ray, RetrievalError if a shard cannot
    start. If this call connects to Ray (nothing connected yet), ``close()`` of the returned
    retriever also disconnects (and stops a local cluster): a process opening several sharded
    knowledge bases should connect first (``RayCluster``) and close that last.
    """
    from ralmspec.retrieval.shard_index import load_corpus_checked, make_codec, open_sharded_manifest, shard_ranges

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


def open_ray_knowledge_base(config: RetrievalConfig, shards: int | None, ray_config: RayShardConfig,
                            corpus_path: str | None = None, encoder: QueryEncoder | None = None,
                            show_progress: bool = True) -> ShardedRetriever:
    """What ``ralmspec serve --shards N`` opens: ``config.index_dir`` (a sharded index) if set,
    else the cached ``shards``-way split of ``corpus_path``'s index (or the embedded knowledge
    base's), built on first use."""
    import_ray()
    if config.index_dir:
        return open_ray_sharded(config.index_dir, config, ray_config, encoder, shards)
    if shards is None:
        raise ConfigError("--shards N is needed to build a sharded index (or give a sharded --index)")
    from ralmspec.data.loaders import default_corpus, load_corpus
    from ralmspec.retrieval.index import EMBEDDED_SOURCE, _default_encoder
    from ralmspec.retrieval.shard_index import ensure_sharded_index

    if config.kind != "bm25" and encoder is None:
        encoder = _default_encoder(config)
    if corpus_path:
        corpus, source = load_corpus(corpus_path), os.path.abspath(corpus_path)
    else:
        corpus, source = default_corpus(), EMBEDDED_SOURCE
    d = ensure_sharded_index(corpus, config.kind, shards, config, encoder, show_progress, corpus_source=source)
    return open_ray_sharded(d, config, ray_config, encoder, shards)
