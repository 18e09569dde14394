"""aiohttp application: OpenAI-compatible completions, the knowledge base as a service, health, metrics.

Routes (docs/serving.md has the full reference with curl examples):

- ``POST /v1/completions``  OpenAI completions (+ ``ralm`` extension); ``stream: true`` sends
  Server-Sent Events of VERIFIED tokens only (the engine's ``on_tokens``), then ``data: [DONE]``.
  ``temperature`` / ``top_p`` / ``seed`` sample exactly (ralmspec/lm/sampling.py): same seed, same
  text, speculative or not; a sampled request without a seed gets one drawn here, returned in
  ``ralm.generation.seed``.
- ``POST /v1/chat/completions``  OpenAI chat completions: the messages rendered with the model's
  chat template, the passage in the last user message (engine/prompt.py ``Conversation``); same
  engine, streaming, sampling, ``stop``, ``logprobs`` and ``ralm`` extension as completions
  (the response shapes: ralmspec/serving/shapes.py).
- ``GET  /v1/models``
- ``POST /v1/retrieve``     ``{"queries", "k", "include_text"}`` -> ranked hits (batched across callers)
- ``POST /v1/score``        ``{"query", "doc_ids"}`` -> scores with the retriever's own metric
- ``POST /v1/passages``, ``GET /v1/passages/{doc_id}``, ``GET /v1/retriever``
- ``GET  /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/stats`` (JSON)

``/v1/stats`` (``knowledge_base``) and ``/metrics`` (``ralmspec_knowledge_base_info``) name the
knowledge base: ``real N passages``, or ``EMULATED ...`` for ``ralmspec serve --emulate-pad N``.
``/v1/stats`` ``speculation`` totals the finished speculative requests: ``speculated_steps``,
``verified_steps`` (retrieved for real), ``accepted``, ``rollbacks``.

Error contract: every error is JSON ``{"error": {"message", "type", "param", "code"}}``.
400 bad input (naming the field), 404 unknown model / route, 408 a request body not received
within ``body_timeout_s`` (the connection is then closed), 413 oversized body, 429 queue full,
503 knowledge base or language model (e.g. a Ray LM replica) unavailable, or shutting down, 504
request deadline exceeded. A request whose knowledge base or LM fails never gets an answer with
unverified tokens: non-streaming requests get the error instead of a body; streaming requests
have only sent verified tokens and end with an ``error`` event and no ``[DONE]``.

A client that disconnects cancels its request at once (slot freed, LM session released), even
without aiohttp's ``handler_cancellation``: handlers watch the transport.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from ralmspec import __version__
from ralmspec.engine.prompt import Conversation
from ralmspec.engine.result import GenerationResult, VerifiedChunk
from ralmspec.engine.scheduler import (
    BatchingSearchClient, QueueFullError, RequestTimeoutError, Scheduler, SchedulerConfig,
)
from ralmspec.engine.stream import LogprobRelease, VerifiedText
from ralmspec.config import check_api_key, check_seconds
from ralmspec.errors import ClosedError, ConfigError, LMError, RetrievalError
from ralmspec.lm.loader import dtype_name
from ralmspec.lm.sampling import draw_seed
from ralmspec.memory import HeapTrimmer, check_trim_interval, process_memory
from ralmspec.retrieval.base import Retriever
from ralmspec.retrieval.emulated import emulated_label, real_label
from ralmspec.retrieval.remote import ServiceLimits
from ralmspec.threads import WorkerPool, to_thread
from ralmspec.serving.metrics import ServerMetrics
from ralmspec.serving.protocol import (
    APIError, CompletionRequest, bad, decode_body, parse_chat, parse_completion, parse_passages, parse_retrieve, parse_score,
    with_seed,
)
from ralmspec.serving.shapes import CHAT, COMPLETION, Shape, answer, event, finish_reason, model_list, usage

log = logging.getLogger("ralmspec.serving")

DISCONNECT_POLL_S = 0.05


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-level limits of one server."""

    model_name: str = "ralmspec"  # the `model` clients must send
    client_max_size: int = 1 << 20  # bytes of request body; larger -> 413
    body_timeout_s: float = 30.0  # the whole request body must arrive within this; slower -> 408; 0: no limit
    # a connection idle this long, or still sending its request line and headers, is closed
    # (aiohttp's keepalive_timeout: its own default, 3630 s, let half-sent headers hold a socket an hour)
    idle_timeout_s: float = 75.0
    # the limits GET /v1/retriever reports; their defaults are the ones RemoteRetriever assumes of
    # a service too old to report them
    max_retrieve_queries: int = ServiceLimits.queries
    max_retrieve_k: int = ServiceLimits.k
    max_retrieve_texts: int = ServiceLimits.texts  # passages with text per /v1/retrieve answer (queries x k); more: 400
    max_ids: int = ServiceLimits.ids  # doc ids per /v1/score or /v1/passages call
    max_tokens_limit: int = 4096  # further capped by the model's context
    api_key: str | None = None  # required as 'Authorization: Bearer <key>' on every path but OPEN_PATHS
    io_threads: int = 4  # threads for /v1/score and passage reads
    malloc_trim_s: float = 60.0  # seconds between C heap trims (ralmspec/memory.py); 0: never
    worker_stats_timeout_s: float = 2.0  # /v1/stats and /metrics wait this long for Ray workers' memory

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ConfigError("model_name must be non-empty")
        check_trim_interval(self.malloc_trim_s)
        check_seconds(self.body_timeout_s, "body_timeout_s", zero="no limit")
        check_seconds(self.idle_timeout_s, "idle_timeout_s")
        check_api_key(self.api_key)
        if not self.worker_stats_timeout_s > 0:
            raise ConfigError(f"worker_stats_timeout_s must be > 0, got {self.worker_stats_timeout_s}")
        for name in ("client_max_size", "max_retrieve_queries", "max_retrieve_k", "max_retrieve_texts", "max_ids",
                     "max_tokens_limit", "io_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")


@dataclass
class ServerState:
    engine: Any | None
    retriever: Retriever | None  # None (and engine None) once released at cleanup
    scheduler_config: SchedulerConfig
    config: ServerConfig
    metrics: ServerMetrics
    scheduler: Scheduler | None = None
    search_client: BatchingSearchClient | None = None
    executor: WorkerPool | None = None
    trimmer: HeapTrimmer | None = None
    workers_read: asyncio.Future | None = None  # the Ray workers' memory read under way (shared)
    started: float = 0.0

    @property
    def max_tokens_limit(self) -> int:
        if self.engine is None:
            return self.config.max_tokens_limit
        return max(1, min(self.config.max_tokens_limit, self.engine.lm.max_context - 2))

    def release(self) -> None:
        """Drop the engine, the knowledge base, the scheduler and the pools (the application's
        cleanup, once they are closed). aiohttp keeps the applications of its latest 1024
        middleware chains alive in a module-wide cache (``web_app._cached_build_middleware``), and
        this state with them: a process that serves one application after another (a notebook,
        a test harness) kept every earlier engine, its model and its index, after its server
        ended. Only the metrics and the settings are left."""
        self.engine = self.retriever = None
        self.scheduler = self.search_client = self.executor = self.trimmer = self.workers_read = None


STATE = web.AppKey("ralmspec_state", ServerState)


def create_app(engine: Any | None = None, scheduler_config: SchedulerConfig | None = None, *,
               retriever: Retriever | None = None, server_config: ServerConfig | None = None,
               search_concurrency: int = 1) -> web.Application:
    """Build the application around a ``RalmEngine`` (full server) or a bare ``Retriever``
    (retrieval-only service: no /v1/completions). The scheduler is created on startup, inside
    the serving loop, and closed on cleanup."""
    if engine is None and retriever is None:
        raise ConfigError("create_app needs an engine or a retriever")
    if engine is not None and retriever is not None and retriever is not engine.retriever:
        raise ConfigError("pass either an engine or a retriever, not both")
    cfg = server_config or ServerConfig()
    state = ServerState(engine, retriever or engine.retriever, scheduler_config or SchedulerConfig(), cfg,
                        ServerMetrics())
    app = new_application(cfg.client_max_size, cfg.idle_timeout_s, state.metrics, cfg.api_key)
    app[STATE] = state

    async def on_startup(app: web.Application) -> None:
        state.started = time.time()
        state.executor = WorkerPool(cfg.io_threads, thread_name_prefix="ralm-io")
        state.trimmer = HeapTrimmer(cfg.malloc_trim_s).start()
        if state.engine is not None:  # not the closure's engine: this hook outlives the server (release)
            state.scheduler = Scheduler(state.engine, state.scheduler_config, search_concurrency)
            state.search_client = state.scheduler.search_client
        else:
            sc = state.scheduler_config
            state.search_client = BatchingSearchClient(state.retriever, sc.max_search_batch, sc.batch_window_s,
                                                       sc.merge_k, search_concurrency)

    async def on_cleanup(app: web.Application) -> None:
        if state.trimmer is not None:
            await to_thread(state.trimmer.close)
        if state.scheduler is not None:
            await state.scheduler.aclose()
        elif state.search_client is not None:
            await state.search_client.aclose()
        aclose = getattr(state.retriever, "aclose", None)
        if aclose is not None:
            await aclose()
        if state.executor is not None:
            state.executor.shutdown(wait=False, cancel_futures=True)
        state.release()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    r = app.router
    if engine is not None:
        r.add_post("/v1/completions", completions)
        r.add_post("/v1/chat/completions", chat_completions)
        r.add_get("/v1/models", models)
    r.add_post("/v1/retrieve", retrieve)
    r.add_post("/v1/score", score)
    r.add_post("/v1/passages", passages)
    r.add_get("/v1/passages/{doc_id}", passage_one)
    r.add_get("/v1/retriever", retriever_info)
    r.add_get("/v1/stats", stats)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    return app


# --------------------------------------------------------------------------- plumbing


def _json_error(err: APIError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=headers)


def error_for(exc: BaseException, prompt_param: str = "prompt") -> APIError:
    """The HTTP answer for an exception raised while serving a request (``prompt_param``: the
    field that holds the prompt, named by errors about it)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "rate_limit_error", None, "queue_full")
    if isinstance(exc, ClosedError):  # the scheduler shutting down, or the engine / LM behind it closed
        return APIError(503, str(exc), "service_unavailable", None, "shutting_down")
    if isinstance(exc, RetrievalError):
        return APIError(503, f"knowledge base unavailable: {exc}", "service_unavailable", None,
                        "knowledge_base_unavailable")
    if isinstance(exc, LMError):
        return APIError(503, f"language model unavailable: {exc}", "service_unavailable", None,
                        "language_model_unavailable")
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), "timeout", None, "request_timeout")
    if isinstance(exc, ConfigError):  # raised by the engine for this request's input
        msg = str(exc)
        prefixes = {("prompt", "the prompt"): prompt_param, ("max_new_tokens",): "max_tokens", ("logprobs",): "logprobs",
                    ("the chat prompt format",): "ralm.prompt_format"}
        param = next((p for pre, p in prefixes.items() if msg.startswith(pre)), None)
        return APIError(400, msg, "invalid_request_error", param, None)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error", None, None)


def error_middleware(metrics: ServerMetrics, client_max_size: int) -> Any:
    """The middleware that answers every error as JSON (the module's error contract) and counts
    every request once by endpoint and status in ``metrics``: a stream that ended with an error
    event under that error's status (``STREAM_STATUS``), not the 200 its headers carried."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        request[REQUEST_ID] = request_id(request.headers.get("X-Request-Id"))
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        try:
            resp = await handler(request)
        except asyncio.CancelledError:
            metrics.record_request(endpoint, 499)  # client closed the connection
            raise
        except ClientGoneError:
            metrics.record_request(endpoint, 499)
            return web.Response(status=499)  # nobody reads it
        except web.HTTPException as exc:  # 404 / 405 / 413 from aiohttp itself
            kind = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status,
                                                                                                "http_error")
            msg = exc.reason
            if exc.status == 413:
                msg = f"request body too large (limit {client_max_size} bytes)"
            elif exc.status == 404:
                msg = f"no route {request.method} {request.path}"
            resp = _json_error(APIError(exc.status, msg, kind, None, None))
        except Exception as exc:  # noqa: BLE001 - every error is answered as JSON
            err = error_for(exc)
            if err.status >= 500:
                log.warning("%s %s -> %d: %s (X-Request-Id %s)", request.method, request.path, err.status, err.message,
                            request[REQUEST_ID])
            headers = {"Retry-After": "1"} if err.status == 429 else {"WWW-Authenticate": "Bearer"} \
                if err.status == 401 else None
            resp = _json_error(err, headers)
            if err.status == 408:
                await answer_and_close(request, resp)
        # a stream that ended with an error event: its status line said 200, its outcome is the error's
        metrics.record_request(endpoint, request.get(STREAM_STATUS, resp.status))
        return resp

    return middleware


async def answer_and_close(request: web.Request, resp: web.Response) -> None:
    """Send ``resp`` and close the connection at once (the answer to a body that did not arrive
    in time: the rest of it may still come, so the connection cannot serve another request, and
    aiohttp would otherwise keep it open up to its lingering time, 10 s, reading that rest)."""
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    request.protocol.force_close()  # closes the transport once the answer is flushed


class ClientGoneError(Exception):
    """The client closed its connection before its request body arrived (answered 499: the
    server did not fail)."""


# Answered without the API key: a load balancer's or a monitor's probes (as vLLM's /health and
# /metrics); /metrics shows request counts and latencies, never a prompt or an answer.
OPEN_PATHS = frozenset({"/health", "/metrics"})
API_KEY_ENV = "RALMSPEC_API_KEY"  # the --api-key of either server when the flag is absent


def auth_middleware(api_key: str) -> Any:
    """401 ``invalid_api_key`` unless a request to a path outside ``OPEN_PATHS`` sends
    ``Authorization: Bearer <api_key>`` (as the OpenAI clients do with their ``api_key``); the
    comparison takes the same time wherever the two differ."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.path not in OPEN_PATHS:
            sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(sent, expected):
                raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer <key>' "
                               "(the OpenAI clients' api_key) with the key the server was started with "
                               f"(--api-key or ${API_KEY_ENV})" if not sent
                               else "wrong API key (send 'Authorization: Bearer <key>' with the server's key)",
                               "invalid_request_error", None, "invalid_api_key")
        return await handler(request)

    return middleware


# the request's key of its X-Request-Id: a typed key from aiohttp 3.14 (a plain string warns there,
# NotAppKeyWarning), a string before it (the floor is 3.9.1)
REQUEST_ID: Any = web.RequestKey("ralmspec_request_id", str) if hasattr(web, "RequestKey") else "ralmspec.request_id"
# the status of a stream's error event (``stream_verified``): what the middleware counts it as
STREAM_STATUS: Any = web.RequestKey("ralmspec_stream_status", int) if hasattr(web, "RequestKey") \
    else "ralmspec.stream_status"


def request_id(sent: str | None) -> str:
    """The client's ``X-Request-Id`` (1-128 printable ASCII characters, as a proxy or a client
    library sends to follow one request through its logs), else a new one: 32 hex digits."""
    if sent and len(sent) <= 128 and sent.isascii() and sent.isprintable():
        return sent
    return uuid.uuid4().hex


async def _send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer carries its request's ``X-Request-Id`` (a stream's too: set as it starts)."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers["X-Request-Id"] = rid


def new_application(client_max_size: int, idle_timeout_s: float, metrics: ServerMetrics,
                    api_key: str | None = None) -> web.Application:
    """The aiohttp application of either server: its body limit, its idle timeout (aiohttp's
    ``keepalive_timeout``, which also bounds a connection still sending its headers), the
    JSON-error middleware counting requests in ``metrics`` (it also gives each request its
    ``X-Request-Id``, sent back on the answer and named in the server's warnings) and, with
    ``api_key``, the key check (inside the error middleware: a 401 is answered as JSON and counted)."""
    middlewares = [error_middleware(metrics, client_max_size)]
    if api_key is not None:
        middlewares.append(auth_middleware(api_key))
    app = web.Application(client_max_size=client_max_size, handler_args={"keepalive_timeout": idle_timeout_s},
                          middlewares=middlewares)
    app.on_response_prepare.append(_send_request_id)
    return app


async def read_json(request: web.Request, timeout_s: float) -> Any:
    """The request's JSON body (``decode_body``): 413 past ``client_max_size`` (aiohttp's), 400
    for a body its ``Content-Encoding`` cannot decode, ``ClientGoneError`` for one cut off, 408
    for one not received in ``timeout_s`` (0: no limit), so a client that sends its body slowly,
    or never, does not hold a connection and its buffers for ever."""
    try:
        async with asyncio.timeout(timeout_s or None):
            raw = await request.read()
    except TimeoutError:
        raise APIError(408, f"the request body was not received within {timeout_s:g} s", "timeout", None,
                       "body_timeout") from None
    except RequestPayloadError as exc:
        raise bad(f"the request body could not be read: {exc}") from None
    except ConnectionResetError:
        raise ClientGoneError("the client closed the connection while sending its request") from None
    return decode_body(raw)


def client_gone(request: web.Request) -> bool:
    t = request.transport
    return t is None or t.is_closing()


async def cancel_and_wait(task: asyncio.Task) -> None:
    """Cancel ``task`` unless it is done, and wait until it has unwound (its own cleanup, such
    as a generation's session release, runs before the handler returns); its outcome is dropped."""
    if not task.done():
        task.cancel()
        try:
            await task
        except BaseException:  # noqa: BLE001 - the cancelled request's outcome is nobody's now
            pass


async def run_watching(request: web.Request, coro: Awaitable[Any]) -> Any:
    """Await ``coro`` as a task; cancel it (and raise CancelledError) as soon as the client is gone."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if client_gone(request):
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        await cancel_and_wait(task)


async def first_chunk(request: web.Request, task: asyncio.Task, queue: asyncio.Queue) -> None:
    """Wait until ``task`` (a generation whose chunks arrive in ``queue``, then ``None``) has
    queued its first chunk or ended; raise its error if it failed before any. The client going
    away cancels it (CancelledError) and waits until it has unwound (its slot and LM session
    released before the handler ends, as after the first chunk)."""
    try:
        while not task.done() and queue.empty():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if client_gone(request):
                raise asyncio.CancelledError("client disconnected")
    except BaseException:
        await cancel_and_wait(task)
        raise
    if task.done() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


async def next_chunk(request: web.Request, queue: asyncio.Queue) -> Any:
    """The next item of a stream's ``queue``; ConnectionResetError once the client is gone."""
    while True:
        try:
            async with asyncio.timeout(DISCONNECT_POLL_S * 4):  # not wait_for: it can swallow a cancel
                return await queue.get()
        except TimeoutError:
            if client_gone(request):
                raise ConnectionResetError("client disconnected") from None


# --------------------------------------------------------------------------- completions


def ralm_fields(state: ServerState, req: CompletionRequest, result: Any) -> dict[str, Any]:
    out = {
        "mode": result.mode,
        "retriever": state.retriever.kind,
        "passages": [{"doc_id": s.doc_id, "title": s.title, "start": s.start, "end": s.end} for s in result.steps],
        "latency_s": result.latency_s,
        "stats": result.stats,
        "generation": {"stride": req.gen.stride, "query_len": req.gen.query_len,
                       "passage_tokens": req.gen.passage_tokens, "max_new_tokens": req.gen.max_new_tokens,
                       # the seed in effect (drawn by the server when a sampled request had none):
                       # sending it back reproduces the answer token for token
                       "temperature": req.gen.temperature, "top_p": req.gen.top_p, "seed": req.gen.seed},
    }
    if req.return_trace:
        out["trace"] = result.trace
    return out


def resolve_sampling(state: ServerState, req: CompletionRequest) -> CompletionRequest:
    """A sampled request (temperature > 0) needs an LM backend that implements the exact draw
    rule (else 400 naming ``temperature``) and a seed: the server draws one when none was sent
    (returned in ``ralm.generation.seed``)."""
    if req.gen.temperature == 0:
        return req
    lm = state.engine.lm
    if not getattr(lm, "supports_sampling", False):
        raise APIError(400, f"'temperature' > 0 is not supported by this server's language model backend: "
                            f"{getattr(lm, 'no_sampling_reason', 'it decodes greedily only')}",
                       "invalid_request_error", "temperature")
    return req if req.gen.seed is not None else with_seed(req, draw_seed())


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request, state.config.body_timeout_s)
    req = resolve_sampling(state, parse_completion(body, state.engine.config, state.config.model_name,
                                                   state.retriever.kind, state.max_tokens_limit))
    return await respond(request, state, req, COMPLETION)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request, state.config.body_timeout_s)
    req = resolve_sampling(state, parse_chat(body, state.engine.config, state.config.model_name,
                                             state.retriever.kind, state.max_tokens_limit))
    assert isinstance(req.prompt, Conversation)
    try:  # a model without a chat template, or turns its template refuses: 400 before queueing
        state.engine.chat_format(req.prompt.history)
    except ConfigError as exc:
        raise APIError(400, str(exc), "invalid_request_error", "messages") from None
    return await respond(request, state, req, CHAT)


async def generate(state: ServerState, req: CompletionRequest, shape: Shape,
                   on_tokens: Callable[[Any], None] | None = None) -> GenerationResult:
    """Run ``req`` through the scheduler; the engine's input errors name the endpoint's fields."""
    assert state.scheduler is not None
    try:
        return await state.scheduler.generate(req.prompt, gen=req.gen, spec=req.spec, speculate=req.speculate,
                                              on_tokens=on_tokens)
    except ConfigError as exc:
        raise error_for(exc, shape.prompt_param) from None


async def respond(request: web.Request, state: ServerState, req: CompletionRequest, shape: Shape) -> web.StreamResponse:
    if req.gen.logprobs is not None and not getattr(state.engine.lm, "supports_logprobs", False):
        raise APIError(400, "'logprobs' is not supported by this server's language model backend "
                            "(logprobs need the hf backend)", "invalid_request_error", "logprobs")
    try:  # the prompt's errors before it queues (a 429 or a wait for a slot otherwise)
        state.engine.check_request(req.prompt, req.gen)
    except ConfigError as exc:
        raise error_for(exc, shape.prompt_param) from None
    if req.stream:
        return await _stream(request, state, req, shape)
    t0 = time.perf_counter()
    result = await run_watching(request, generate(state, req, shape))
    state.metrics.record_completion(result, time.perf_counter() - t0)
    return web.json_response(answer(shape, f"{shape.id_prefix}-{uuid.uuid4().hex}", int(time.time()),
                                    state.config.model_name, result, state.engine.lm.tokenizer,
                                    {"ralm": ralm_fields(state, req, result)}))


async def _stream(request: web.Request, state: ServerState, req: CompletionRequest,
                  shape: Shape) -> web.StreamResponse:
    """The request's answer streamed (``stream_verified``), ``ralm`` in the finish chunk."""
    assert state.scheduler is not None
    return await stream_verified(
        request, lambda on_tokens: generate(state, req, shape, on_tokens), shape=shape,
        model=state.config.model_name, tokenizer=state.engine.lm.tokenizer, stops=req.gen.stop,
        logprobs=req.gen.logprobs is not None, include_usage=req.include_usage, metrics=state.metrics,
        mode="speculative" if req.speculate else "naive",
        extension=lambda result: {"ralm": ralm_fields(state, req, result)})


async def stream_verified(request: web.Request, run: Callable[[Callable[[Any], None]], Awaitable[GenerationResult]],
                          *, shape: Shape, model: str, tokenizer: Any, stops: Sequence[str], logprobs: bool,
                          include_usage: bool, metrics: ServerMetrics, mode: str,
                          extension: Callable[[GenerationResult], dict[str, Any]]) -> web.StreamResponse:
    """SSE of a generation's verified text: ``run(on_tokens)`` generates, passing each verified
    chunk (token ids; a ``VerifiedChunk`` with logprobs when ``logprobs``) to ``on_tokens``, from
    the serving loop or any other thread. Stop strings cut, partial matches held back
    (engine/stop.py); each chunk carries the logprobs of the tokens its text completes
    (ralmspec/engine/stream.py); then the finish chunk with ``extension(result)`` (and the
    logprobs not sent yet), usage if asked, ``[DONE]``. An error before the first chunk is
    answered with its HTTP status; after it, the stream ends with an ``error`` event and no
    ``[DONE]``. A stream that does not finish (client gone, error event) counts the tokens of the
    chunks it had written in ``completion_tokens`` under ``mode`` (``record_sent_tokens``); a
    finished one counts its answer's, as a non-streamed completion does."""
    cid, created = f"{shape.id_prefix}-{uuid.uuid4().hex}", int(time.time())
    queue: asyncio.Queue[VerifiedChunk | None] = asyncio.Queue()
    loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()
    t0 = time.perf_counter()
    ttft: list[float] = []  # seconds from t0 to the first verified chunk
    ended: list[float] = []  # ... and to the generation's end (the request's latency)
    taken = sent = 0  # tokens taken from the queue / of them, those whose chunk was written
    finished = False  # the answer was counted whole (record_completion)

    def on_tokens(toks: Any) -> None:  # verified tokens only (engine contract)
        if not ttft:
            ttft.append(time.perf_counter() - t0)
        if threading.get_ident() == loop_thread:
            queue.put_nowait(toks)
        else:  # queued before the task's end: its done callback is scheduled after these
            loop.call_soon_threadsafe(queue.put_nowait, toks)

    def on_end(_task: asyncio.Future) -> None:
        ended.append(time.perf_counter() - t0)
        queue.put_nowait(None)

    task = asyncio.ensure_future(run(on_tokens))
    task.add_done_callback(on_end)
    # The stream starts with the first verified chunk: errors before it (queue full, bad prompt,
    # knowledge base down at the first retrieval, deadline) are answered with their HTTP status.
    await first_chunk(request, task, queue)

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    text = VerifiedText(tokenizer, stops)
    scored = LogprobRelease(tokenizer) if logprobs else None

    def logprobs_of(final: GenerationResult | None = None) -> dict[str, Any] | None:
        """The logprobs of the tokens whose text is sent (all of ``final``'s, at the end)."""
        if scored is None:
            return None
        entries, offsets = scored.release(text.sent) if final is None else scored.finish(final.logprobs or [],
                                                                                          len(final.text))
        return shape.logprobs(entries, tokenizer, offsets)

    def chunk(choice: dict[str, Any], **extra: Any) -> bytes:
        return event(shape, cid, created, model, [choice], **extra)

    async def end_with_error(exc: BaseException) -> web.StreamResponse:
        """The headers are sent: an error ends the stream as an error event (never a second HTTP
        answer written into the body)."""
        err = error_for(exc)
        log.warning("stream %s ended with %d: %s (X-Request-Id %s)", cid, err.status, err.message,
                    request.get(REQUEST_ID))
        request[STREAM_STATUS] = err.status  # counted once, as this status (error_middleware)
        await resp.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
        await resp.write_eof()
        return resp

    try:
        await resp.prepare(request)
        role = shape.role_choice()
        if role is not None:
            await resp.write(chunk(role))
        while True:
            item = await next_chunk(request, queue)
            if item is None:
                break
            if scored is not None:
                scored.push(item.logprobs)
            taken += len(item)
            delta = text.push(item)
            if delta:  # a token whose text is held back (a stop string may start) goes with a later chunk
                await resp.write(chunk(shape.delta(delta, logprobs=logprobs_of())))
                sent = taken
        exc = task.exception()
        if exc is not None:
            return await end_with_error(exc)
        result = task.result()
        metrics.record_completion(result, ended[0], ttft[0] if ttft else None)
        finished = True
        rest = text.finish()
        await resp.write(chunk(shape.delta(rest, finish_reason(result), logprobs_of(result)), **extension(result)))
        if include_usage:
            await resp.write(event(shape, cid, created, model, [], usage=usage(result)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    except (ConnectionError, asyncio.CancelledError):
        task.cancel()
        raise asyncio.CancelledError("client disconnected") from None
    except Exception as exc:  # noqa: BLE001 - a fault of the stream's own code (shaping, text, logprobs)
        if not resp.prepared:
            raise  # no headers sent yet: the middleware answers with its status
        log.exception("stream %s failed", cid)
        try:
            return await end_with_error(exc)
        except ConnectionError:
            raise asyncio.CancelledError("client disconnected") from None
    finally:
        await cancel_and_wait(task)
        if not finished and sent:
            metrics.record_sent_tokens(mode, sent)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(model_list(state.config.model_name, state.started))


# --------------------------------------------------------------------------- retrieval service


def _passage_json(state: ServerState, doc_id: int) -> dict[str, Any]:
    p = state.retriever.corpus[doc_id]
    return {"doc_id": doc_id, "title": p.title, "text": p.text, "source_id": p.source_id}


async def retrieve(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cfg = state.config
    queries, k, include_text = parse_retrieve(await read_json(request, cfg.body_timeout_s), cfg.max_retrieve_queries,
                                              cfg.max_retrieve_k, cfg.max_retrieve_texts, len(state.retriever.corpus))
    assert state.search_client is not None
    hits = await run_watching(request, state.search_client.search(queries, k))
    state.metrics.retrieve_queries.inc(len(queries))
    corpus = state.retriever.corpus
    results = []
    for row in hits:
        out = []
        for h in row:
            d: dict[str, Any] = {"doc_id": h.doc_id, "score": h.score}
            if include_text:
                p = corpus[h.doc_id]
                d["title"], d["text"], d["source_id"] = p.title, p.text, p.source_id
            out.append(d)
        results.append(out)
    return web.json_response({"object": "retrieval", "retriever": state.retriever.kind, "k": k,
                              "results": results})


async def score(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request, state.config.body_timeout_s)
    query, ids = parse_score(body, len(state.retriever.corpus), state.config.max_ids)
    loop = asyncio.get_running_loop()
    scores = await loop.run_in_executor(state.executor, state.retriever.score, query, ids)
    return web.json_response({"object": "scores", "retriever": state.retriever.kind, "doc_ids": ids,
                              "scores": [float(s) for s in scores]})


async def passages(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request, state.config.body_timeout_s)
    ids = parse_passages(body, len(state.retriever.corpus), state.config.max_ids)
    loop = asyncio.get_running_loop()
    out = await loop.run_in_executor(state.executor, lambda: [_passage_json(state, i) for i in ids])
    return web.json_response({"object": "passages", "passages": out})


async def passage_one(request: web.Request) -> web.Response:
    state = request.app[STATE]
    raw = request.match_info["doc_id"]
    n = len(state.retriever.corpus)
    if not re.fullmatch(r"[0-9]{1,18}", raw) or not 0 <= int(raw) < n:  # ASCII digits ("²".isdigit())
        raise APIError(404, f"no passage {raw!r} (doc ids are 0..{n - 1})", "not_found", "doc_id")
    loop = asyncio.get_running_loop()
    return web.json_response(await loop.run_in_executor(state.executor, _passage_json, state, int(raw)))


async def retriever_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cfg = state.config
    return web.json_response({"kind": state.retriever.kind, "corpus_size": len(state.retriever.corpus),
                              "limits": {"queries": cfg.max_retrieve_queries, "k": cfg.max_retrieve_k,
                                         "texts": cfg.max_retrieve_texts, "ids": cfg.max_ids}})


# --------------------------------------------------------------------------- health / metrics


def knowledge_base_info(retriever: Retriever) -> dict[str, Any]:
    """How this server's knowledge base is named: its own ``label`` (an EMULATED padded one), an
    emulated label rebuilt from a remote service's kind (``exact+padN``), else the real size."""
    n = len(retriever.corpus)
    pad = getattr(retriever, "pad", None)
    kind = str(retriever.kind)
    if pad is None and "+pad" in kind and kind.rsplit("+pad", 1)[1].isdigit():
        pad = int(kind.rsplit("+pad", 1)[1])
    label = getattr(retriever, "label", None) or (emulated_label(n, pad) if pad else real_label(n))
    return {"label": label, "kind": kind, "passages": n, "emulated_pad": int(pad or 0)}


def _memory(lm: Any, retriever: Any, trimmer: HeapTrimmer | None) -> dict[str, Any]:
    """Where a long-running server's memory goes: the process's RSS and C heap (glibc's view:
    in use vs freed-but-kept; None off glibc) and what the heap trims gave back, the LM's caches
    (``HFLanguageModel.memory``: sessions, KV, prefix blocks; absent for other backends) and the
    query encoder's LRU cache (a local dense knowledge base's). ``workers`` (the Ray actors'
    processes) is filled in by ``_stats_with_workers``."""
    out: dict[str, Any] = process_memory(trimmer)
    out["workers"] = []
    if hasattr(lm, "memory"):
        out["lm"] = lm.memory()
    encoder = getattr(retriever, "encoder", None)
    if hasattr(encoder, "cache_info"):
        out["encoder_cache"] = encoder.cache_info()
    return out


def _stats(state: ServerState) -> dict[str, Any]:
    kb = knowledge_base_info(state.retriever)
    out: dict[str, Any] = {"knowledge_base": kb["label"], "retriever": kb["kind"], "emulated_pad": kb["emulated_pad"]}
    if hasattr(state.retriever, "pad_seconds"):  # a local EMULATED knowledge base: its padded scans alone
        r = state.retriever
        out["emulation"] = {"pad_searches": r.pad_searches, "pad_queries": r.pad_queries,
                            "pad_seconds": r.pad_seconds}
    lm = getattr(state.engine, "lm", None)
    dtype = dtype_name(lm)
    if dtype is not None:  # which numbers it computes in (--lm-dtype auto: lm/loader.py)
        out["lm_dtype"] = dtype
    runner = getattr(lm, "runner", None)
    if runner is not None:  # how the LM ran (``KVRunner.state``), every field present for every runner
        out["lm_runner"] = {"cuda_graphs": 0, "compiled_spans": [], "batched_steps_by_live_rows": {},
                            **runner.state()}
    out["memory"] = _memory(lm, state.retriever, state.trimmer)
    if state.scheduler is not None:
        return {**state.scheduler.stats(), "speculation": state.metrics.speculation(), **out}
    sc = state.search_client
    if sc is None:
        return out
    return {"kb_batch_queries": sc.batch_queries.summary(), "kb_batch_callers": sc.batch_callers.summary(),
            "kb_calls": sc.calls, "kb_failures": sc.failures, "kb_busy_s": sc.busy_s, **out}


async def health(request: web.Request) -> web.Response:
    """200 ``status: ok``; 503 ``status: failed`` with ``error`` once the LM can run no more
    requests (a vLLM engine after a failed step: ``VLLMLanguageModel.failed``), so that a process
    supervisor or load balancer takes the server out and restarts it."""
    state = request.app[STATE]
    s = state.scheduler
    failed = getattr(getattr(state.engine, "lm", None), "failed", None)
    return web.json_response({
        "status": "ok" if failed is None else "failed", **({} if failed is None else {"error": failed}),
        "mode": "full" if state.engine is not None else "retrieval-only",
        "model": state.config.model_name if state.engine is not None else None,
        "retriever": state.retriever.kind, "corpus_size": len(state.retriever.corpus),
        "active": s.active if s else 0, "queued": s.queued if s else 0,
        "uptime_s": time.time() - state.started, "version": __version__,
    }, status=200 if failed is None else 503)


def _workers(state: ServerState) -> list[Callable[[float], list[dict[str, Any]]]]:
    """The ``worker_memory`` readers of the processes this server drives: its LM replicas
    (``--lm-replicas``) and knowledge-base shard actors (``--shards``); none in one process."""
    owners = (getattr(state.engine, "lm", None), state.retriever)
    return [fn for fn in (getattr(o, "worker_memory", None) for o in owners) if fn is not None]


async def _stats_with_workers(state: ServerState) -> dict[str, Any]:
    """``_stats`` plus ``memory.workers``: each Ray actor's ``process_memory`` row (role, index,
    pid, RSS, heap, heap trims; or ``error`` when it did not answer within
    ``worker_stats_timeout_s``). Ray calls block, so they run on the I/O pool, one read at a
    time: callers arriving while a read is under way share its rows, so scrapes during a
    worker's outage cannot fill the pool that ``/v1/score`` and passage reads need."""
    st = _stats(state)
    readers = _workers(state)
    if readers:
        if state.workers_read is None or state.workers_read.done():
            timeout_s = state.config.worker_stats_timeout_s
            state.workers_read = asyncio.get_running_loop().run_in_executor(
                state.executor, lambda: [row for fn in readers for row in fn(timeout_s)])
        st["memory"]["workers"] = await asyncio.shield(state.workers_read)
    return st


async def stats(request: web.Request) -> web.Response:
    return web.json_response(await _stats_with_workers(request.app[STATE]))


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    st = await _stats_with_workers(state)
    text = state.metrics.render(st if state.scheduler is not None else None,
                                st if state.scheduler is None and state.search_client is not None else None,
                                knowledge_base=knowledge_base_info(state.retriever), memory=st["memory"])
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})
