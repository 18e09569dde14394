"""Health, Prometheus metrics, back-pressure (429), deadlines (504) and client disconnects."""

from __future__ import annotations

import asyncio
import platform
import re
import time

import pytest

import ralmspec
from ralmspec.engine.scheduler import SchedulerConfig
from ralmspec.serving.app import ServerConfig, create_app
from tests.serving.support import MODEL, ServerThread, request
from tests.conftest import SMALL_CORPUS_SIZE

LONG = {"model": MODEL, "prompt": "the history of the roman empire", "max_tokens": 1000, "ralm": {"stride": 1}}


def _metric(text: str, name: str, **labels: str) -> float:
    items = sorted(labels.items(), key=lambda kv: (kv[0] == "le", kv[0]))  # `le` comes last
    want = ",".join(f'{k}="{v}"' for k, v in items)
    pat = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)$"
    m = re.search(pat, text, re.M)
    assert m, f"{name}{{{want}}} not in /metrics"
    return float(m.group(1))


def test_health(server):
    status, body = request("GET", f"{server.url}/health")
    assert status == 200
    assert body["status"] == "ok" and body["mode"] == "full" and body["model"] == MODEL
    assert body["retriever"] == "exact" and body["corpus_size"] == SMALL_CORPUS_SIZE
    assert body["active"] == 0 and body["queued"] == 0
    assert body["version"] == ralmspec.__version__


def test_health_is_503_once_the_lm_can_run_no_more_requests(server, serving_engine, monkeypatch):
    """A vLLM engine whose step failed cannot run another (``VLLMLanguageModel.failed``,
    tests/lm/test_vllm_user_models.py): /health says so with a 503, so a supervisor restarts the
    server instead of routing requests that would all fail. (The flag is set on the tiny LM here:
    vLLM is not in this venv.)"""
    monkeypatch.setattr(serving_engine.lm, "failed", "RuntimeError: kernel failed", raising=False)
    status, body = request("GET", f"{server.url}/health")
    assert status == 503 and body["status"] == "failed" and body["error"] == "RuntimeError: kernel failed"
    monkeypatch.undo()
    assert request("GET", f"{server.url}/health")[0] == 200


def _count(text: str, name: str) -> float:
    """An unlabelled counter's value; 0 while it has no sample yet (a fresh server)."""
    assert f"# TYPE {name} counter" in text, name
    return _metric(text, name) if re.search("^" + re.escape(name) + " ", text, re.M) else 0.0


SPECULATION_COUNTERS = {"speculated": "ralmspec_speculated_steps_total", "accepted": "ralmspec_accepted_steps_total",
                        "rollbacks": "ralmspec_rollbacks_total"}


def test_metrics_prometheus_text(server):
    """/metrics in Prometheus text; the speculation counters grow by exactly what the responses'
    ``ralm.stats`` report. The speculative request is built to speculate and to roll back: a
    fixed stride, a one-passage prefetch and synchronous verification (so the same rounds every
    run) on an answer whose passage changes inside a round."""
    before = request("GET", f"{server.url}/metrics")[1]
    answered = []
    for ralm in ({"speculate": True, "prefetch": 1, "os3": False, "async_verify": False}, {"speculate": False}):
        status, body = request("POST", f"{server.url}/v1/completions",
                               {"model": MODEL, "prompt": "what is the tallest mountain in europe", "max_tokens": 12,
                                "ralm": ralm})
        assert status == 200
        answered.append(body)
    request("POST", f"{server.url}/v1/completions", {"model": MODEL})  # one 400
    status, text = request("GET", f"{server.url}/metrics")
    assert status == 200 and isinstance(text, str)
    assert _metric(text, "ralmspec_http_requests_total", endpoint="/v1/completions", status="200") >= 2
    assert _metric(text, "ralmspec_http_requests_total", endpoint="/v1/completions", status="400") >= 1
    assert _metric(text, "ralmspec_request_latency_seconds_count", mode="speculative") >= 1
    assert _metric(text, "ralmspec_request_latency_seconds_bucket", mode="naive", le="+Inf") >= 1
    assert _metric(text, "ralmspec_completion_tokens_total", mode="naive") >= 12
    spec, acc = _metric(text, "ralmspec_speculated_steps_total"), _metric(text, "ralmspec_accepted_steps_total")
    assert _metric(text, "ralmspec_acceptance_rate") == pytest.approx(acc / spec)
    stats = answered[0]["ralm"]["stats"]
    assert stats["speculated"] >= 1 and stats["rollbacks"] >= 1, stats  # the case produces both
    for key, name in SPECULATION_COUNTERS.items():
        assert _count(text, name) - _count(before, name) == stats[key], name
    assert _metric(text, "ralmspec_rollbacks_total") + acc <= spec  # a rollback rejects one speculated step
    assert _metric(text, "ralmspec_queue_depth") == 0 and _metric(text, "ralmspec_active_requests") == 0
    assert _metric(text, "ralmspec_kb_batch_queries_count") >= 2
    assert _metric(text, "ralmspec_lm_batch_size_count") >= 2
    assert _metric(text, "ralmspec_process_resident_memory_bytes") > 1e6
    if platform.libc_ver()[0] == "glibc":
        assert _metric(text, "ralmspec_process_heap_in_use_bytes") > 1e6
        assert _metric(text, "ralmspec_process_heap_free_bytes") >= 0
    kb = f"real {SMALL_CORPUS_SIZE:,} passages"  # the knowledge base is named (EMULATED with --emulate-pad)
    assert _metric(text, "ralmspec_knowledge_base_info", emulated_pad="0", kind="exact", label=kb,
                   passages=str(SMALL_CORPUS_SIZE)) == 1
    assert request("GET", f"{server.url}/v1/stats")[1]["knowledge_base"] == kb
    assert _metric(text, "ralmspec_build_info", version=ralmspec.__version__) == 1
    # format sanity: every sample line is `name{labels} value`, every family has HELP and TYPE
    for line in text.splitlines():
        assert line.startswith("# ") or re.match(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? \S+$', line), line
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    assert {"ralmspec_http_requests_total", "ralmspec_request_latency_seconds", "ralmspec_kb_batch_queries"} <= families


def _start(engine, **sched):
    return ServerThread(create_app(engine, SchedulerConfig(**sched), server_config=ServerConfig(model_name=MODEL))).start()


@pytest.fixture(scope="module")
def small_server(serving_engine):
    """One slot, no queue: makes back-pressure observable."""
    srv = _start(serving_engine, max_concurrent=1, max_queue=0, request_timeout_s=120)
    yield srv
    srv.stop()


def _wait_idle(srv, timeout=10.0) -> dict:
    end = time.time() + timeout
    while True:
        body = request("GET", f"{srv.url}/health")[1]
        if body["active"] == 0 and body["queued"] == 0 or time.time() > end:
            return body


def _sessions(engine) -> int:
    return engine.lm.cached_sessions


def test_queue_full_is_429_and_disconnect_frees_the_slot(small_server, serving_engine):
    """A streaming client holds the only slot: the next request gets 429; when the first client
    goes away mid-stream its slot and KV session are freed at once, and service resumes."""
    import aiohttp

    sessions_before = _sessions(serving_engine)

    async def go():
        async with aiohttp.ClientSession() as s:
            r1 = await s.post(f"{small_server.url}/v1/completions", json=dict(LONG, stream=True))
            assert r1.status == 200
            first = await r1.content.readline()  # the first verified chunk: the request holds the slot
            assert first.startswith(b"data: ")
            async with s.post(f"{small_server.url}/v1/completions",
                              json={"model": MODEL, "prompt": "who wrote hamlet", "max_tokens": 4}) as r2:
                body2, status2, retry = await r2.json(), r2.status, r2.headers.get("Retry-After")
            # a prompt with no tokens is refused before it would queue: a 400 naming it, not a 429
            async with s.post(f"{small_server.url}/v1/completions",
                              json={"model": MODEL, "prompt": "\u200b", "max_tokens": 4}) as r3:
                bad = r3.status, (await r3.json())["error"]
            r1.close()  # the client goes away mid-stream
            return status2, body2, retry, bad

    status2, body2, retry, bad = asyncio.run(go())
    assert status2 == 429 and body2["error"]["code"] == "queue_full" and retry == "1"
    assert bad[0] == 400 and bad[1]["param"] == "prompt" and "no tokens" in bad[1]["message"], bad
    t0 = time.time()
    health = _wait_idle(small_server)
    assert health["active"] == 0, "the disconnected request still holds its slot"
    assert time.time() - t0 < 5
    end = time.time() + 10
    while _sessions(serving_engine) > sessions_before and time.time() < end:
        time.sleep(0.02)
    assert _sessions(serving_engine) == sessions_before, "the disconnected request's KV session leaked"
    status, body = request("POST", f"{small_server.url}/v1/completions",
                           {"model": MODEL, "prompt": "who wrote hamlet", "max_tokens": 4})
    assert status == 200, body
    stats = request("GET", f"{small_server.url}/v1/stats")[1]
    assert stats["rejected"] >= 1 and stats["cancelled"] >= 1


def test_non_streaming_client_timeout_cancels_the_request(small_server):
    import aiohttp

    cancelled0 = request("GET", f"{small_server.url}/v1/stats")[1]["cancelled"]

    async def go():
        timeout = aiohttp.ClientTimeout(total=0.5)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            with pytest.raises(asyncio.TimeoutError):
                async with s.post(f"{small_server.url}/v1/completions", json=LONG) as r:
                    await r.read()

    asyncio.run(go())
    assert _wait_idle(small_server)["active"] == 0
    assert request("GET", f"{small_server.url}/v1/stats")[1]["cancelled"] == cancelled0 + 1


def test_request_deadline_is_504(serving_engine):
    srv = _start(serving_engine, max_concurrent=2, request_timeout_s=1.0)
    try:
        status, body = request("POST", f"{srv.url}/v1/completions", LONG)
        assert status == 504, body
        assert body["error"]["type"] == "timeout" and "deadline" in body["error"]["message"]
        assert _wait_idle(srv)["active"] == 0
    finally:
        srv.stop()


def test_a_stream_left_before_its_first_chunk_has_unwound_when_the_handler_ends():
    """A client gone while its stream waits for the first chunk: the generation is cancelled and
    its cleanup (a scheduler slot, an LM session) has run before the handler returns, as after
    the first chunk. It ran after: /metrics counted the 499 while /v1/stats still showed the
    request, and a server shutting down could stop under a generation still unwinding."""
    import socket
    import threading
    from urllib.parse import urlparse

    from aiohttp import web

    from ralmspec.serving.app import error_middleware, stream_verified
    from ralmspec.serving.metrics import ServerMetrics
    from ralmspec.serving.shapes import COMPLETION

    started, unwound = threading.Event(), threading.Event()
    metrics = ServerMetrics()

    async def run(on_tokens):  # a generation that never verifies a chunk and unwinds slowly
        try:
            started.set()
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.5)
            unwound.set()

    async def handler(request):
        return await stream_verified(request, run, shape=COMPLETION, model=MODEL, tokenizer=None, stops=(),
                                     logprobs=False, include_usage=False, metrics=metrics, mode="naive",
                                     extension=lambda r: {})

    app = web.Application(middlewares=[error_middleware(metrics, 1 << 20)])
    app.router.add_post("/stream", handler)
    srv = ServerThread(app).start()
    try:
        u = urlparse(srv.url)
        with socket.create_connection((u.hostname, u.port)) as sock:
            sock.sendall(b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert started.wait(30)  # the handler is waiting for the first chunk
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the handler has ended: its 499 is counted
            if 'status="499"' in metrics.render():
                break
            time.sleep(0.02)
        assert 'status="499"' in metrics.render() and unwound.is_set()
    finally:
        srv.stop()


def test_a_closed_engine_or_lm_behind_the_server_is_a_503_not_a_500():
    """``ClosedError`` (an engine or LM closed while a server still runs, a kNN-LM on a closed
    LM) fell through ``error_for`` to a 500; like the scheduler's own refusal, it is a 503."""
    from ralmspec.engine.scheduler import SchedulerClosedError
    from ralmspec.errors import ClosedError
    from ralmspec.serving.app import error_for

    for exc in (ClosedError("the language model 'tiny' was closed"), SchedulerClosedError("shutting down")):
        err = error_for(exc)
        assert err.status == 503 and err.message == str(exc), (err.status, err.message)


def test_a_server_that_ended_lets_go_of_its_engine(tiny_lm, small_indexes):
    """aiohttp keeps the applications of its latest middleware chains in a module-wide cache: a
    process serving one application after another (a notebook, a test harness) kept every ended
    server's engine, its model and its index, alive (+100 MB and an open index file a cycle)."""
    import gc
    import weakref

    from ralmspec.engine.core import RalmEngine
    from tests.serving.support import TEST_ENGINE_CONFIG

    engine = RalmEngine(tiny_lm.view(), small_indexes["exact"], TEST_ENGINE_CONFIG)
    srv = _start(engine, max_concurrent=1, max_queue=0, request_timeout_s=60)
    status, body = request("POST", f"{srv.url}/v1/completions", {"model": MODEL, "prompt": "who wrote hamlet",
                                                                 "max_tokens": 2})
    assert status == 200, body
    srv.stop()
    gone = weakref.ref(engine)
    del engine, srv
    gc.collect()
    assert gone() is None, [type(r).__name__ for r in gc.get_referrers(gone())]
