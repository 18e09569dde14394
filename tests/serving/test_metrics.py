"""ralmspec/serving/metrics.py: how a scrape renders the process's memory; over real sockets, that
what /metrics counts is what the clients were answered, and when."""

from __future__ import annotations

import asyncio
import json
import platform
import re
import time

from ralmspec.errors import RetrievalError
from ralmspec.memory import process_rss_bytes
from ralmspec.retrieval.base import Retriever
from ralmspec.serving.metrics import ServerMetrics
from tests.serving.conftest import serve
from tests.serving.support import MODEL, TEST_ENGINE_CONFIG, request

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_a_scrape_renders_the_memory_it_is_given():
    """The RSS and heap gauges show the ``memory`` of the stats the scrape already read (one
    /proc read per scrape), and read their own where none is given."""
    memory = {"rss_bytes": 123456789, "heap": {"in_use_bytes": 1000, "free_bytes": 20, "mmapped_bytes": 0,
                                               "arena_bytes": 1020, "releasable_bytes": 0}}
    text = ServerMetrics().render(memory=memory)
    lines = set(text.splitlines())
    assert "ralmspec_process_resident_memory_bytes 123456789" in lines
    assert "ralmspec_process_heap_in_use_bytes 1000" in lines and "ralmspec_process_heap_free_bytes 20" in lines
    own = ServerMetrics().render()
    rss = next(float(x.split()[1]) for x in own.splitlines() if x.startswith("ralmspec_process_resident_memory_bytes "))
    if process_rss_bytes() is not None:
        assert rss > 1e6
    assert ("ralmspec_process_heap_free_bytes" in own) == GLIBC


def test_a_scrape_labels_each_ray_worker_and_marks_the_silent_one_down():
    """``memory.workers`` (LM replicas, shard actors) become gauges labelled by role and index;
    a worker that did not answer is ``ralmspec_worker_up`` 0 with no memory gauges of its own."""
    heap = {"in_use_bytes": 7000, "free_bytes": 300, "mmapped_bytes": 0, "arena_bytes": 7300, "releasable_bytes": 0}
    workers = [{"role": "lm_replica", "index": 0, "pid": 11, "rss_bytes": 5000, "heap": heap, "heap_trim": None},
               {"role": "lm_replica", "index": 1, "error": "no answer within 2 s"},
               {"role": "kb_shard", "index": 0, "pid": 12, "rss_bytes": 6000, "heap": None, "heap_trim": None}]
    lines = set(ServerMetrics().render(memory={"rss_bytes": 1, "heap": None, "workers": workers}).splitlines())
    assert {'ralmspec_worker_up{role="lm_replica",index="0"} 1', 'ralmspec_worker_up{role="lm_replica",index="1"} 0',
            'ralmspec_worker_up{role="kb_shard",index="0"} 1',
            'ralmspec_worker_resident_memory_bytes{role="lm_replica",index="0"} 5000',
            'ralmspec_worker_resident_memory_bytes{role="kb_shard",index="0"} 6000',
            'ralmspec_worker_heap_in_use_bytes{role="lm_replica",index="0"} 7000',
            'ralmspec_worker_heap_free_bytes{role="lm_replica",index="0"} 300'} <= lines
    assert not any('index="1"' in x for x in lines if not x.startswith("ralmspec_worker_up"))
    assert not any('role="kb_shard"' in x for x in lines if x.startswith("ralmspec_worker_heap"))
    assert "# TYPE ralmspec_worker_up gauge" in lines
    alone = ServerMetrics().render(memory={"rss_bytes": 1, "heap": None, "workers": []})
    assert "ralmspec_worker_" not in alone  # one process: no worker gauges at all


# --------------------------------------------------------------------------- over real sockets

def _samples(text: str, name: str) -> dict[str, float]:
    """Every sample of the family ``name`` in /metrics: ``{labels: value}`` (labels as written)."""
    out = {}
    for line in text.splitlines():
        m = re.match(re.escape(name) + r"(\{[^}]*\})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


class _OverExact(Retriever):
    """The exact knowledge base ``inner`` behind a test's own ``search_sync`` (scores and
    passages are ``inner``'s)."""

    kind = "exact"

    def __init__(self, inner: Retriever):
        self.inner, self.corpus = inner, inner.corpus

    def score(self, query, doc_ids):
        return self.inner.score(query, doc_ids)


class _GoneAfterFirstSearch(_OverExact):
    """The exact knowledge base, answering its first search and failing every later one (after a
    short wait, so the answer's first chunk is streamed before the failure)."""

    def __init__(self, inner: Retriever):
        super().__init__(inner)
        self.searches = 0

    def search_sync(self, queries, k):
        self.searches += 1
        if self.searches > 1:
            time.sleep(0.3)
            raise RetrievalError("the knowledge base went away")
        return self.inner.search_sync(queries, k)


def test_a_stream_that_ends_with_an_error_is_counted_once_as_that_error(small_indexes, tiny_lm):
    """A stream whose knowledge base fails after its first chunk ends with an error event (503);
    ``ralmspec_http_requests_total`` counts it once, as 503. It was counted twice: as a 200 under
    its endpoint (the status line sent with the first chunk) and as a 503 under a second
    endpoint, ``/v1/completions:stream_error``, so success rates and request totals were wrong."""
    from ralmspec.engine.core import RalmEngine
    from tests.lm.conftest import make_view

    engine = RalmEngine(make_view(tiny_lm, runner="batched"), _GoneAfterFirstSearch(small_indexes["exact"]),
                        TEST_ENGINE_CONFIG)
    srv = serve(engine, MODEL, 2, 60)
    try:
        events = asyncio.run(_sse(f"{srv.url}/v1/completions", {
            "model": MODEL, "prompt": "the history of the roman empire", "max_tokens": 16, "stream": True,
            "ralm": {"speculate": False, "stride": 2}}))
        assert events[0]["choices"][0]["text"] is not None and "error" not in events[0]  # a chunk first
        assert events[-1]["error"]["code"] == "knowledge_base_unavailable"  # then the error event
        text = request("GET", f"{srv.url}/metrics")[1]
    finally:
        srv.stop()
    counted = {k: v for k, v in _samples(text, "ralmspec_http_requests_total").items() if "/v1/" in k}
    assert counted == {'{endpoint="/v1/completions",status="503"}': 1.0}, counted
    assert _samples(text, "ralmspec_scheduler_failed_total") == {"": 1}


async def _sse(url: str, body: dict) -> list[dict]:
    """The events of a streamed request (``[DONE]`` left out), each timed: ``_t`` seconds from
    the request's start."""
    import aiohttp

    events: list[dict] = []
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append({**json.loads(line[len("data: "):]), "_t": time.perf_counter() - t0})
    return events


def test_request_latency_counts_the_wait_for_a_slot_as_time_to_first_token_does(serving_engine):
    """One slot: a short stream waits behind a long request. Its time to first token (counted
    from its arrival) is at most its request latency, and both at most what its client saw.
    The latency histogram showed the engine's ``latency_s`` instead, which starts once the slot
    is free: the queued stream's first token came later than its whole request had taken, and
    a loaded server's latencies looked as fast as an idle one's."""
    import threading

    srv = serve(serving_engine, MODEL, 1, 120)
    try:
        long = {}
        t = threading.Thread(target=lambda: long.update(r=request("POST", f"{srv.url}/v1/completions", {
            "model": MODEL, "prompt": "the history of the roman empire", "max_tokens": 64,
            "ralm": {"speculate": True}})))
        t.start()
        for _ in range(500):  # until the long request holds the one slot
            holding = request("GET", f"{srv.url}/health")[1]["active"] == 1
            if holding:
                break
            time.sleep(0.01)
        t0 = time.perf_counter()
        events = asyncio.run(_sse(f"{srv.url}/v1/completions", {
            "model": MODEL, "prompt": "who wrote hamlet", "max_tokens": 4, "stream": True,
            "ralm": {"speculate": False}}))
        client_s = time.perf_counter() - t0
        t.join(120)
        text = request("GET", f"{srv.url}/metrics")[1]
    finally:
        srv.stop()
    assert long["r"][0] == 200
    engine_s = next(e["ralm"]["latency_s"] for e in events if "ralm" in e)
    waited = events[0]["_t"] - engine_s  # the stream's first chunk came after its engine time: it queued
    latency = _samples(text, "ralmspec_request_latency_seconds_sum")['{mode="naive"}']
    ttft = _samples(text, "ralmspec_time_to_first_token_seconds_sum")['{mode="naive"}']
    assert _samples(text, "ralmspec_request_latency_seconds_count")['{mode="naive"}'] == 1
    assert holding and waited > 0, "the stream was built to wait for the slot"
    assert ttft <= latency <= client_s, (ttft, latency, client_s, engine_s)


class _FakeLatencySearch(_OverExact):
    """The exact knowledge base behind a FAKE latency of ``delay_s`` per search (so a stream is
    still generating when its client leaves)."""

    def __init__(self, inner: Retriever, delay_s: float):
        super().__init__(inner)
        self.delay_s = delay_s

    def search_sync(self, queries, k):
        time.sleep(self.delay_s)
        return self.inner.search_sync(queries, k)


def test_a_stream_whose_client_leaves_counts_the_tokens_it_sent(small_indexes, tiny_lm):
    """A streaming client reads three chunks of a long answer and disconnects: the tokens the
    server had generated and sent are in ``ralmspec_completion_tokens_total`` (at least those
    whose text the client read, at most the answer's, a whole number of sent chunks). They were
    not counted at all: only finished completions were, so a server whose clients leave early
    showed less generation than it did."""
    from dataclasses import replace

    import aiohttp

    from ralmspec.engine.core import RalmEngine
    from tests.lm.conftest import make_view

    body = {"model": MODEL, "prompt": "the history of the roman empire", "max_tokens": 64, "stream": True,
            "ralm": {"speculate": False, "stride": 2}}
    view = make_view(tiny_lm, runner="batched")
    full = RalmEngine(view, small_indexes["exact"], TEST_ENGINE_CONFIG).generate_sync(
        body["prompt"], gen=replace(TEST_ENGINE_CONFIG.generation, max_new_tokens=64), speculate=False)
    engine = RalmEngine(view, _FakeLatencySearch(small_indexes["exact"], 0.2), TEST_ENGINE_CONFIG)
    srv = serve(engine, MODEL, 2, 60)

    async def leave_after(n: int) -> str:
        text = ""
        async with aiohttp.ClientSession() as s:
            r = await s.post(f"{srv.url}/v1/completions", json=body)
            assert r.status == 200
            async for line in r.content:
                if line.startswith(b"data: "):
                    text += json.loads(line[len(b"data: "):])["choices"][0]["text"]
                    n -= 1
                    if not n:
                        break
            r.close()  # the client goes away mid-answer
        return text

    try:
        read = asyncio.run(leave_after(3))
        for _ in range(500):  # until the handler has ended: its 499 is counted
            text = request("GET", f"{srv.url}/metrics")[1]
            if _samples(text, "ralmspec_http_requests_total").get('{endpoint="/v1/completions",status="499"}'):
                break
            time.sleep(0.02)
    finally:
        srv.stop()
    tok = tiny_lm.tokenizer
    ids = full.token_ids
    assert len(ids) == 64 and tok.decode(ids).startswith(read) and read
    counted = _samples(text, "ralmspec_completion_tokens_total")
    assert set(counted) == {'{mode="naive"}'}, counted
    n = int(counted['{mode="naive"}'])
    at_least = next(k for k in range(len(ids) + 1) if len(tok.decode(ids[:k])) >= len(read))
    assert at_least <= n < len(ids) and n % 2 == 0, (n, at_least, read)
