"""Ray for ralmspec: connecting to a cluster, calling groups of actors, turning Ray failures into
ralmspec errors. Shared by the knowledge-base shards (``retrieval.ray_shards``), the kNN-LM
datastore shards (``knnlm.sharded``) and the LM replicas (``lm.ray_replicas``); it imports none
of them.

- **Ray itself** (``RayCluster``): with no ``address``, a local cluster is started in this
  process with a bounded number of CPUs, no dashboard, no usage reporting, and every Ray socket
  on 127.0.0.1; with an ``address`` (``ray start --head`` elsewhere) this process joins that
  cluster. ``RayCluster`` remembers whether it connected, and only then disconnects (shutting
  down a cluster it started). If Ray is already initialised in this process (tests), it is used
  as it is.
- **Actor groups** (``RayShardGroup``, ``get_results``, ``wait_restarted``): one actor per
  contiguous id range; every call fans out or is routed, all answers or the first failure as a
  typed error naming the actor. An actor that dies (killed, OOM, host lost) fails the calls it had
  in flight; Ray restarts it (``max_restarts``), and the next call to it first waits (within its
  timeout) until the new actor answers. No retry of a failed call here: the engine retries a
  failed verification itself.
- **Memory** (``actors_memory``): every actor trims its own C heap (``malloc_trim_s``,
  ``memory.HeapTrimmer``) and reports ``memory.process_memory`` from a concurrency group of its
  own (``STATS_GROUP``), so a server's ``/v1/stats`` reads it while the actor decodes or searches.

Ray is an optional dependency (``pip install -e ".[ray]"``): nothing here imports it at module
import time, and without it every entry point raises ``ConfigError`` saying how to install it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ralmspec.config import check_seconds
from ralmspec.errors import ConfigError, RetrievalError
from ralmspec.memory import HeapTrimmer, check_trim_interval, process_memory
from ralmspec.threads import set_threads

RAY_INSTALL_HINT = "pip install 'ralmspec[ray]' (from a checkout: pip install -e '.[ray]')"
RESTART_POLL_S = 0.05
STATS_GROUP = "stats"  # every actor's concurrency group for ``memory()``: one thread beside its calls


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
    """Where the shard actors run and how they are called (``address`` / ``num_cpus`` /
    ``object_store_mb``: the Ray cluster, for LM replicas too)."""

    address: str | None = None  # an existing cluster ("HOST:PORT" of `ray start --head`, or "auto"); None: start one
    num_cpus: int = 2  # CPUs of the local cluster started when address is None
    object_store_mb: int = 256  # object store of that local cluster (shard answers are small)
    actor_cpus: float = 0.0  # CPUs Ray reserves per shard actor (placement only; 0 packs any number per host)
    threads: int = 1  # FAISS / torch threads inside each shard actor
    max_concurrency: int = 2  # calls one shard actor serves at once (threads)
    max_restarts: int = 16  # times Ray restarts a dead shard actor (-1: forever)
    call_timeout_s: float = 30.0  # one fan-out (all shards) must answer within this
    start_timeout_s: float = 180.0  # every actor must have loaded its shard within this (at start and restart)
    emulated_latency_s: float = 0.0  # EMULATED extra latency of every shard search (experiments, fault tests)
    malloc_trim_s: float = 60.0  # seconds between C heap trims inside each shard actor (ralmspec/memory.py); 0: never

    def __post_init__(self) -> None:
        if self.num_cpus < 1 or self.threads < 1 or self.max_concurrency < 1 or self.object_store_mb < 80:
            raise ConfigError("num_cpus, threads and max_concurrency must be >= 1 and object_store_mb >= 80")
        check_trim_interval(self.malloc_trim_s)
        # written "not x >= 0" so that NaN (from a flag such as --shard-cpus nan) fails too
        if not (self.actor_cpus >= 0 and self.emulated_latency_s >= 0) or self.max_restarts < -1:
            raise ConfigError("actor_cpus and emulated_latency_s must be >= 0, max_restarts >= -1")
        check_seconds(self.call_timeout_s, "call_timeout_s")
        check_seconds(self.start_timeout_s, "start_timeout_s")


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


class ShardActorBase:
    """What every shard actor does besides loading its shard (``self.shard``, set by the
    subclass): its threads, the EMULATED extra latency of each search, its heap trims, ``info`` /
    ``search`` / ``score`` / ``memory``. Subclassed by the knowledge-base shard actor
    (``retrieval.ray_shards.ShardActor``) and the kNN-LM datastore shard actor
    (``knnlm.sharded.DatastoreShardActor``)."""

    shard: Any

    def _setup(self, threads: int, latency_s: float, malloc_trim_s: float = 0.0) -> None:
        """Threads of this actor's searches (0: leave the libraries' defaults), the EMULATED
        extra latency of each search, and the seconds between its heap trims (0: never)."""
        self.threads = threads
        if threads:
            set_threads(threads, blas=False)
        self.latency_s = latency_s
        # a shard actor lives as long as the server: its heap fragments like the server's would
        self.trimmer = HeapTrimmer(malloc_trim_s).start()

    def memory(self) -> dict[str, Any]:
        """This actor's process memory (``memory.process_memory``; call it in ``STATS_GROUP``)."""
        return process_memory(self.trimmer)

    def info(self) -> dict[str, Any]:
        import socket

        return {"kind": self.shard.kind, "start": self.shard.range.start, "stop": self.shard.range.stop,
                "pid": os.getpid(), "host": socket.gethostname(), "pad": int(getattr(self.shard, "pad", 0))}

    def search(self, payloads: Any, k: int) -> Any:
        if self.latency_s:
            time.sleep(self.latency_s)
        self._thread_setup()
        return self.shard.search(payloads, k)

    def score(self, payload: Any, doc_ids: Any) -> Any:
        self._thread_setup()
        return self.shard.score(payload, doc_ids)

    def _thread_setup(self) -> None:
        # OpenMP's thread count is per calling thread, and a threaded actor serves calls from a pool
        if self.threads:
            import faiss

            faiss.omp_set_num_threads(self.threads)


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


def remote_class(ray: Any, cls: type) -> Any:
    """``cls`` as a Ray actor class with the ``STATS_GROUP`` concurrency group (one thread), so
    ``memory()`` answers beside the calls under way (Ray takes the groups only here, not in
    ``.options()``)."""
    return ray.remote(concurrency_groups={STATS_GROUP: 1})(cls)


def actors_memory(ray: Any, actors: Sequence[Any], role: str, timeout_s: float) -> list[dict[str, Any]]:
    """Each actor's ``memory()`` as ``{"role", "index", **process_memory}``, asked in its stats
    group, all within ``timeout_s``. Never raises: an actor that is down or does not answer in
    time is a row with ``error`` (a report must not fail because one worker is restarting)."""
    refs: list[Any] = []
    for a in actors:
        try:
            refs.append(a.memory.options(concurrency_group=STATS_GROUP).remote())
        except Exception as e:  # noqa: BLE001 - a killed actor's handle, Ray shut down
            refs.append(e)
    deadline = time.monotonic() + timeout_s
    out: list[dict[str, Any]] = []
    for i, ref in enumerate(refs):
        row: dict[str, Any] = {"role": role, "index": i}
        try:
            if isinstance(ref, Exception):
                raise ref
            row.update(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
        except ray.exceptions.GetTimeoutError:
            row["error"] = f"no answer within {timeout_s:g} s"
        except Exception as e:  # noqa: BLE001 - reported in the row, see the docstring
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        out.append(row)
    return out


class RayShardGroup:
    """One Ray actor per contiguous id range (``ranges``: objects with ``start`` / ``stop``, e.g.
    ``retrieval.sharded.ShardRange``): start them, call them, and turn every Ray failure into
    ``RetrievalError`` naming the shard (module doc). The mechanism shared by the knowledge-base
    shards (``retrieval.ray_shards.RayShards``) and the kNN-LM datastore shards (``knnlm.sharded.RayDatastoreShards``).
    ``close()`` kills the actors and disconnects from Ray if ``cluster`` started the connection."""

    what = "shard"  # how errors name one actor (subclasses say which kind)
    role = "shard"  # how memory reports name one actor (``worker_memory``)

    def _start(self, actor_cls: type, actor_args: Sequence[tuple], ranges: Sequence[Any],
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
        remote_cls = remote_class(ray, actor_cls)
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
        """Wait for the shards last seen dead to be answering again (RetrievalError past
        ``start_timeout_s``: a restarted actor reloads its shard, the work of a start, as the LM
        replicas' restarts are timed too; a loaded 2-core machine took over the 30 s call timeout)."""
        wait_restarted(self.ray, self.actors, shards, self._restarting, self._lock,
                       self.config.start_timeout_s, RetrievalError, self.what)

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

    def worker_memory(self, timeout_s: float) -> list[dict[str, Any]]:
        """Every shard actor's process memory (``actors_memory``: rows, never an exception)."""
        return actors_memory(self.ray, self.actors, self.role, timeout_s)

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
