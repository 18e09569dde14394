"""The knowledge base as a service: /v1/retrieve, /v1/score, /v1/passages, and RemoteRetriever.

The end-to-end test runs the retrieval service as a real separate process
(``ralmspec serve --retrieval-only``), serves completions from a second server whose engine uses
it through ``RemoteRetriever``, checks the tokens equal the in-process oracle, then kills the
service with SIGKILL in the middle of requests: the answer is a clean 503 (non-streaming) or an
error event after verified tokens only (streaming), and service comes back when it does.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ralmspec.engine.core import RalmEngine
from ralmspec.engine.scheduler import SchedulerConfig
from ralmspec.errors import RetrievalError
from ralmspec.retrieval.remote import RemoteRetriever
from ralmspec.serving.app import ServerConfig, create_app
from tests.conftest import SMALL_CORPUS_SIZE
from tests.identity import SpeculationCheck
from tests.serving.support import MODEL, TEST_ENGINE_CONFIG, ServerThread, request

REPO = Path(__file__).resolve().parents[2]
QUERIES = ["the roman empire", "a song by the beatles", "european mountains and alps", "cricket team players"]


def test_retrieve_score_passages_match_the_retriever(server, serving_engine):
    r = serving_engine.retriever
    status, body = request("POST", f"{server.url}/v1/retrieve", {"queries": QUERIES, "k": 5})
    assert status == 200, body
    want = r.search_sync(QUERIES, 5)
    assert [[(h["doc_id"], h["score"]) for h in row] for row in body["results"]] == \
           [[(h.doc_id, h.score) for h in row] for row in want]
    h0 = body["results"][0][0]
    assert (h0["title"], h0["text"]) == (r.corpus[h0["doc_id"]].title, r.corpus[h0["doc_id"]].text)
    status, body = request("POST", f"{server.url}/v1/retrieve", {"queries": "one query", "include_text": False})
    assert status == 200 and len(body["results"]) == 1 and set(body["results"][0][0]) == {"doc_id", "score"}
    ids = [3, 77, 0, SMALL_CORPUS_SIZE - 1]
    status, body = request("POST", f"{server.url}/v1/score", {"query": QUERIES[1], "doc_ids": ids})
    assert status == 200 and body["scores"] == r.score(QUERIES[1], ids)  # exact float equality via JSON
    status, body = request("POST", f"{server.url}/v1/passages", {"doc_ids": [5, 2]})
    assert [p["doc_id"] for p in body["passages"]] == [5, 2] and body["passages"][1]["text"] == r.corpus[2].text
    assert request("GET", f"{server.url}/v1/passages/7")[1]["title"] == r.corpus[7].title
    assert request("GET", f"{server.url}/v1/retriever")[1] == {
        "kind": "exact", "corpus_size": len(r.corpus), "limits": {"queries": 512, "k": 1000, "texts": 50_000, "ids": 10_000}}


def test_remote_retriever_is_the_same_retriever(server, serving_engine):
    local = serving_engine.retriever
    remote = RemoteRetriever(server.url, timeout_s=30)
    try:
        assert remote.kind == local.kind and len(remote.corpus) == len(local.corpus)
        assert remote.search_sync(QUERIES, 7) == local.search_sync(QUERIES, 7)

        async def search_async():
            try:
                return await remote.search(QUERIES, 3)
            finally:
                await remote.aclose()

        assert asyncio.run(search_async()) == local.search_sync(QUERIES, 3)
        ids = list(range(0, SMALL_CORPUS_SIZE, 9))
        assert remote.score(QUERIES[2], ids) == local.score(QUERIES[2], ids)
        assert remote.rank(QUERIES[2], ids, k=4) == local.rank(QUERIES[2], ids, k=4)
        assert remote.corpus[123] == local.corpus[123] and remote.corpus[-1] == local.corpus[-1]
        with pytest.raises(IndexError):
            remote.corpus[len(local.corpus)]
    finally:
        remote.close()


def test_generate_sync_closes_the_remote_session_of_its_own_loop(server, serving_engine):
    """``generate_sync`` (and ``run_bench``) run on an event loop that ends with the call; a
    ``RemoteRetriever``'s aiohttp session on it was left open: an "Unclosed client session"
    warning per call, its socket held until garbage collection. The engine now closes it."""
    remote = RemoteRetriever(server.url, timeout_s=30)
    engine = RalmEngine(serving_engine.lm, remote, serving_engine.config)  # not closed: the LM is shared
    try:
        for _ in range(2):
            assert engine.generate_sync(QUERIES[0], speculate=False).token_ids
            assert remote._sessions == {}  # closed and dropped with its loop
    finally:
        engine.worker.shutdown(wait=False)
        remote.close()


def test_remote_retriever_splits_its_calls_to_the_services_limits(serving_engine):
    """A service answers at most ``max_retrieve_queries`` queries, ``max_retrieve_k`` hits,
    ``max_retrieve_texts`` passages with text and ``max_ids`` ids per call, else 400. The client
    asked for whatever the engine's batch held (512 queries x ``ralm.prefetch`` 256 = 131,072
    passages, a cache of 65,536 ids scored at once): every such call failed, and with it every
    request of the batch (503). It now reads the limits from ``/v1/retriever`` and splits a call
    into calls within them, with the same answer; a k above the service's is asked at its max."""
    from ralmspec.retrieval.remote import ServiceLimits
    from tests.serving.conftest import serve

    defaults = ServerConfig()  # what a service too old to say its limits holds to
    assert ServiceLimits() == ServiceLimits(defaults.max_retrieve_queries, defaults.max_retrieve_k,
                                            defaults.max_retrieve_texts, defaults.max_ids)

    srv = serve(serving_engine, MODEL, 4, 60, max_retrieve_queries=3, max_retrieve_k=4, max_retrieve_texts=5,
                max_ids=2)
    local = serving_engine.retriever
    remote = RemoteRetriever(srv.url, timeout_s=30)
    queries = QUERIES + [q + " history" for q in QUERIES]  # 8 queries
    try:
        assert request("GET", f"{srv.url}/v1/retriever")[1]["limits"] == {"queries": 3, "k": 4, "texts": 5, "ids": 2}
        before = remote.requests
        assert remote.search_sync(queries, 2) == local.search_sync(queries, 2)  # 2 queries of 2 hits per call
        assert remote.requests - before == 4
        assert remote.search_sync(queries, 4) == local.search_sync(queries, 4)  # 1 query per call

        async def search_async(k):
            try:
                return await remote.search(queries, k)
            finally:
                await remote.aclose()

        assert asyncio.run(search_async(1)) == local.search_sync(queries, 1)  # 3 + 3 + 2 queries
        assert asyncio.run(search_async(9)) == local.search_sync(queries, 4)  # k 9 asked as 4
        ids = list(range(0, SMALL_CORPUS_SIZE, 37))
        assert remote.score(queries[5], ids) == local.score(queries[5], ids)
        assert [p.doc_id for p in remote.fetch_passages(ids[:5])] == ids[:5]
        assert remote.corpus.get_many(ids) == [local.corpus[i] for i in ids]
    finally:
        remote.close()
        srv.stop()


def _corrupt(doc, how):
    """A copy of a real answer with one fault a broken or foreign service could send."""
    doc = json.loads(json.dumps(doc))
    hits = doc.get("results", [[]])[0]
    faults = {
        "id-float": lambda: hits[0].update(doc_id=float(hits[0]["doc_id"])),
        "id-bool": lambda: hits[0].update(doc_id=True),
        "id-outside": lambda: hits[0].update(doc_id=SMALL_CORPUS_SIZE),
        "id-negative": lambda: hits[0].update(doc_id=-1),
        "score-string": lambda: hits[0].update(score=str(hits[0]["score"])),
        "score-nan": lambda: hits[0].update(score=float("nan")),
        "reversed": lambda: hits.reverse(),
        "repeated": lambda: hits.__setitem__(1, dict(hits[0])),
        "more-than-k": lambda: hits.append(dict(hits[-1], doc_id=hits[-1]["doc_id"] + 1)),
        "fewer-than-k": lambda: hits.pop(),  # an exact knowledge base always answers k
        "no-hits": lambda: hits.clear(),
        "one-answer-short": lambda: doc["results"].pop(),
        "results-object": lambda: doc.update(results={"0": hits}),
        "text-null": lambda: hits[0].update(text=None),
        "title-number": lambda: hits[0].update(title=7),
        "scores-strings": lambda: doc.update(scores=[str(x) for x in doc["scores"]]),
        "scores-short": lambda: doc["scores"].pop(),
        "scores-inf": lambda: doc["scores"].__setitem__(0, float("inf")),
        "passage-text-int": lambda: doc["passages"][0].update(text=5),
        "passage-other-id": lambda: doc["passages"][0].update(doc_id=doc["passages"][0]["doc_id"] + 1),
    }
    faults[how]()
    return doc


RETRIEVE_FAULTS = ["id-float", "id-bool", "id-outside", "id-negative", "score-string", "score-nan", "reversed",
                   "repeated", "more-than-k", "fewer-than-k", "no-hits", "one-answer-short", "results-object", "text-null", "title-number"]


def test_a_malformed_answer_is_a_retrieval_error_never_a_hit(server):
    """Answers of the real service with one fault each: every one is a RetrievalError (a wrong
    hit would be taken as verified), and the untouched answers parse to the retriever's hits."""
    remote = RemoteRetriever(server.url, timeout_s=30)
    try:
        k = 4
        retrieved = request("POST", f"{server.url}/v1/retrieve", {"queries": QUERIES[:2], "k": k,
                                                                 "include_text": True})[1]
        assert remote._parse_results(retrieved, 2, k) == remote.search_sync(QUERIES[:2], k)
        for how in RETRIEVE_FAULTS:
            with pytest.raises(RetrievalError, match="malformed /v1/retrieve answer"):
                remote._parse_results(_corrupt(retrieved, how), 2, k)
        with pytest.raises(RetrievalError, match="at most k=3"):
            remote._parse_results(retrieved, 2, 3)
        ids = [0, 5, 9]
        scored = request("POST", f"{server.url}/v1/score", {"query": QUERIES[0], "doc_ids": ids})[1]
        for how in ("scores-strings", "scores-short", "scores-inf"):
            remote._decode = lambda status, raw, path, how=how: _corrupt(scored, how)  # the sync path's parser
            with pytest.raises(RetrievalError, match="malformed /v1/score answer|scored 2 of 3"):
                remote.score(QUERIES[0], ids)
        fetched = request("POST", f"{server.url}/v1/passages", {"doc_ids": [3, 4]})[1]
        for how in ("passage-text-int", "passage-other-id"):
            remote._decode = lambda status, raw, path, how=how: _corrupt(fetched, how)
            with pytest.raises(RetrievalError, match="malformed /v1/passages answer|wrong passages"):
                remote.fetch_passages([3, 4])
        del remote._decode
        with pytest.raises(RetrievalError, match="answered HTTP 500: b'{\"error\": \"down\"}'"):
            remote._decode(500, b'{"error": "down"}', "/v1/retrieve")  # was an AttributeError
    finally:
        remote.close()


@pytest.mark.parametrize("info", [[], "x", 5, {"kind": "exact", "corpus_size": 0}, {"kind": "exact"},
                                  {"kind": "exact", "corpus_size": 5, "limits": {"k": 0}},
                                  {"kind": "exact", "corpus_size": 5, "limits": [512]}])
def test_a_foreign_retriever_answer_is_a_retrieval_error(monkeypatch, info):
    """``GET /v1/retriever`` answering something else than a ralmspec service's object (a list was
    an AttributeError; an empty corpus was taken)."""
    monkeypatch.setattr(RemoteRetriever, "_post_or_get", lambda self, method, path, body: info)
    with pytest.raises(RetrievalError, match="not a ralmspec retrieval service"):
        RemoteRetriever("http://127.0.0.1:9", timeout_s=2)


def test_a_service_that_drips_its_answer_is_timed_out_once():
    """``timeout_s`` bounds the whole answer of a blocking call: a service sending one byte every
    0.2 s (each read within the socket timeout) held ``search_sync`` for a minute, and a
    timed-out call was retried, doubling it."""
    import http.server

    class Dripping(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # /v1/retriever: a well-formed answer
            body = json.dumps({"kind": "exact", "corpus_size": 10}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        posts = 0

        def do_POST(self):  # /v1/retrieve: a byte at a time
            type(self).posts += 1
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dripping)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        remote = RemoteRetriever(f"http://127.0.0.1:{srv.server_address[1]}", timeout_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(RetrievalError, match="timed out"):
            remote.search_sync(["who wrote hamlet"], 1)
        # bounded (the whole answer drips for 200 s), and not retried: one POST (counted, not timed:
        # "under 2 x timeout_s" of wall time depends on the machine's load)
        assert time.monotonic() - t0 < 30 and Dripping.posts == 1, (time.monotonic() - t0, Dripping.posts)
        remote.close()
    finally:
        srv.shutdown()


def test_unreachable_service_is_a_retrieval_error():
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RetrievalError, match="unreachable"):
        RemoteRetriever(f"http://127.0.0.1:{port}", timeout_s=2, connect_timeout_s=1)


class RetrievalProcess:
    """``ralmspec serve --retrieval-only`` as a child process (killable with SIGKILL)."""

    def __init__(self, index_dir: str, kind: str, port: int = 0):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ralmspec.cli", "serve", "--retrieval-only", "--retriever", kind,
             "--index", index_dir, "--host", "127.0.0.1", "--port", str(port)],
            cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = None
        lines: list[str] = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving on" in line:
                self.url = line.split("serving on", 1)[1].strip()
                break
        if self.url is None:
            self.kill()
            raise RuntimeError("retrieval service did not start:\n" + "".join(lines))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def kb_calls(self) -> int:
        return request("GET", f"{self.url}/v1/stats")[1]["kb_calls"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no graceful shutdown
            self.proc.wait(30)


def test_remote_knowledge_base_same_tokens_then_killed_mid_request_is_503(small_indexes, tiny_lm):
    kind = "bm25"
    index_dir = small_indexes[kind].index_dir  # set by load_retriever: the folder with manifest.json
    gen = TEST_ENGINE_CONFIG.generation
    oracle_engine = RalmEngine(tiny_lm, small_indexes[kind], TEST_ENGINE_CONFIG)
    svc = RetrievalProcess(index_dir, kind)
    remote = RemoteRetriever(svc.url, timeout_s=10, connect_timeout_s=2)
    engine = RalmEngine(tiny_lm, remote, TEST_ENGINE_CONFIG)
    app = create_app(engine, SchedulerConfig(max_concurrent=4, retrieval_timeout_s=10, retrieval_retries=1),
                     server_config=ServerConfig(model_name=MODEL))
    front = ServerThread(app).start()
    url = f"{front.url}/v1/completions"
    try:
        # 1. remote knowledge base == in-process knowledge base, token for token; the default
        # OS^3 may take only verified steps on this cheap KB, the fixed-stride requests speculate
        check = SpeculationCheck()
        for q, ralm in (("who wrote the song hey jude", {}), ("when did the roman empire fall", {"speculate": False}),
                        ("what is the tallest mountain in europe", {"async_verify": False, "prefetch": 1, "os3": False}),
                        ("who wrote the song hey jude", {"os3": False})):
            status, body = request("POST", url, {"model": MODEL, "prompt": q, "max_tokens": 12, "ralm": ralm})
            assert status == 200, body
            want = oracle_engine.generate_sync(q, gen=replace(gen, max_new_tokens=12), speculate=False)
            check.same((body["choices"][0]["text"], [p["doc_id"] for p in body["ralm"]["passages"]]),
                       (want.text, [s.doc_id for s in want.steps]), body["ralm"]["stats"], where=ralm)
            assert body["ralm"]["retriever"] == kind
        check.ran(min_speculated=2)  # the two fixed-stride requests

        # 2. SIGKILL the service while a long non-streaming request runs: clean 503, no answer
        long_body = {"model": MODEL, "prompt": "the history of the roman empire", "max_tokens": 400,
                     "ralm": {"stride": 1}}
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=request("POST", url, long_body)))
        calls0 = svc.kb_calls()
        t.start()
        deadline = time.time() + 60
        while svc.kb_calls() < calls0 + 5 and time.time() < deadline:
            time.sleep(0.01)
        svc.kill()
        t.join(60)
        status, body = result["r"]
        assert status == 503, body
        assert set(body) == {"error"} and body["error"]["code"] == "knowledge_base_unavailable"
        # while it is down, new requests fail fast with 503 too
        status, body = request("POST", url, {"model": MODEL, "prompt": "who wrote hamlet", "max_tokens": 4})
        assert status == 503 and body["error"]["type"] == "service_unavailable"

        # 3. the service comes back on the same port: answers are correct again
        svc = RetrievalProcess(index_dir, kind, port=svc.port)
        q = "who was the first president of the united states"
        status, body = request("POST", url, {"model": MODEL, "prompt": q, "max_tokens": 8})
        assert status == 200, body
        want = oracle_engine.generate_sync(q, gen=replace(gen, max_new_tokens=8), speculate=False)
        assert body["choices"][0]["text"] == want.text

        # 4. SIGKILL during a stream: verified tokens only, then an error event and no [DONE]
        stream_q, n = "the alps are a mountain range", 200
        events = asyncio.run(_stream_and_kill(url, {"model": MODEL, "prompt": stream_q, "max_tokens": n,
                                                    "stream": True, "ralm": {"stride": 1}}, svc))
        assert events[-1] != "[DONE]"
        last = json.loads(events[-1])
        assert last["error"]["code"] == "knowledge_base_unavailable"
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        want = oracle_engine.generate_sync(stream_q, gen=replace(gen, stride=1, max_new_tokens=n), speculate=False)
        assert text and want.text.startswith(text) and len(text) < len(want.text)
    finally:
        svc.kill()
        front.stop()
        remote.close()


async def _stream_and_kill(url: str, body: dict, svc: RetrievalProcess) -> list[str]:
    import aiohttp

    events: list[str] = []
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            assert r.status == 200
            async for line in r.content:
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: "):])
                if len(events) == 2:
                    await asyncio.get_running_loop().run_in_executor(None, svc.kill)
    return events
