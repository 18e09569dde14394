"""LM replicas as Ray actors: the mechanism behind ``ralmspec serve --lm-replicas N``.

``RayLMReplicas`` is a ``LanguageModel`` whose ``generate`` runs on N Ray actors, each holding its
own copy of the SAME model, loaded in its own process with ``load_language_model(name, backend,
device, dtype)`` and ``threads`` torch threads. The scheduler is unchanged: it still gathers the
LM chunks of concurrent requests into one ``generate`` call; this class splits that batch by
replica, runs the parts concurrently (one task per replica), and reassembles the outputs in input
order. Inside each replica the backend batches exactly as it does in-process.

Contract: the ``LanguageModel`` contract of ``ralmspec.lm.base``, unchanged (``generate`` passes
each prompt's sampling settings to its replica; with ``backend="vllm"`` temperature > 0 is
refused here, with the backend's typed error).

Invariant (why the tokens do not change): every replica runs the same deterministic backend
(same weights, device, dtype, block size and torch thread count), and the backend's output is a
function of ``(prompt, n)`` alone, whatever the session history or the batch neighbours (HF:
canonical block prefill). So ``greedy(prompts, n, sessions)`` equals what one in-process backend
with the same settings (and the same torch thread count) returns, whichever replica serves which
prompt. Placement only decides speed:

- **Sessions are pinned.** A session is assigned on first use to the replica with the fewest
  pinned sessions (ties: round-robin) and stays there, so the replica's KV prefix reuse keeps
  working across the calls of one request; ``release(session)`` forwards the release to that
  replica and forgets the pin. ``None`` sessions (nothing kept) go round-robin. The pin table is
  bounded (LRU, ``max_pins``); a forgotten pin only costs that session's reuse.
- **Failures are typed, never partial.** A replica that cannot start raises ``ModelLoadError``
  (and every actor is killed); a replica that dies, fails or times out during a call fails the
  WHOLE call with ``LMError`` (the server answers HTTP 503), and Ray restarts it
  (``max_restarts``; the next call to it waits, within ``start_timeout_s``, until it answers). A
  ``ConfigError`` raised by the backend for a bad prompt is re-raised as such (HTTP 400).
- **Memory.** Each replica trims its own C heap (``malloc_trim_s``) and answers ``memory()`` in a
  concurrency group of its own (``cluster.STATS_GROUP``), so ``worker_memory`` (the server's
  ``/v1/stats`` ``memory.workers``) reads it while the replica decodes.

Ray is optional: nothing here imports it at module import time; without it ``RayLMReplicas``
raises ``ConfigError`` saying how to install it. ``close()`` kills the actors and disconnects
from Ray if this object's ``RayCluster`` started the connection.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

from ralmspec.cluster import (
    RAY_INSTALL_HINT, RayCluster, RayShardConfig, actors_memory, get_results, ray_available, remote_class, wait_restarted,
)
from ralmspec.config import check_seconds
from ralmspec.errors import ConfigError, LMError, ModelLoadError, RalmSpecError
from ralmspec.lm.base import LanguageModel, sampled
from ralmspec.lm.sampling import Sampling
from ralmspec.memory import HeapTrimmer, check_trim_interval, process_memory



@dataclass(frozen=True)
class RayLMConfig:
    """How many LM replicas, and how they are placed and called."""

    replicas: int = 2
    threads: int = 1  # torch threads inside each replica (part of the numerics: keep it fixed)
    actor_cpus: float = 0.0  # CPUs Ray reserves per replica (placement only)
    actor_gpus: float | None = None  # GPUs per replica; None: 1 on a cuda device, else 0
    max_restarts: int = 4  # times Ray restarts a dead replica (-1: forever)
    call_timeout_s: float = 300.0  # one greedy call (all replicas) must answer within this
    start_timeout_s: float = 300.0  # every replica must have loaded its model within this
    max_pins: int = 65536  # sessions remembered (LRU)
    malloc_trim_s: float = 60.0  # seconds between C heap trims inside each replica (ralmspec/memory.py); 0: never

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.threads < 1 or self.max_pins < 1:
            raise ConfigError("replicas, threads and max_pins must be >= 1")
        check_trim_interval(self.malloc_trim_s)
        # written "not x >= 0" so that NaN (from a flag such as --lm-replica-gpus nan) fails too
        if not (self.actor_cpus >= 0 and (self.actor_gpus is None or self.actor_gpus >= 0)) or self.max_restarts < -1:
            raise ConfigError("actor_cpus and actor_gpus must be >= 0, max_restarts >= -1")
        check_seconds(self.call_timeout_s, "call_timeout_s")
        check_seconds(self.start_timeout_s, "start_timeout_s")


class LMActor:
    """The body of one replica (wrapped with ``ray.remote`` by ``RayLMReplicas``)."""

    def __init__(self, name: str, backend: str, device: str, dtype: str, threads: int, malloc_trim_s: float = 0.0):
        import torch

        torch.set_num_threads(threads)  # before the first forward: the KV numerics depend on it
        from ralmspec.lm.loader import load_language_model

        self.lm = load_language_model(name, backend=backend, device=device, dtype=dtype)
        # a replica decodes for as long as the server runs: its heap fragments like the server's would
        self.trimmer = HeapTrimmer(malloc_trim_s).start()

    def memory(self) -> dict[str, Any]:
        """This replica's process memory (``memory.process_memory``; called in the stats
        concurrency group, it answers while ``generate`` runs)."""
        return process_memory(self.trimmer)

    def info(self) -> dict[str, Any]:
        import socket

        import torch

        return {"eos_token_id": self.lm.eos_token_id, "stop_token_ids": sorted(self.lm.stop_token_ids),
                "max_context": self.lm.max_context,
                "vocab_size": getattr(self.lm, "vocab_size", None), "threads": torch.get_num_threads(),
                "pid": os.getpid(), "host": socket.gethostname()}

    def generate(self, prompts: list[list[int]], n: int, sessions: list[Hashable],
                 sampling: list[Any] | None = None) -> list[list[int]]:
        return [list(map(int, o)) for o in self.lm.generate(prompts, n, sessions, sampling)]

    def release(self, session: Hashable) -> None:
        self.lm.release(session)

    def cached_length(self, session: Hashable) -> int:
        fn = getattr(self.lm, "cached_length", None)
        return int(fn(session)) if fn is not None else 0


def local_tokenizer(name: str, backend: str) -> Any:
    """The tokenizer the backend would build for ``name``, without loading any weights here."""
    from ralmspec.lm.hf import HFTokenizer, load_folder_tokenizer
    from ralmspec.lm.models import BUILTIN_MODELS, load_builtin_tokenizer, model_folder, model_names

    if name in BUILTIN_MODELS:  # HF and vLLM backends alike use the shipped BERT WordPiece
        return HFTokenizer(load_builtin_tokenizer(BUILTIN_MODELS[name].n_positions))
    path = model_folder(name)
    if not path.is_dir():
        raise ModelLoadError(f"model {str(path)!r} is neither a model name ({', '.join(model_names())}) "
                             "nor an existing folder")
    return load_folder_tokenizer(path)


class RayLMReplicas(LanguageModel):
    """``LanguageModel`` over N Ray actors running the same backend (module doc)."""

    def __init__(self, name: str, backend: str = "hf", device: str = "cpu", dtype: str = "float32",
                 config: RayLMConfig | None = None, cluster: Any | None = None, *,
                 ray_address: str | None = None, ray_cpus: int = 2):
        if not ray_available():
            raise ConfigError(f"LM replicas run on Ray, which is not installed here: {RAY_INSTALL_HINT} "
                              "(or serve without --lm-replicas)")
        self.config = config or RayLMConfig()
        self.name = str(name)
        self.supports_sampling = backend == "hf"  # the vLLM backend refuses temperature > 0
        self.tokenizer = local_tokenizer(self.name, backend)
        self._own_cluster = cluster is None  # close() disconnects only a connection made here
        self.cluster = cluster if cluster is not None else RayCluster(RayShardConfig(address=ray_address,
                                                                                     num_cpus=ray_cpus))
        self.ray = self.cluster.ray
        self.actors: list[Any] = []
        self._lock = threading.Lock()
        self._pins: OrderedDict[Hashable, int] = OrderedDict()
        self._pinned = [0] * self.config.replicas  # sessions pinned per replica
        self._rr = itertools.count()
        self._restarting: set[int] = set()
        c = self.config
        gpus = c.actor_gpus if c.actor_gpus is not None else (1.0 if device.startswith("cuda") else 0.0)
        opts: dict[str, Any] = dict(max_restarts=c.max_restarts, max_task_retries=0, num_cpus=c.actor_cpus,
                                    num_gpus=gpus, max_concurrency=1, scheduling_strategy="SPREAD")
        remote_cls = remote_class(self.ray, LMActor)
        try:
            self.actors = [remote_cls.options(**opts).remote(self.name, backend, device, dtype, c.threads,
                                                             c.malloc_trim_s)
                           for _ in range(c.replicas)]
            infos = self._get_all([a.info.remote() for a in self.actors], range(c.replicas), "start",
                                  c.start_timeout_s)
        except LMError as exc:
            self.close()
            raise ModelLoadError(f"LM replicas of {self.name!r} could not start: {exc}") from exc
        except BaseException:
            self.close()
            raise
        keys = {(i["eos_token_id"], i["max_context"], i["vocab_size"], i["threads"]) for i in infos}
        if len(keys) != 1:
            self.close()
            raise ModelLoadError(f"LM replicas of {self.name!r} disagree on (eos, max_context, vocab, threads): {keys}")
        self.infos = infos
        self.eos_token_id = infos[0]["eos_token_id"]
        self.stop_token_ids = frozenset(infos[0]["stop_token_ids"])  # one model: the same on every replica
        self.max_context = infos[0]["max_context"]
        self.vocab_size = infos[0]["vocab_size"]

    # ------------------------------------------------------------------ LanguageModel

    def greedy(self, prompts: Sequence[Sequence[int]], n: int,
               sessions: Sequence[Hashable] | None = None) -> list[list[int]]:
        return self.generate(prompts, n, sessions)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sessions: Sequence[Hashable] | None = None,
                 sampling: Sequence[Sampling | None] | None = None) -> list[list[int]]:
        """Split the batch by replica; each prompt keeps its own sampling settings (the draw
        rule is a function of (seed, position, logits), so placement cannot change a token)."""
        if self.closed:  # its actors were killed (close)
            raise self.closed_error()
        if isinstance(prompts, (str, bytes)):
            raise ConfigError("prompts must be a list of token-id lists, got a string")
        batch = [list(p) for p in prompts]
        sess: list[Hashable | None] = [None] * len(batch) if sessions is None else list(sessions)
        modes: list[Sampling | None] = [None] * len(batch) if sampling is None else list(sampling)
        if len(sess) != len(batch) or len(modes) != len(batch):
            raise ConfigError(f"got {len(batch)} prompts but {len(sess)} sessions and {len(modes)} sampling settings")
        if sampled(modes) and not self.supports_sampling:
            return super().generate(batch, n, sess, modes)  # the typed refusal
        if not batch:
            return []
        groups: dict[int, list[int]] = {}
        with self._lock:
            for i, s in enumerate(sess):
                groups.setdefault(self._replica_for(s), []).append(i)
        replicas = sorted(groups)
        self._wait_restarted(replicas)
        refs = [self.actors[r].generate.remote([batch[i] for i in groups[r]], n, [sess[i] for i in groups[r]],
                                               [modes[i] for i in groups[r]])
                for r in replicas]
        results = self._get_all(refs, replicas, "generate", self.config.call_timeout_s)
        out: list[list[int]] = [[] for _ in batch]
        for r, res in zip(replicas, results):
            if len(res) != len(groups[r]):
                raise LMError(f"LM replica {r} returned {len(res)} outputs for {len(groups[r])} prompts")
            for i, o in zip(groups[r], res):
                out[i] = o
        return out

    def release(self, session: Hashable) -> None:
        """Forget the pin and drop the session's KV on its replica (fire and forget: a replica
        runs its calls in submission order, so the release lands after the calls before it)."""
        with self._lock:
            r = self._pins.pop(session, None)
            if r is None:
                return
            self._pinned[r] -= 1
        try:
            self.actors[r].release.remote(session)
        except Exception:  # noqa: BLE001 - replica down or closed: its KV is gone anyway
            pass

    def close(self) -> None:
        """Kill the replicas; disconnect from Ray if this object's cluster connected."""
        self.closed = True  # later calls are a ClosedError
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone / Ray already shut down
                pass
        self.actors = []
        with self._lock:
            self._pins.clear()
            self._pinned = [0] * self.config.replicas
        if self._own_cluster:
            self.cluster.close()

    def cached_length(self, session: Hashable) -> int:
        """Prompt positions whose KV ``session`` holds on its replica (0 if not pinned, or if
        the backend does not report it)."""
        r = self.replica_of(session)
        if r is None:
            return 0
        return self._get_all([self.actors[r].cached_length.remote(session)], [r], "cached_length",
                             self.config.call_timeout_s)[0]

    def worker_memory(self, timeout_s: float) -> list[dict[str, Any]]:
        """Every replica's process memory (``cluster.actors_memory`` rows, role ``lm_replica``;
        never an exception: a replica down is a row with ``error``)."""
        return actors_memory(self.ray, self.actors, "lm_replica", timeout_s)

    # ------------------------------------------------------------------ placement

    def replica_of(self, session: Hashable) -> int | None:
        """The replica ``session`` is pinned to (``None``: not pinned)."""
        with self._lock:
            return self._pins.get(session)

    def _replica_for(self, session: Hashable | None) -> int:
        """Under the lock: the pinned replica, else pin to the least-loaded one (ties round-robin)."""
        k = self.config.replicas
        if session is None:
            return next(self._rr) % k
        r = self._pins.get(session)
        if r is not None:
            self._pins.move_to_end(session)
            return r
        start = next(self._rr) % k
        r = min(range(k), key=lambda j: (self._pinned[j], (j - start) % k))
        self._pins[session] = r
        self._pinned[r] += 1
        while len(self._pins) > self.config.max_pins:
            _, old = self._pins.popitem(last=False)
            self._pinned[old] -= 1
        return r

    # ------------------------------------------------------------------ Ray calls

    def _get_all(self, refs: list[Any], replicas: Sequence[int], what: str, timeout_s: float) -> list[Any]:
        """Every result in order, or the first failure: ``LMError`` naming the replica (a backend
        ``RalmSpecError`` such as ``ConfigError`` for a bad prompt is re-raised as it is)."""
        return get_results(self.ray, refs, replicas, what, timeout_s, self._restarting, self._lock,
                           LMError, "LM replica", passthrough=(RalmSpecError,))

    def _wait_restarted(self, replicas: Sequence[int]) -> None:
        """Wait until the replicas last seen dead answer again (``LMError`` past ``start_timeout_s``)."""
        wait_restarted(self.ray, self.actors, replicas, self._restarting, self._lock,
                       self.config.start_timeout_s, LMError, "LM replica")
