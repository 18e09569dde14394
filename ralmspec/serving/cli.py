"""``ralmspec serve``: the OpenAI-compatible server, or the knowledge base alone as a service.

    ralmspec serve --model tiny --port 8000                      # LM + local knowledge base
    ralmspec serve --retrieval-only --retriever exact --port 8001  # knowledge base as a service
    ralmspec serve --model tiny --retriever-url http://127.0.0.1:8001  # LM here, knowledge base there
    ralmspec serve --model tiny --shards 2                       # knowledge base in 2 Ray shard actors
    ralmspec serve --index idx/exact-4 --ray-address HEAD:6379   # shards on an existing Ray cluster
    ralmspec serve --model tiny --lm-replicas 2                  # the LM in 2 Ray actors (local Ray)
    ralmspec serve --model tiny --emulate-pad 1000000            # EMULATED 1M-vector exact knowledge base

Once listening it prints one line ``ralmspec: serving on http://HOST:PORT`` (the real port when
``--port 0``) to stdout, then serves until SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any, NamedTuple

from ralmspec.errors import ConfigError


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``serve`` sub-command (called by ``ralmspec.cli.build_parser``)."""
    from ralmspec.cli_options import add_emulate_pad_arg, add_engine_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/retrieve, /metrics)")
    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    h.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (printed at start)")
    h.add_argument("--retriever-url", default=None,
                   help="use a remote knowledge base (another `ralmspec serve --retrieval-only`) instead of a local index")
    h.add_argument("--retriever-api-key", default=None, metavar="KEY",
                   help="the --api-key of the --retriever-url service (default: $RALMSPEC_RETRIEVER_API_KEY)")
    h.add_argument("--retrieval-only", action="store_true", help="serve only the knowledge base (/v1/retrieve ...)")
    h.add_argument("--max-concurrent", type=int, default=16, help="requests generating at once")
    h.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; beyond: HTTP 429")
    h.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds per request (queueing included; 0: no limit)")
    h.add_argument("--retrieval-timeout", type=float, default=30.0,
                   help="seconds per knowledge-base call (local or remote), per attempt")
    h.add_argument("--retrieval-retries", type=int, default=2, help="extra attempts of a failed knowledge-base call")
    h.add_argument("--batch-window-ms", type=float, default=0.0,
                   help="extra wait to gather cross-request batches (default 0: whatever is waiting)")
    h.add_argument("--search-concurrency", type=int, default=1, help="knowledge-base calls in flight at once")
    h.add_argument("--no-load-governor", action="store_true",
                   help="never pause speculation under load (default: paused while the LM worker is saturated "
                        "by several requests; docs/serving.md)")
    h.add_argument("--governor-pause-at", type=float, default=0.85, metavar="F",
                   help="LM busy fraction (over --governor-window s) that pauses speculation")
    h.add_argument("--governor-resume-at", type=float, default=0.6, metavar="F",
                   help="LM busy fraction below which speculation resumes")
    h.add_argument("--governor-kb-bottleneck-at", type=float, default=0.97, metavar="F",
                   help="knowledge-base busy fraction at which retrieval counts as the bottleneck and speculation "
                        "is never paused (0: ignore the knowledge base)")
    h.add_argument("--governor-kb-fixed-share-at", type=float, default=0.3, metavar="F",
                   help="... provided the fixed part of a knowledge-base call (fitted over recent calls) is at least "
                        "this share of a mean call, i.e. more queries per call make each cheaper")
    h.add_argument("--governor-window", type=float, default=3.0, metavar="S", help="seconds of LM busy time looked at")
    add_connection_args(h)
    h.add_argument("--malloc-trim-s", type=float, default=60.0, metavar="S",
                   help="seconds between trims of the C heap (glibc malloc_trim: freed memory back to the OS, "
                        "so RSS does not creep; /v1/stats memory.heap_trim), here and in each LM replica and shard actor "
                        "(memory.workers); 0: never")
    h.add_argument("--served-model-name", default=None, help="the `model` clients send (default: --model)")
    h.add_argument("--access-log", action="store_true", help="log every request")
    add_emulate_pad_arg(h, "GET /v1/stats (knowledge_base) and /metrics (ralmspec_knowledge_base_info) "
                           "say EMULATED")
    x = p.add_argument_group("scale-out (Ray; docs/scale-out.md)")
    x.add_argument("--shards", type=int, default=None, metavar="N",
                   help="serve the knowledge base as N Ray shard actors: a sharded --index with N shards, or the "
                        "cached N-way split of --corpus / the embedded knowledge base (built on first use)")
    x.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (`ray start --head` prints it) instead of starting a local one")
    x.add_argument("--ray-cpus", type=int, default=2,
                   help="CPUs of the local Ray cluster started by --shards / --lm-replicas")
    x.add_argument("--shard-threads", type=int, default=1, help="FAISS / torch threads in each shard actor")
    x.add_argument("--shard-cpus", type=float, default=0.0,
                   help="CPUs Ray reserves per shard actor (placement); on a multi-host cluster set it to "
                        "--shard-threads so shards land on hosts with free cores (0: any number per host)")
    x.add_argument("--lm-replicas", type=int, default=None, metavar="N",
                   help="run the LM as N Ray actors (same model, backend, device, dtype in each); the scheduler's "
                        "batches are split across them, each session pinned to one replica. With --ray-address "
                        "and no --shards, the knowledge base stays in this process")
    x.add_argument("--lm-replica-threads", type=int, default=1, help="torch threads in each LM replica")
    x.add_argument("--lm-replica-gpus", type=float, default=None,
                   help="GPUs Ray reserves per LM replica (default: 1 with --lm-device cuda, else 0)")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def _build_app(a: argparse.Namespace):
    from ralmspec.cli_options import apply_threads, engine_config_from_args
    from ralmspec.engine.governor import GovernorConfig
    from ralmspec.engine.scheduler import SchedulerConfig
    from ralmspec.memory import check_trim_interval
    from ralmspec.serving.app import create_app

    cfg = engine_config_from_args(a)  # checks --emulate-pad (>= 0, exact only)
    apply_threads(a)
    _check_listen_flags(a)
    sched = SchedulerConfig(max_concurrent=a.max_concurrent, max_queue=a.max_queue,
                            request_timeout_s=a.request_timeout if a.request_timeout > 0 else None,
                            retrieval_timeout_s=a.retrieval_timeout, retrieval_retries=a.retrieval_retries,
                            batch_window_s=a.batch_window_ms / 1000.0,
                            governor=GovernorConfig(enabled=not a.no_load_governor, window_s=a.governor_window,
                                                    pause_at=a.governor_pause_at,
                                                    resume_at=a.governor_resume_at,
                                                    kb_bottleneck_at=a.governor_kb_bottleneck_at or None,
                                                    kb_fixed_share_at=a.governor_kb_fixed_share_at))
    if a.search_concurrency < 1:
        raise ConfigError("--search-concurrency must be >= 1")
    check_trim_interval(a.malloc_trim_s, "--malloc-trim-s")  # before anything loads
    t = time.perf_counter()
    if a.lm_replicas is not None and a.lm_replicas < 1:
        raise ConfigError("--lm-replicas must be >= 1")
    # --ray-address alone means a sharded knowledge base; with --lm-replicas it may be for the LM only
    sharded = a.shards is not None or (bool(a.ray_address) and not a.lm_replicas)
    if sharded and a.retriever_url:
        raise ConfigError("--shards / --ray-address serve a sharded knowledge base here; "
                          "they cannot be combined with --retriever-url")
    if a.retriever_api_key is not None and not a.retriever_url:
        raise ConfigError("--retriever-api-key is the key of a --retriever-url service; there is none here")
    if a.retriever_url:  # the remote serves its own index: these would go unused, silently
        local = [flag for flag, given in (("--index", a.index), ("--corpus", a.corpus),
                                          ("--retriever-device", a.retriever_device != "cpu")) if given]
        if local:
            raise ConfigError(f"{', '.join(local)} choose a local knowledge base; with --retriever-url the remote "
                              "service's is used (give them to its `ralmspec serve --retrieval-only`)")
    if a.emulate_pad and (sharded or a.retriever_url):
        raise ConfigError("--emulate-pad pads a local (unsharded) index in this process; it cannot be combined "
                          "with --retriever-url, --shards or --ray-address")
    if a.retrieval_only:
        if a.lm_replicas:
            raise ConfigError("--retrieval-only serves no LM; it cannot be combined with --lm-replicas")
        if a.retriever_url:
            raise ConfigError("--retrieval-only serves a local index; it cannot be combined with --retriever-url")
        retriever, where = _open_local_knowledge_base(a, cfg, sharded)
        app = create_app(None, sched, retriever=retriever, server_config=_server_config(a, cfg),
                         search_concurrency=a.search_concurrency)
        _log(f"ralmspec: {where} {retriever.kind} knowledge base of {len(retriever.corpus)} passages loaded in "
             f"{time.perf_counter() - t:.1f}s (retrieval-only){_emulated_note(retriever)}")
        return app
    from ralmspec.engine.core import RalmEngine

    # the LM first: with --lm-replicas it starts (or joins) Ray, which Ray shards then share
    lm, lm_where = _load_lm(a, cfg)
    retriever = None
    try:
        if a.retriever_url:
            from ralmspec.retrieval.remote import RETRIEVER_API_KEY_ENV, RemoteRetriever

            retriever = RemoteRetriever(a.retriever_url, timeout_s=a.retrieval_timeout,
                                        api_key=a.retriever_api_key or os.environ.get(RETRIEVER_API_KEY_ENV) or None)
            where = f"remote {a.retriever_url}"
        else:
            retriever, where = _open_local_knowledge_base(a, cfg, sharded)
        engine = RalmEngine(lm, retriever, cfg)  # refuses a prompt format the model cannot lay out
    except BaseException:  # the LM's and the knowledge base's processes (vLLM, Ray) end with the error
        lm.close()
        if retriever is not None:
            retriever.close()
        raise
    _log(f"ralmspec: model {cfg.model!r}{lm_where} + {where} {retriever.kind} knowledge base "
         f"({len(retriever.corpus)} passages) loaded in {time.perf_counter() - t:.1f}s{_emulated_note(retriever)}")
    return create_app(engine, sched, server_config=_server_config(a, cfg), search_concurrency=a.search_concurrency)


def _server_config(a: argparse.Namespace, cfg: Any) -> Any:
    from ralmspec.serving.app import ServerConfig

    return ServerConfig(model_name=a.served_model_name or cfg.model, client_max_size=a.max_body_bytes,
                        body_timeout_s=a.body_timeout, idle_timeout_s=a.idle_timeout, malloc_trim_s=a.malloc_trim_s,
                        api_key=a.api_key)


def _load_lm(a: argparse.Namespace, cfg: Any) -> tuple[Any, str]:
    """The LM in this process, or (with --lm-replicas N) N Ray actors running it."""
    if not a.lm_replicas:
        from ralmspec.lm.loader import dtype_name, load_language_model

        lm = load_language_model(cfg.model, backend=cfg.lm_backend, device=cfg.lm_device,
                                 dtype=cfg.lm_dtype, runner=cfg.lm_runner,
                                 prefix_cache_mib=cfg.lm_prefix_cache_mib,
                                 concurrent=a.max_concurrent > 1)
        # what --lm-dtype / --lm-runner auto resolved to, in the start-up line
        runner = getattr(lm, "runner", None)
        how = [x for x in (dtype_name(lm), runner and f"{runner.name} runner") if x]
        return lm, f" ({', '.join(how)})" if how else ""
    from ralmspec.lm.ray_replicas import RayLMConfig, RayLMReplicas

    lm_cfg = RayLMConfig(replicas=a.lm_replicas, threads=a.lm_replica_threads, actor_gpus=a.lm_replica_gpus,
                         call_timeout_s=a.request_timeout if a.request_timeout > 0 else RayLMConfig.call_timeout_s,
                         malloc_trim_s=a.malloc_trim_s)
    lm = RayLMReplicas(cfg.model, cfg.lm_backend, cfg.lm_device, config=lm_cfg, ray_address=a.ray_address,
                       ray_cpus=a.ray_cpus)
    return lm, f" in {a.lm_replicas} Ray LM replicas ({'joined ' + a.ray_address if a.ray_address else 'local'})"


def _open_local_knowledge_base(a: argparse.Namespace, cfg: Any, sharded: bool) -> tuple[Any, str]:
    """The knowledge base this server searches itself (``retrieval.open.open_knowledge_base``): one
    index in this process (EMULATED with --emulate-pad), or (with --shards / --ray-address) a
    sharded index whose shards are Ray actors."""
    from ralmspec.cluster import RayShardConfig
    from ralmspec.retrieval.open import open_knowledge_base

    if not sharded:
        return open_knowledge_base(cfg.retrieval, a.corpus, show_progress=True, log=_log), "local"
    ray_cfg = RayShardConfig(address=a.ray_address, num_cpus=a.ray_cpus, threads=a.shard_threads,
                             actor_cpus=a.shard_cpus, call_timeout_s=a.retrieval_timeout,
                             malloc_trim_s=a.malloc_trim_s)
    retriever = open_knowledge_base(cfg.retrieval, a.corpus, ray=ray_cfg, shards=a.shards)
    return retriever, f"{retriever.n_shards}-shard Ray ({'joined ' + a.ray_address if a.ray_address else 'local'})"


def _emulated_note(retriever: Any) -> str:
    label = getattr(retriever, "label", None)
    return f"; knowledge base {label}" if label else ""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# the last wait of a connection whose request is being cancelled ("at once"; aiohttp reads 0 as no limit)
_AT_ONCE_S = 0.001


class Stopped(NamedTuple):
    """How ``serve`` ended: the signal that stopped it (the last one received) and the requests
    in flight that the stop cancelled (0: every one was answered)."""

    signal: signal.Signals
    cancelled: int


class _InFlight:
    """The requests whose handler runs, counted by the middleware :meth:`install` puts outermost
    in an application (so that a stop knows what it cancels)."""

    def __init__(self) -> None:
        self.count = 0

    def install(self, app: Any) -> None:
        from aiohttp import web

        @web.middleware
        async def count_in_flight(request: Any, handler: Any) -> Any:
            self.count += 1
            try:
                return await handler(request)
            finally:
                self.count -= 1

        app.middlewares.insert(0, count_in_flight)


async def serve(app: Any, host: str, port: int, access_log: bool = False, shutdown_timeout: float = 60.0) -> Stopped:
    """Run ``app`` on ``host:port`` until SIGINT / SIGTERM; prints the bound address. Then the
    listening socket closes, the requests in flight have ``shutdown_timeout`` seconds to finish
    (answered in full; 0: cancelled at once), and whatever still runs is cancelled (its connection
    closed). A second SIGINT / SIGTERM during that wait cancels them at once (a second Ctrl-C).
    Returns the last signal and the number of requests cancelled. ``app`` must not have run yet
    (its middlewares are extended)."""
    from aiohttp import web

    in_flight = _InFlight()
    in_flight.install(app)
    # connections are drained by _cleanup (its own deadline): the runner's wait is only for the last ones
    runner = web.AppRunner(app, access_log=logging.getLogger("aiohttp.access") if access_log else None,
                           shutdown_timeout=_AT_ONCE_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    stop = asyncio.Event()
    received = [signal.SIGINT]  # the last signal received
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received[-1] = sig
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-POSIX
            pass
    addrs = runner.addresses
    bound = addrs[0][1] if addrs else port
    # once the signals stop it gracefully: a supervisor may stop it as soon as it reads the line
    print(f"ralmspec: serving on http://{host}:{bound}", flush=True)
    try:
        await stop.wait()
        stop.clear()
        if shutdown_timeout > 0 and in_flight.count:
            _log(f"ralmspec: shutting down; the requests in flight have up to {shutdown_timeout:g}s to finish "
                 "(Ctrl-C again to cancel them now)")
    finally:
        cancelled = await _cleanup(runner, stop, shutdown_timeout, in_flight)
    return Stopped(received[-1], cancelled)


async def _cleanup(runner: Any, again: asyncio.Event, timeout_s: float, in_flight: _InFlight) -> int:
    """Stop ``runner``: close its listening sockets, let the requests in flight finish within
    ``timeout_s`` seconds unless ``again`` is set meanwhile (a second signal), cancel those still
    running (their connections closed), then the application's cleanup (scheduler, workers).
    Returns the number of requests cancelled."""
    server = runner.server
    for site in list(runner.sites):
        await site.stop()  # no new connection
    if server is None:  # pragma: no cover - setup failed
        await runner.cleanup()
        return 0
    await asyncio.sleep(0)  # the requests that came before the sockets closed have started (as aiohttp's cleanup)
    server.pre_shutdown()  # no new request on a kept-alive connection
    drained = asyncio.ensure_future(server.shutdown(None))  # every connection, once its request is answered
    forced = asyncio.ensure_future(again.wait())
    try:
        await asyncio.wait({drained, forced}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        forced.cancel()
    cancelled = 0
    if not drained.done():
        cancelled = in_flight.count
        if cancelled:
            _log(f"ralmspec: cancelling the {cancelled} request(s) in flight")
        drained.cancel()
        await asyncio.wait({drained})
        await server.shutdown(_AT_ONCE_S)  # cancels their handlers, closes their connections
    elif not drained.cancelled():
        drained.result()
    await runner.cleanup()  # the rest: the app's cleanup (scheduler, workers)
    return cancelled


def add_connection_args(h: Any) -> None:
    """The request-body and connection limits of either server (``_check_listen_flags`` checks them)."""
    h.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (HTTP 413 beyond)")
    h.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a client has to send its whole request body; slower: HTTP 408 and the connection "
                        "is closed (0: no limit)")
    h.add_argument("--idle-timeout", type=float, default=75.0, metavar="S",
                   help="seconds a connection may stay idle between requests, or take to send a request's line "
                        "and headers, before it is closed")
    h.add_argument("--shutdown-timeout", type=float, default=60.0, metavar="S",
                   help="on SIGINT / SIGTERM: seconds the requests in flight have to finish before they are "
                        "cancelled (new connections are refused at once; default 60)")
    h.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (the OpenAI clients' api_key) on every path but "
                        "/health and /metrics; else HTTP 401 (default: $RALMSPEC_API_KEY, which keeps the key "
                        "out of the process list; unset: no key)")


def _check_listen_flags(a: argparse.Namespace) -> None:
    """``--port``, ``--request-timeout``, ``--body-timeout``, ``--idle-timeout``, ``--shutdown-timeout``
    and ``--api-key``
    (resolved here: the flag, else ``$RALMSPEC_API_KEY``) of either server, checked before anything loads."""
    from ralmspec.config import check_api_key, check_seconds
    from ralmspec.serving.app import API_KEY_ENV

    check_seconds(a.request_timeout, "--request-timeout", zero="no limit")
    if not 0 <= a.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {a.port}")
    check_seconds(a.body_timeout, "--body-timeout", zero="no limit")
    check_seconds(a.idle_timeout, "--idle-timeout")
    check_seconds(a.shutdown_timeout, "--shutdown-timeout", zero="")
    from_env = a.api_key is None
    if from_env:
        a.api_key = os.environ.get(API_KEY_ENV) or None
    check_api_key(a.api_key, f"${API_KEY_ENV}" if from_env else "--api-key")


def _configure_logging(a: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO if a.access_log else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _serve_until_stopped(app: Any, a: argparse.Namespace) -> int:
    """``serve`` on ``--host`` / ``--port``; a socket that cannot be bound is a ConfigError. The
    command's exit status: 0 once every request in flight was answered, else (some were cancelled:
    the shutdown timeout expired, or a second signal) 128 + the signal's number, as a command
    stopped by that signal (one line ``ralmspec CMD: stopped by SIG...; N request(s) ... cancelled``)."""
    try:
        stopped = asyncio.run(serve(app, a.host, a.port, a.access_log, a.shutdown_timeout))
    except OSError as exc:  # address in use, cannot bind, ...
        raise ConfigError(f"cannot listen on {a.host}:{a.port}: {exc}") from exc
    if not stopped.cancelled:
        return 0
    _log(f"ralmspec {a.command}: stopped by {stopped.signal.name}; {stopped.cancelled} request(s) in flight "
         "cancelled")
    return 128 + stopped.signal


def cmd_serve(a: argparse.Namespace) -> int:
    _configure_logging(a)
    from ralmspec.serving.app import STATE

    app = _build_app(a)
    state = app[STATE]
    engine, retriever = state.engine, state.retriever  # the application lets go of them at its cleanup
    try:
        return _serve_until_stopped(app, a)
    finally:
        try:
            if engine is not None:
                engine.lm.close()  # e.g. Ray LM replicas (and the local Ray cluster they started)
        finally:
            retriever.close()  # e.g. Ray shard actors (and the local Ray cluster started for them)


# ------------------------------------------------------------------ ralmspec knnlm serve


def add_knnlm_serve_parser(knnlm_subparsers: Any) -> argparse.ArgumentParser:
    """Register ``knnlm serve`` (called through ``ralmspec.knnlm.cli.add_knnlm_subparsers``)."""
    from ralmspec.knnlm.cli import add_decoding_options, add_shard_options

    p = knnlm_subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server of (speculative) kNN-LM decoding (/v1/completions, /v1/chat/completions)",
        description="Serve kNN-LM completions over HTTP (docs/knnlm.md 'Serving over HTTP'): speculative by "
                    "default, token-identical to the naive decoder, --max-concurrent requests decoding at once. "
                    "The decoding and "
                    "speculation options are the requests' defaults (a request's `knnlm` field overrides them); "
                    "--max-new-tokens is the default `max_tokens`.")
    p.add_argument("--datastore", required=True, help="the datastore folder (`ralmspec knnlm build`)")
    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    h.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (printed at start)")
    h.add_argument("--max-concurrent", type=int, default=1,
                   help="requests decoding at once, each in its own thread; on the batched runner (--lm-runner "
                        "batched; auto from 4 on the cpu) their LM steps share forwards and their searches share "
                        "searches, otherwise each thread has its own view of the LM (same weights, own KV runner); "
                        "the answers are the same at any value (default 1)")
    h.add_argument("--gather-ms", type=float, default=None, metavar="MS",
                   help="--lm-runner batched: longest wait for other requests' LM steps (searches) to share "
                        "a forward (a search) with (default: the mean forward (search) time; docs/knnlm.md)")
    h.add_argument("--speculate-max-active", type=int, default=1, metavar="N",
                   help="--lm-runner batched: requests speculate only while at most N decode; with more, "
                        "they take naive steps in shared forwards and searches (measured faster; default 1)")
    h.add_argument("--max-queue", type=int, default=16,
                   help="requests waiting for a decoding thread; beyond: HTTP 429 (default 16)")
    h.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds per request, queueing included (0: no limit; default 300)")
    h.add_argument("--no-speculate", action="store_true",
                   help="requests without `knnlm.speculate` run the naive decoder (one search per token)")
    h.add_argument("--served-model-name", default=None,
                   help="the `model` clients send (default: the LM's name, e.g. smollm2)")
    add_connection_args(h)
    h.add_argument("--malloc-trim-s", type=float, default=60.0, metavar="S",
                   help="seconds between trims of the C heap (ralmspec/memory.py); 0: never")
    h.add_argument("--access-log", action="store_true", help="log every request")
    add_decoding_options(p)
    add_shard_options(p)
    p.set_defaults(func=cmd_knnlm_serve)
    return p


def cmd_knnlm_serve(a: argparse.Namespace) -> int:
    from ralmspec.knnlm.cli import open_knnlm, speculative_config
    from ralmspec.threads import set_threads
    from ralmspec.serving.knnlm_app import KNN_STATE, KNNLMServerConfig, create_knnlm_app

    _configure_logging(a)
    _check_listen_flags(a)
    spec = speculative_config(a)  # bad speculation options fail before anything loads
    server = dict(client_max_size=a.max_body_bytes, body_timeout_s=a.body_timeout, idle_timeout_s=a.idle_timeout,
                  max_concurrent=a.max_concurrent, max_queue=a.max_queue,
                  request_timeout_s=a.request_timeout, gather_s=None if a.gather_ms is None else a.gather_ms / 1000,
                  speculate_max_active=a.speculate_max_active,
                  speculate=not a.no_speculate, malloc_trim_s=a.malloc_trim_s, api_key=a.api_key)
    KNNLMServerConfig(**server)  # likewise
    set_threads(a.threads)
    t = time.perf_counter()
    with open_knnlm(a) as (knn, ds):
        name = a.served_model_name or a.model or ds.model_name
        app = create_knnlm_app(knn, spec, KNNLMServerConfig(model_name=name, **server))
        d = ds.describe()
        _log(f"ralmspec: kNN-LM {name!r} + datastore {d['path']} ({d['entries']} entries, {d['index']} index) "
             f"loaded in {time.perf_counter() - t:.1f}s; {'speculative' if not a.no_speculate else 'naive'} "
             f"by default, {a.max_concurrent} request(s) decoding at once"
             f"{' sharing forwards and searches' if app[KNN_STATE].sharing is not None else ''} "
             f"({getattr(knn.lm.runner, 'name', '?')} LM runner)")
        return _serve_until_stopped(app, a)
