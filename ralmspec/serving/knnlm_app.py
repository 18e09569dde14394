"""aiohttp application of a kNN-LM server (``ralmspec knnlm serve``): OpenAI completions decoded
by the kNN-LM (docs/knnlm.md), speculative by default, token-identical to the naive decoder.

Routes (docs/knnlm.md "Serving over HTTP"):

- ``POST /v1/completions``  OpenAI completions + the ``knnlm`` extension (``speculate``, ``k``,
  ``lam``, ``knn_temperature``, OS^3 and cache knobs); greedy only (``temperature`` 0 or absent);
  ``stop`` strings; ``stream: true`` sends Server-Sent Events of VERIFIED text only, then
  ``data: [DONE]``. The answer's ``knnlm`` field holds the mode, times, settings and speculation
  counters.
- ``POST /v1/chat/completions``  the same for messages, rendered by the model's chat template
  (the prompt is the template before the last user message, the message, and the assistant's
  header); EOS (the end of the assistant's turn) stops it.
- ``GET /v1/models``, ``GET /health``, ``GET /v1/stats`` (JSON), ``GET /metrics`` (Prometheus).

How requests run: ``max_concurrent`` worker threads (default 1) each decode one request at a
time, in arrival order (a kNN-LM request holds one KV session and searches the datastore at
every token). On the ``batched`` LM runner (``--lm-runner batched``) the threads share it
through a ``SharedRunner`` (``ralmspec/lm/shared_runner.py``) and a ``SharedSearch``
(``ralmspec/knnlm/shared_search.py``): the one-token steps of the requests decoding at once run
as one batch-invariant forward, and their datastore searches as one search (when: the rule of
``ralmspec/rendezvous.py``); while more than ``speculate_max_active`` (default 1) requests
decode, speculation is paused (verified steps: a speculating request leaves the lock-step of the
shared batches, measured slower than all of them stepping naively together; docs/knnlm.md). On
any other runner each thread
has its own view of the LM (same weights, own runner): requests overlap (one's search beside
another's LM step) but do not share forwards. Either way a request's tokens never depend on its
neighbours. ``max_queue`` requests may wait for a thread (then
429); ``request_timeout_s`` bounds a request, queueing included (504). A client that
disconnects, or a deadline that passes, halts its decoder at the next token it decides (the
decoders' ``stop_when``: a halted request finishes its round's verification and is dropped;
nothing unverified is ever sent). Stop strings end decoding where the naive decoder ends
(``engine/stop.py``'s ``StopWatch`` as the decoders' ``stop_when``), and the answer is cut there.

Errors follow ralmspec/serving/app.py's contract (JSON ``{"error": {...}}``, 400 naming the field).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from aiohttp import web

from ralmspec import __version__
from ralmspec.engine.prompt import Conversation, NoChatTemplateError, PromptFormat
from ralmspec.engine.result import GenerationResult
from ralmspec.engine.scheduler import QueueFullError, RequestTimeoutError, SchedulerClosedError
from ralmspec.engine.stop import StopWatch, cut_result
from ralmspec.config import check_api_key, check_seconds
from ralmspec.errors import ConfigError
from ralmspec.knnlm.model import KNNLM, KNNLMResult
from ralmspec.knnlm.open import warm_datastore
from ralmspec.knnlm.speculative import SpeculativeKNNConfig, SpeculativeKNNLM
from ralmspec.knnlm.shared_search import SharedSearch
from ralmspec.lm.shared_runner import SharedRunner
from ralmspec.memory import HeapTrimmer, check_trim_interval, process_memory
from ralmspec.rendezvous import Rendezvous
from ralmspec.threads import WorkerPool, to_thread
from ralmspec.serving.app import (
    error_for, new_application, read_json, run_watching,
    stream_verified,
)
from ralmspec.serving.metrics import ServerMetrics, admission_lines, counter_total
from ralmspec.serving.protocol import APIError, KNNLMCompletionRequest, parse_knnlm_completion
from ralmspec.serving.shapes import CHAT, COMPLETION, Shape, answer, model_list


@dataclass(frozen=True)
class KNNLMServerConfig:
    """HTTP-level settings of one kNN-LM server."""

    model_name: str = "ralmspec-knnlm"  # the `model` clients must send
    client_max_size: int = 1 << 20  # bytes of request body; larger -> 413
    body_timeout_s: float = 30.0  # the whole request body must arrive within this; slower -> 408; 0: no limit
    # a connection idle this long, or still sending its request line and headers, is closed
    # (aiohttp's keepalive_timeout: its own default, 3630 s, let half-sent headers hold a socket an hour)
    idle_timeout_s: float = 75.0
    max_concurrent: int = 1  # requests decoding at once, each in its own thread (module doc)
    gather_s: float | None = None  # batched runner: longest wait for more steps (SharedRunner; None: auto)
    speculate_max_active: int = 1  # batched runner: requests speculate only while at most this many decode
    max_queue: int = 16  # requests waiting for a thread; beyond -> 429
    request_timeout_s: float = 300.0  # per request, queueing included; 0: no limit
    speculate: bool = True  # a request without `knnlm.speculate` runs speculatively
    malloc_trim_s: float = 60.0  # seconds between C heap trims (ralmspec/memory.py); 0: never
    api_key: str | None = None  # required as 'Authorization: Bearer <key>' on every path but OPEN_PATHS

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ConfigError("model_name must be non-empty")
        if self.client_max_size < 1:
            raise ConfigError(f"client_max_size must be >= 1, got {self.client_max_size}")
        check_seconds(self.body_timeout_s, "body_timeout_s", zero="no limit")
        check_seconds(self.idle_timeout_s, "idle_timeout_s")
        check_api_key(self.api_key)
        if not isinstance(self.max_concurrent, int) or self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent must be an integer >= 1, got {self.max_concurrent!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ConfigError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        check_seconds(self.request_timeout_s, "request_timeout_s", zero="no limit")
        check_trim_interval(self.malloc_trim_s)
        if not isinstance(self.speculate_max_active, int) or self.speculate_max_active < 1:
            raise ConfigError(f"speculate_max_active must be an integer >= 1, got {self.speculate_max_active!r}")
        if self.gather_s is not None and not 0 <= self.gather_s <= 10:
            raise ConfigError(f"gather_s (--gather-ms / 1000) must be in [0, 10] seconds (None: auto), "
                              f"got {self.gather_s!r}")


class KNNLMWorker:
    """Runs decoding jobs in ``len(views)`` threads, in arrival order, with admission control.

    Each thread decodes with a view of its own (``views``: ``KNNLM``s over the same weights and
    datastore, each with its own LM runner: a runner serves one thread at a time), so a
    request's tokens never depend on which others run beside it.
    ``run(job, halt, timeout_s)``: ``job(view)`` admitted while fewer than ``threads + max_queue``
    jobs are admitted (else ``QueueFullError``), awaited with the deadline; on a deadline
    (``RequestTimeoutError``) or a cancel (the client left) ``halt`` is set, which the job's
    decoder reads as "stop now", and a job still queued never starts. A job counts as admitted
    until its thread is done with it, so the bounds hold the real work."""

    def __init__(self, views: Sequence[KNNLM], max_queue: int):
        self.threads, self.max_queue = len(views), max_queue
        self.free: queue.SimpleQueue[KNNLM] = queue.SimpleQueue()  # a thread's job takes one, gives it back
        for v in views:
            self.free.put(v)
        self.pool = WorkerPool(max_workers=self.threads, thread_name_prefix="knnlm-lm")
        self.admitted = 0
        self.closed = False
        self.counts = {"completed": 0, "rejected": 0, "cancelled": 0, "timed_out": 0, "failed": 0}
        self._lock = threading.Lock()
        self.running = 0  # jobs decoding now (under the lock)
        self.peak_running = 0
        self.busy_s = 0.0  # thread-seconds spent decoding

    async def run(self, job: Callable[[KNNLM], Any], halt: threading.Event, timeout_s: float) -> Any:
        if self.closed:
            raise SchedulerClosedError("the server is shutting down")
        if self.admitted >= self.threads + self.max_queue:
            self.counts["rejected"] += 1
            raise QueueFullError(f"the kNN-LM server is busy: {self.threads} request(s) decoding "
                                 f"(--max-concurrent) and {self.max_queue} waiting (--max-queue); retry later")
        loop = asyncio.get_running_loop()
        self.admitted += 1

        def timed() -> Any:
            if halt.is_set():  # cancelled or past its deadline while queued
                return None
            view = self.free.get_nowait()  # never empty: as many views as threads
            t0 = time.perf_counter()
            with self._lock:
                self.running += 1
                self.peak_running = max(self.peak_running, self.running)
            try:
                return job(view)
            finally:
                self.free.put(view)
                with self._lock:
                    self.running -= 1
                    self.busy_s += time.perf_counter() - t0

        def release(_f: Any) -> None:
            try:
                loop.call_soon_threadsafe(self._release)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

        fut = self.pool.submit(timed)
        fut.add_done_callback(release)
        try:
            async with asyncio.timeout(timeout_s or None):
                out = await asyncio.wrap_future(fut)
        except TimeoutError:
            halt.set()
            self.counts["timed_out"] += 1
            raise RequestTimeoutError(f"request exceeded its deadline of {timeout_s:g} s") from None
        except asyncio.CancelledError:
            halt.set()
            self.counts["cancelled"] += 1
            raise
        except Exception:
            self.counts["failed"] += 1
            raise
        self.counts["completed"] += 1
        return out

    def _release(self) -> None:
        self.admitted -= 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            running, peak, busy = self.running, self.peak_running, self.busy_s
        return {"queued": max(0, self.admitted - running), "active": running, "peak_active": peak,
                "max_concurrent": self.threads, "max_queue": self.max_queue, **self.counts, "busy_s": busy}

    def close(self) -> None:
        self.closed = True
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class KNNLMServerState:
    knn: KNNLM  # the server's LM + datastore with its default decoding settings
    spec: SpeculativeKNNConfig  # the default speculation settings
    config: KNNLMServerConfig
    metrics: ServerMetrics
    datastore: dict[str, Any]  # the datastore's description (describe())
    worker: KNNLMWorker | None = None
    sharing: Sharing | None = None  # the decoding threads' shared runner and search (batched runner)
    trimmer: HeapTrimmer | None = None
    started: float = 0.0

    @property
    def max_tokens_limit(self) -> int:
        return max(1, min(4096, int(getattr(self.knn.lm, "max_context", 4096)) - 2))

    def release(self) -> None:
        """Drop the kNN-LM (its LM and datastore), the worker and the sharing (the application's
        cleanup, once the worker is joined): aiohttp keeps the applications of its latest 1024
        middleware chains alive in a module-wide cache, and this state with them (as
        ``ServerState.release``). Only the metrics and the settings are left."""
        self.knn = self.worker = self.sharing = self.trimmer = None  # type: ignore[assignment]


KNN_STATE = web.AppKey("ralmspec_knnlm_state", KNNLMServerState)


@dataclass
class Sharing:
    """The decoding threads' shared batched runner and datastore search (module doc); each job
    runs as a member of ``rendezvous``. ``may_speculate``: speculation only while at most
    ``max_active`` requests decode (module doc: above that, sharing beats speculating)."""

    rendezvous: Rendezvous
    runner: SharedRunner
    search: SharedSearch
    max_active: int  # KNNLMServerConfig.speculate_max_active

    def may_speculate(self) -> bool:
        return self.rendezvous.members <= self.max_active

    def stats(self) -> dict[str, Any]:
        return {"lm_steps": self.runner.stats(), "searches": self.search.stats(),
                "speculate_max_active": self.max_active}


def decoding_views(knn: KNNLM, threads: int, gather_s: float | None,
                   speculate_max_active: int) -> tuple[list[KNNLM], Sharing | None]:
    """The ``KNNLM`` of each decoding thread (module doc). On a batch-invariant runner (``batched``)
    and several threads, ``knn`` over ONE ``SharedRunner`` of its runner and ONE ``SharedSearch``
    of its datastore for all of them, and those (``Sharing``); otherwise ``knn`` and ``threads - 1``
    views of its LM (``HFLanguageModel.view``: same weights, own runner), and None."""
    runner = knn.lm.runner
    if threads > 1 and getattr(runner, "batch_rows", 1) > 1:
        if runner.capacity is not None and runner.capacity < threads:
            raise ConfigError(f"--max-concurrent {threads} needs as many KV slots, but the {runner.name} runner "
                              f"has {runner.capacity}; lower --max-concurrent")
        rv = Rendezvous()
        sharing = Sharing(rv, SharedRunner(runner, rv, gather_s), SharedSearch(knn.datastore, rv, gather_s),
                          speculate_max_active)
        shared = KNNLM(knn.lm, knn.datastore, knn.config, runner=sharing.runner, search=sharing.search.search)
        return [shared] * threads, sharing
    view = getattr(knn.lm, "view", None)
    if threads > 1 and view is None:
        raise ConfigError(f"more than one concurrent kNN-LM request needs an LM backend with views (the transformers "
                          f"backend), got {type(knn.lm).__name__}")
    return [knn] + [KNNLM(view(), knn.datastore, knn.config) for _ in range(threads - 1)], None


def create_knnlm_app(knn: KNNLM, spec: SpeculativeKNNConfig | None = None,
                     config: KNNLMServerConfig | None = None) -> web.Application:
    """The application around ``knn`` (an LM and a datastore, checked compatible; its config is
    the requests' default, ``max_new_tokens`` the default ``max_tokens``), and, for
    ``max_concurrent`` > 1, what the threads decode with (``decoding_views``); the datastore is warmed
    first (``warm_datastore``). The worker threads start with
    the application and are joined at cleanup (running requests halted first)."""
    cfg = config or KNNLMServerConfig()
    warm_s = warm_datastore(knn.datastore, knn.config.k)  # first-use costs now, not in a request's OS^3
    state = KNNLMServerState(knn, spec or SpeculativeKNNConfig(), cfg, ServerMetrics(),
                             knn.datastore.describe() | {"warm_s": warm_s})
    app = new_application(cfg.client_max_size, cfg.idle_timeout_s, state.metrics, cfg.api_key)
    app[KNN_STATE] = state

    views, state.sharing = decoding_views(knn, cfg.max_concurrent, cfg.gather_s, cfg.speculate_max_active)

    async def on_startup(app: web.Application) -> None:
        state.started = time.time()
        state.worker = KNNLMWorker(views, cfg.max_queue)
        state.trimmer = HeapTrimmer(cfg.malloc_trim_s).start()

    async def on_cleanup(app: web.Application) -> None:
        if state.trimmer is not None:
            await to_thread(state.trimmer.close)
        if state.worker is not None:
            await to_thread(state.worker.close)
        own_views = {id(v.lm): v.lm for v in views if v.lm is not state.knn.lm}  # the caller's LM is the caller's
        for lm in own_views.values():
            lm.close()  # the decoding threads' own LM views (their KV)
        views.clear()
        state.release()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    r = app.router
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_get("/v1/models", models)
    r.add_get("/v1/stats", stats)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    return app


# --------------------------------------------------------------------------- completions


def as_generation_result(req: KNNLMCompletionRequest, knn: KNNLM, res: KNNLMResult) -> GenerationResult:
    """The decoder's result in the engine's result shape (the response shapes and metrics read
    it): finish "eos" after a stop token, else "length"; then cut at the first stop string."""
    eos = bool(res.tokens) and knn.is_stop(res.tokens[-1])
    stats = res.stats.to_dict() if res.stats is not None else {}
    prompt = req.prompt.question if isinstance(req.prompt, Conversation) else req.prompt
    gr = GenerationResult(prompt=prompt, mode=res.mode, prompt_ids=list(res.prompt_ids),
                          token_ids=list(res.tokens), text=res.text, steps=[],
                          finish_reason="eos" if eos else "length", latency_s=res.wall_s,
                          stats={**stats, "lm_s": res.lm_s, "search_s": res.search_s})
    return cut_result(gr, req.stop, knn.lm.tokenizer)


def knnlm_fields(req: KNNLMCompletionRequest, result: GenerationResult) -> dict[str, Any]:
    """The answer's ``knnlm`` field: the mode, the settings in effect, times and counters."""
    spec = {k: getattr(req.spec, k) for k in ("os3", "fixed_stride", "s_max", "gamma_max", "cache_capacity",
                                              "successors", "async_verify", "strict")}
    return {"mode": result.mode, "latency_s": result.latency_s,
            "settings": {"k": req.knn.k, "lam": req.knn.lam, "knn_temperature": req.knn.temperature,
                         "max_new_tokens": req.knn.max_new_tokens, "speculate": req.speculate,
                         **(spec if req.speculate else {})},
            "stats": result.stats}


def encode_request(knn: KNNLM, req: KNNLMCompletionRequest) -> list[int]:
    """The request's prompt ids, checked: the text, or the messages rendered by the model's chat
    template (``engine/prompt.py``'s chat layout without a passage: the template before the last
    user message, the message, the template after it, i.e. the assistant's header); else a 400
    naming ``prompt`` / ``messages``."""
    if not isinstance(req.prompt, Conversation):
        try:
            return knn.check_prompt(req.prompt, req.knn.max_new_tokens)
        except ConfigError as exc:
            raise error_for(exc) from None
    tokenizer = knn.lm.tokenizer
    try:
        fmt = PromptFormat.chat(tokenizer, req.prompt.history)
        question = fmt.encode_question(tokenizer, req.prompt.question, after_passage=False)
        ids = fmt.build(None, question, len(question), knn.lm.max_context)
        return knn.check_prompt(ids, req.knn.max_new_tokens)
    except NoChatTemplateError:  # the engine's message names --prompt-format, a flag this server lacks
        raise APIError(400, f"this server's model ({knn.lm.name}) has no chat template, so it cannot answer "
                       "messages: use /v1/completions", "invalid_request_error", "messages") from None
    except ConfigError as exc:
        raise APIError(400, str(exc), "invalid_request_error", "messages") from None


async def decode(state: KNNLMServerState, req: KNNLMCompletionRequest,
                 on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
    """Run ``req`` on the worker thread: the naive or speculative decoder with the request's
    settings, stopped by its stop strings or by ``halt`` (deadline, client gone)."""
    assert state.worker is not None
    knn = state.knn.with_config(req.knn)
    prompt_ids = encode_request(knn, req)  # a bad prompt is a 400 before it queues
    halt = threading.Event()
    watch = StopWatch(knn.lm.tokenizer, req.stop)

    def stop_when(generated: Any) -> bool:
        return halt.is_set() or watch.completed(generated)

    def job(view: KNNLM) -> KNNLMResult:
        mine = view.with_config(req.knn)
        sharing = state.sharing
        with sharing.rendezvous.member() if sharing is not None else contextlib.nullcontext():
            if req.speculate:
                return SpeculativeKNNLM(mine, req.spec).generate(
                    prompt_ids, on_tokens=on_tokens, stop_when=stop_when,
                    may_speculate=None if sharing is None else sharing.may_speculate)
            return mine.generate(prompt_ids, on_tokens=on_tokens, stop_when=stop_when)

    res = await state.worker.run(job, halt, state.config.request_timeout_s)
    return as_generation_result(req, knn, res)


async def completions(request: web.Request) -> web.StreamResponse:
    return await respond(request, COMPLETION)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await respond(request, CHAT)


async def respond(request: web.Request, shape: Shape) -> web.StreamResponse:
    """Parse, decode, answer in ``shape`` (streamed as ``ralmspec serve`` streams: ralmspec/serving/app.py
    ``stream_verified``, verified text only, ``knnlm`` in the finish chunk)."""
    state = request.app[KNN_STATE]
    body = await read_json(request, state.config.body_timeout_s)
    req = parse_knnlm_completion(body, state.knn.config, state.spec, state.config.speculate,
                                 state.config.model_name, state.max_tokens_limit, chat=shape is CHAT)
    tokenizer = state.knn.lm.tokenizer
    if req.stream:
        return await stream_verified(
            request, lambda on_tokens: decode(state, req, on_tokens), shape=shape, model=state.config.model_name,
            tokenizer=tokenizer, stops=req.stop, logprobs=False, include_usage=req.include_usage,
            metrics=state.metrics, mode="speculative" if req.speculate else "naive",
            extension=lambda result: {"knnlm": knnlm_fields(req, result)})
    t0 = time.perf_counter()
    result = await run_watching(request, decode(state, req))
    state.metrics.record_completion(result, time.perf_counter() - t0)
    return web.json_response(answer(shape, f"{shape.id_prefix}-{uuid.uuid4().hex}", int(time.time()),
                                    state.config.model_name, result, tokenizer, {"knnlm": knnlm_fields(req, result)}))


# --------------------------------------------------------------------------- the rest


async def models(request: web.Request) -> web.Response:
    state = request.app[KNN_STATE]
    return web.json_response(model_list(state.config.model_name, state.started))


def _stats(state: KNNLMServerState) -> dict[str, Any]:
    assert state.worker is not None
    knn = state.knn
    return {"version": __version__, "model": state.config.model_name, "lm": getattr(knn.lm, "name", None),
            "uptime_s": time.time() - state.started, "datastore": state.datastore,
            "defaults": {"k": knn.config.k, "lam": knn.config.lam, "knn_temperature": knn.config.temperature,
                         "max_new_tokens": knn.config.max_new_tokens, "speculate": state.config.speculate,
                         "speculation": asdict(state.spec)},
            "lm_runner": getattr(knn.lm.runner, "name", None),
            "lm_batching": state.sharing.stats() if state.sharing is not None else None,
            "queue": state.worker.stats(), "speculation": state.metrics.speculation(),
            "memory": process_memory(state.trimmer)}


async def stats(request: web.Request) -> web.Response:
    return web.json_response(_stats(request.app[KNN_STATE]))


async def health(request: web.Request) -> web.Response:
    state = request.app[KNN_STATE]
    ok = state.worker is not None and not state.worker.closed
    return web.json_response({"status": "ok" if ok else "shutting_down", "version": __version__,
                              "model": state.config.model_name, "datastore": state.datastore["path"]},
                             status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[KNN_STATE]
    assert state.worker is not None
    ds = state.datastore
    text = state.metrics.render(knowledge_base={"label": f"knnlm datastore {ds['entries']} entries",
                                                "kind": f"knnlm-{ds['index']}", "passages": ds["entries"]})
    extra = admission_lines("ralmspec_knnlm", state.worker.stats(), "Requests waiting for a decoding thread.",
                            "Requests decoding now.", "Decoding threads (--max-concurrent).")
    if state.sharing is not None:
        shared = state.sharing.stats()
        for lane, what in (("lm_steps", "LM forwards"), ("searches", "datastore searches")):
            extra += counter_total(f"ralmspec_knnlm_shared_{lane}_batches_total",
                                   f"{what} run for the decoding threads (--lm-runner batched).",
                                   shared[lane]["batches"])
            extra += counter_total(f"ralmspec_knnlm_shared_{lane}_calls_total",
                                   f"Requests' calls served by those {what} (calls / batches: sharing).",
                                   shared[lane]["calls"])
    return web.Response(text=text + "\n".join(extra) + "\n", content_type="text/plain")
