"""Every bad input gets a 4xx JSON error naming the field (raw aiohttp requests, no client-side checks)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving.support import MODEL, request, slow_body_answer

OK = {"model": MODEL, "prompt": "who wrote hamlet", "max_tokens": 4}


def with_(**kw):
    d = dict(OK)
    for k, v in kw.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    return d


COMPLETION_CASES = [
    # (id, body, status, param)
    ("not-an-object", ["a list"], 400, None),
    ("missing-model", with_(model=...), 400, "model"),
    ("model-wrong-type", with_(model=3), 400, "model"),
    ("unknown-model", with_(model="gpt-4"), 404, "model"),
    ("missing-prompt", with_(prompt=...), 400, "prompt"),
    ("empty-prompt", with_(prompt=""), 400, "prompt"),
    ("blank-prompt", with_(prompt="   \n"), 400, "prompt"),
    ("prompt-int", with_(prompt=42), 400, "prompt"),
    ("prompt-no-tokens", with_(prompt="\u0000\u0001"), 400, "prompt"),  # tokenizer drops control chars
    ("prompt-lone-surrogate", with_(prompt="who wrote \ud800"), 400, "prompt"),  # JSON's "\ud800" escape
    ("stop-lone-surrogate", with_(stop=["\n", "\udfff"]), 400, "stop[1]"),
    ("key-lone-surrogate", with_(ralm={"\ud800": 1}), 400, "ralm.\\ud800"),
    ("prompt-two-strings", with_(prompt=["a", "b"]), 400, "prompt"),
    ("prompt-token-ids", with_(prompt=[1, 2, 3]), 400, "prompt"),
    ("max-tokens-negative", with_(max_tokens=-1), 400, "max_tokens"),
    ("max-tokens-zero", with_(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-huge", with_(max_tokens=10 ** 9), 400, "max_tokens"),
    ("max-tokens-string", with_(max_tokens="8"), 400, "max_tokens"),
    ("max-tokens-float", with_(max_tokens=4.5), 400, "max_tokens"),
    ("max-tokens-bool", with_(max_tokens=True), 400, "max_tokens"),
    ("temperature-above-2", with_(temperature=2.5), 400, "temperature"),
    ("temperature-string", with_(temperature="0"), 400, "temperature"),
    ("temperature-tiny", with_(temperature=1e-307), 400, "temperature"),  # overflowed the draw: a wrong answer
    ("top-p-zero", with_(top_p=0), 400, "top_p"),
    ("n-2", with_(n=2), 400, "n"),
    ("best-of", with_(best_of=3), 400, "best_of"),
    ("logprobs-above-5", with_(logprobs=6), 400, "logprobs"),
    ("logprobs-negative", with_(logprobs=-1), 400, "logprobs"),
    ("logprobs-bool", with_(logprobs=True), 400, "logprobs"),
    ("echo", with_(echo=True), 400, "echo"),
    ("stop-five-strings", with_(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop-empty-string-in-list", with_(stop=["a", ""]), 400, "stop"),
    ("stop-int", with_(stop=3), 400, "stop"),
    ("penalty", with_(presence_penalty=1.0), 400, "presence_penalty"),
    ("stream-string", with_(stream="yes"), 400, "stream"),
    ("stream-options-without-stream", with_(stream_options={"include_usage": True}), 400, "stream_options"),
    ("unknown-field", with_(foo=1), 400, "foo"),
    ("ralm-not-object", with_(ralm=[1]), 400, "ralm"),
    ("ralm-unknown-field", with_(ralm={"strid": 2}), 400, "ralm.strid"),
    ("ralm-stride-zero", with_(ralm={"stride": 0}), 400, "ralm.stride"),
    ("ralm-stride-string", with_(ralm={"stride": "4"}), 400, "ralm.stride"),
    ("ralm-prefetch-huge", with_(ralm={"prefetch": 100000}), 400, "ralm.prefetch"),
    ("ralm-speculate-string", with_(ralm={"speculate": "true"}), 400, "ralm.speculate"),
    ("ralm-unknown-retriever", with_(ralm={"retriever": "faiss-gpu-magic"}), 400, "ralm.retriever"),
    ("ralm-gamma", with_(ralm={"gamma_max": 1.5}), 400, "ralm.gamma_max"),
    ("ralm-cache-negative", with_(ralm={"cache_capacity": -3}), 400, "ralm.cache_capacity"),
    ("ralm-guesser-unknown", with_(ralm={"guesser": "bogus"}), 400, "ralm.guesser"),
    ("ralm-prompt-format-unknown", with_(ralm={"prompt_format": "bogus"}), 400, "ralm.prompt_format"),
    ("ralm-chat-format-without-template", with_(ralm={"prompt_format": "chat"}), 400, "ralm.prompt_format"),
]


def _check_error(status, body, want_status, param):
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"]
    assert err["param"] == param, err


@pytest.mark.parametrize("case", COMPLETION_CASES, ids=[c[0] for c in COMPLETION_CASES])
def test_completion_bad_input(server, case):
    _, body, status, param = case
    _check_error(*request("POST", f"{server.url}/v1/completions", body), status, param)


def test_malformed_json(server):
    status, body = request("POST", f"{server.url}/v1/completions", raw=b'{"model": "tiny", "prompt": ',
                           headers={"Content-Type": "application/json"})
    _check_error(status, body, 400, None)
    assert "not valid JSON" in body["error"]["message"]


@pytest.mark.parametrize("raw,message", [
    (b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),  # json.loads: RecursionError (40 KB < the 64 KiB limit)
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "NaN is not a JSON value"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": Infinity}', "Infinity is not a JSON value"),
    (b'"\\ud800"', "the request body is not valid Unicode"),
])
def test_bodies_json_itself_refuses_are_400(server, raw, message):
    status, body = request("POST", f"{server.url}/v1/completions", raw=raw, headers={"Content-Type": "application/json"})
    _check_error(status, body, 400, None)
    assert message in body["error"]["message"]


def test_empty_body(server):
    _check_error(*request("POST", f"{server.url}/v1/completions", raw=b""), 400, None)


def test_oversized_body_is_413_json(server):
    big = b'{"model": "tiny", "prompt": "' + b"a" * (200 * 1024) + b'"}'
    status, body = request("POST", f"{server.url}/v1/completions", raw=big,
                           headers={"Content-Type": "application/json"})
    _check_error(status, body, 413, None)
    assert "too large" in body["error"]["message"]


def test_unknown_route_and_method_are_json(server):
    _check_error(*request("GET", f"{server.url}/v1/nothing"), 404, None)
    _check_error(*request("GET", f"{server.url}/v1/completions"), 405, None)


RETRIEVE_CASES = [
    ("missing-queries", {"k": 3}, 400, "queries"),
    ("queries-empty", {"queries": []}, 400, "queries"),
    ("queries-not-list", {"queries": 5}, 400, "queries"),
    ("query-not-string", {"queries": ["ok", 7]}, 400, "queries[1]"),
    ("k-zero", {"queries": ["x"], "k": 0}, 400, "k"),
    ("k-huge", {"queries": ["x"], "k": 10 ** 7}, 400, "k"),
    ("k-string", {"queries": ["x"], "k": "3"}, 400, "k"),
    ("include-text-int", {"queries": ["x"], "include_text": 1}, 400, "include_text"),
    ("query-lone-surrogate", {"queries": ["x", "caf\udce9"]}, 400, "queries[1]"),
    ("unknown-field", {"queries": ["x"], "top_k": 3}, 400, "top_k"),
]


@pytest.mark.parametrize("case", RETRIEVE_CASES, ids=[c[0] for c in RETRIEVE_CASES])
def test_retrieve_bad_input(server, case):
    _, body, status, param = case
    _check_error(*request("POST", f"{server.url}/v1/retrieve", body), status, param)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/score", {"doc_ids": [1]}, "query"),
    ("/v1/score", {"query": "x", "doc_ids": [0, 10 ** 6]}, "doc_ids[1]"),
    ("/v1/score", {"query": "x", "doc_ids": [-1]}, "doc_ids[0]"),
    ("/v1/score", {"query": "x", "doc_ids": "1,2"}, "doc_ids"),
    ("/v1/score", {"query": "\ud83d", "doc_ids": [1]}, "query"),
    ("/v1/passages", {"doc_ids": [1.5]}, "doc_ids[0]"),
    ("/v1/passages", {}, "doc_ids"),
])
def test_score_and_passages_bad_input(server, path, body, param):
    _check_error(*request("POST", f"{server.url}{path}", body), 400, param)


def test_bad_passage_id_is_404(server):
    _check_error(*request("GET", f"{server.url}/v1/passages/99999999"), 404, "doc_id")
    _check_error(*request("GET", f"{server.url}/v1/passages/abc"), 404, "doc_id")
    # str.isdigit() holds for these, and int() fails on the first (a 500 before) or reads the
    # second as 3; the third passes int()'s digit limit
    for raw in ("%C2%B2", "%D9%A3", "9" * 5000):
        _check_error(*request("GET", f"{server.url}/v1/passages/{raw}"), 404, "doc_id")


def test_a_body_its_content_encoding_cannot_decode_is_400(server):
    status, body = request("POST", f"{server.url}/v1/completions", raw=b"not gzip at all",
                           headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    _check_error(status, body, 400, None)
    assert "could not be read" in body["error"]["message"]


def test_a_client_gone_before_its_body_arrived_is_499_not_a_server_error(server):
    """Headers promising 1000 bytes, 10 sent, the connection closed: the server did not fail, so
    /metrics counts a 499 (a 500 before: false 5xx alerts for every slow client that gave up)."""
    import re
    import socket
    import time
    from urllib.parse import urlparse

    def count(status: str) -> float:
        text = request("GET", f"{server.url}/metrics")[1]
        m = re.search(r'^ralmspec_http_requests_total\{endpoint="/v1/completions",status="%s"\} (\S+)$' % status,
                      text, re.M)
        return float(m.group(1)) if m else 0.0

    before = count("499"), count("500")
    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"model": ')
        time.sleep(0.2)
    deadline = time.monotonic() + 30  # until the handler has seen the client go (a loaded machine: seconds)
    while count("499") == before[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (count("499"), count("500")) == (before[0] + 1, before[1])


@pytest.fixture(scope="module")
def strict_server(serving_engine):
    """The shared engine behind a server that waits 0.5 s for a request body, 1 s for a request's
    headers (or the next request), and answers at most 10 passages with their text per /v1/retrieve."""
    from tests.serving.conftest import serve

    srv = serve(serving_engine, MODEL, 2, 60, body_timeout_s=0.5, idle_timeout_s=1.0, max_retrieve_texts=10)
    yield srv
    srv.stop()


def test_retrieve_answers_at_most_max_retrieve_texts_passages_with_text(strict_server, serving_engine):
    """queries x min(k, corpus size) passages with text are capped (512 queries at k=1000 built an
    answer of ~370 MB in memory); without the text, or within the cap, the same call answers."""
    url = f"{strict_server.url}/v1/retrieve"
    status, body = request("POST", url, {"queries": ["a", "b", "c", "d"], "k": 3})
    _check_error(status, body, 400, "k")
    message = body["error"]["message"]
    assert "12 passages with their text" in message and "include_text: false" in message
    assert request("POST", url, {"queries": ["a", "b", "c", "d"], "k": 3, "include_text": False})[0] == 200
    status, body = request("POST", url, {"queries": ["a", "b", "c"], "k": 3})
    assert status == 200 and all(len(r) == 3 and "text" in r[0] for r in body["results"])
    n = len(serving_engine.retriever.corpus)  # k past the corpus answers the corpus: counted so
    assert request("POST", url, {"queries": ["a"], "k": 1000})[0] == (200 if n <= 10 else 400)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/retrieve"])
def test_a_body_that_never_arrives_is_408_and_the_connection_closed(strict_server, path):
    """A client that promises a body and sends part of it got no answer at all: the server waited
    for ever, holding the connection (a slow-body client could keep every connection busy)."""
    got, first_s, closed = slow_body_answer(strict_server.url, path, wait_s=10)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"connection: close" in head.lower()  # the rest of that body may still come: not reused
    err = json.loads(body)["error"]
    assert err["code"] == "body_timeout" and "within 0.5 s" in err["message"]
    assert 0.4 < first_s < 5 and closed


def test_a_connection_that_never_finishes_its_headers_is_closed(strict_server):
    """Half a header line, then nothing: aiohttp's own limit is its keepalive timeout, 3630 s
    (measured: still open after 100 s); the server's idle timeout closes it, with no answer."""
    import socket
    import time
    from urllib.parse import urlparse

    u = urlparse(strict_server.url)
    with socket.create_connection((u.hostname, u.port)) as sock:
        t = time.perf_counter()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost:")
        sock.settimeout(20)
        assert sock.recv(100) == b""  # closed, nothing sent
        assert time.perf_counter() - t < 10
    # a slow but finished request on a fresh connection is answered
    assert request("GET", f"{strict_server.url}/health")[0] == 200


# --------------------------------------------------------------------------- any body: never a 5xx

VALID_BODIES = {
    "/v1/completions": {"model": MODEL, "prompt": "who wrote hamlet", "max_tokens": 3, "temperature": 0, "top_p": 1,
                        "stop": ["\n"], "logprobs": 1, "seed": 1, "stream": False, "user": "u",
                        "ralm": {"stride": 2, "speculate": True, "prefetch": 2, "cache_capacity": 8}},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "who wrote hamlet"}],
                             "max_tokens": 3},
    "/v1/retrieve": {"queries": ["hamlet", "paris"], "k": 2, "include_text": True},
    "/v1/score": {"query": "hamlet", "doc_ids": [0, 1, 2]},
    "/v1/passages": {"doc_ids": [0, 5]},
}
ODD_TEXT = st.sampled_from(["", " ", "\n", "\u0000", "\ud800", "a\udfffb", "\U0001f642" * 20, "x" * 3000, "NaN"])
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | ODD_TEXT, inner, max_size=3),
    max_leaves=6)


@st.composite
def mutated_bodies(draw):
    """A valid body of some endpoint with 1-3 fields replaced by any JSON, deleted, or added;
    half of the completions streamed."""
    path = draw(st.sampled_from(sorted(VALID_BODIES)))
    body = json.loads(json.dumps(VALID_BODIES[path]))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(body) + ["ralm", "n", "logit_bias", "stream_options", "extra"]))
        target = body
        if isinstance(body.get(key), dict) and body[key] and draw(st.booleans()):  # one level down
            target, key = body[key], draw(st.sampled_from(sorted(body[key])))
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(ANY_JSON)
    leaves = _string_leaves(body)
    if leaves and draw(st.booleans()):  # a text field (prompt, content, query, stop) gets odd text
        holder, key = draw(st.sampled_from(leaves))
        holder[key] = draw(ODD_TEXT | st.text(max_size=20))
    if "completions" in path and draw(st.booleans()):
        body["stream"] = True
    return path, body


def _string_leaves(value) -> list:
    """(container, key or index) of every string value inside ``value``."""
    out, todo = [], [value]
    while todo:
        v = todo.pop()
        for k, item in (v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()):
            if isinstance(item, str):
                out.append((v, k))
            else:
                todo.append(item)
    return out


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated_bodies())
def test_any_mutated_body_is_answered_without_a_server_error(server, case):
    """Property: whatever the body, the answer is a 2xx, or a 4xx JSON error naming what is wrong;
    never a 5xx (the lone surrogate, NaN and deep nesting of 76da85f were 500s)."""
    path, body = case
    status, resp = request("POST", f"{server.url}{path}", raw=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json"})
    assert status < 500, (path, body, resp)
    if status >= 400:
        assert isinstance(resp, dict) and set(resp) == {"error"} and resp["error"]["message"], (path, body, resp)
    elif body.get("stream") is True:
        assert isinstance(resp, str) and resp.rstrip().endswith("data: [DONE]") and '"error"' not in resp, resp


def test_the_static_guesser_on_a_bm25_server_is_refused_by_name():
    """Found only mid-request before (a 400 with no field); parsed pure, no server needed."""
    from ralmspec.config import EngineConfig
    from ralmspec.serving.protocol import APIError, parse_completion

    body = dict(OK, ralm={"guesser": "static"})
    assert parse_completion(body, EngineConfig(model="tiny"), MODEL, "exact", 512).spec.guesser == "static"
    with pytest.raises(APIError) as e:
        parse_completion(body, EngineConfig(model="tiny"), MODEL, "bm25", 512)
    assert e.value.status == 400 and e.value.param == "ralm.guesser" and "dense" in e.value.message
