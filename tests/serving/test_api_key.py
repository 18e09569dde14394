"""``--api-key``: a server that needs ``Authorization: Bearer <key>`` on every path but /health and
/metrics (401 ``invalid_api_key`` otherwise), over real sockets, for both servers; the official
``openai`` client's ``api_key``; a remote knowledge base behind a key (``RemoteRetriever``'s
``api_key``, ``serve --retriever-api-key``); the flags' checks."""

from __future__ import annotations

import asyncio

import pytest

from ralmspec.cli import main
from ralmspec.errors import ConfigError, RetrievalError
from ralmspec.retrieval.remote import RemoteRetriever
from tests.serving.conftest import openai_client, serve
from tests.serving.support import MODEL, request

KEY = "k3y-for.tests_0"
AUTH = {"Authorization": f"Bearer {KEY}"}
COMPLETION = {"model": MODEL, "prompt": "who wrote hamlet", "max_tokens": 4}


@pytest.fixture(scope="module")
def keyed(serving_engine):
    srv = serve(serving_engine, MODEL, 4, 120, api_key=KEY)
    yield srv
    srv.stop()


@pytest.mark.parametrize("headers,message", [
    ({}, "this server needs an API key"),
    ({"Authorization": "Bearer wrong"}, "wrong API key"),
    ({"Authorization": KEY}, "wrong API key"),  # the key without the scheme
    ({"Authorization": f"bearer  {KEY}"}, "wrong API key"),
    ({"Authorization": f"Bearer {KEY}x"}, "wrong API key"),
    ({"Authorization": f"Bearer {KEY[:-1]}"}, "wrong API key"),
])
def test_a_request_without_the_key_is_401(keyed, headers, message):
    for method, path, body in [("POST", "/v1/completions", COMPLETION), ("GET", "/v1/models", None),
                               ("POST", "/v1/retrieve", {"queries": ["x"]}), ("GET", "/v1/stats", None),
                               ("GET", "/v1/no-such-path", None)]:
        status, out = request(method, f"{keyed.url}{path}", body, headers=headers)
        assert status == 401, (path, status, out)
        assert out["error"]["code"] == "invalid_api_key" and message in out["error"]["message"], out


def test_the_key_opens_every_path_and_probes_need_none(keyed):
    status, out = request("POST", f"{keyed.url}/v1/completions", COMPLETION, headers=AUTH)
    assert status == 200 and out["usage"]["completion_tokens"] == 4, out
    assert request("GET", f"{keyed.url}/v1/models", headers=AUTH)[0] == 200
    assert request("GET", f"{keyed.url}/v1/no-such-path", headers=AUTH)[0] == 404
    assert request("GET", f"{keyed.url}/health")[0] == 200  # a load balancer's probe
    status, text = request("GET", f"{keyed.url}/metrics")
    assert status == 200 and 'status="401"' in text  # the refused requests are counted


def test_the_answer_says_how_to_authenticate(keyed):
    async def head():
        import aiohttp

        async with aiohttp.ClientSession() as s, s.get(f"{keyed.url}/v1/models") as r:
            return r.status, r.headers.get("WWW-Authenticate")

    assert asyncio.run(head()) == (401, "Bearer")


def test_the_openai_client_sends_its_api_key(keyed):
    openai = pytest.importorskip("openai")
    client = openai_client(keyed, 60)
    try:
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            client.completions.create(model=MODEL, prompt="who wrote hamlet", max_tokens=4)
        client = client.with_options(api_key=KEY)
        assert client.completions.create(model=MODEL, prompt="who wrote hamlet", max_tokens=4).usage.completion_tokens == 4
    finally:
        client.close()


def test_a_remote_knowledge_base_behind_a_key(keyed, serving_engine):
    with pytest.raises(RetrievalError, match="HTTP 401: this server needs an API key"):
        RemoteRetriever(keyed.url, timeout_s=30)
    with pytest.raises(RetrievalError, match="HTTP 401: wrong API key"):
        RemoteRetriever(keyed.url, timeout_s=30, api_key="wrong")
    remote = RemoteRetriever(keyed.url, timeout_s=30, api_key=KEY)
    queries = ["the roman empire", "a song by the beatles"]
    try:
        local = serving_engine.retriever
        assert remote.search_sync(queries, 3) == local.search_sync(queries, 3)  # the blocking path
        assert remote.score(queries[0], [1, 2]) == local.score(queries[0], [1, 2])

        async def search_async():
            try:
                return await remote.search(queries, 3)  # the aiohttp path
            finally:
                await remote.aclose()

        assert asyncio.run(search_async()) == local.search_sync(queries, 3)
    finally:
        remote.close()


def test_the_knnlm_server_takes_a_key_too(tiny_lm, knn_datastores):
    from tests.serving.test_knnlm_app import MODEL as KNN_MODEL, knn_server

    srv = knn_server(tiny_lm, knn_datastores["flat"], api_key=KEY)
    try:
        body = {"model": KNN_MODEL, "prompt": "the cat", "max_tokens": 3}
        status, out = request("POST", f"{srv.url}/v1/completions", body)
        assert status == 401 and out["error"]["code"] == "invalid_api_key", out
        assert request("POST", f"{srv.url}/v1/completions", body, headers=AUTH)[0] == 200
        assert request("GET", f"{srv.url}/health")[0] == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("key", ["", "two words", "caf\u00e9", "tab\there", 7])
def test_a_key_a_header_cannot_carry_is_refused(key):
    from ralmspec.serving.app import ServerConfig
    from ralmspec.serving.knnlm_app import KNNLMServerConfig

    for make in (lambda: ServerConfig(api_key=key), lambda: KNNLMServerConfig(api_key=key),
                 lambda: RemoteRetriever("http://127.0.0.1:9", api_key=key)):
        with pytest.raises(ConfigError, match="printable ASCII characters without spaces"):
            make()


@pytest.mark.parametrize("argv,env,msg", [
    (["serve", "--api-key", "two words"], {}, "--api-key must be"),
    (["serve"], {"RALMSPEC_API_KEY": "two words"}, "$RALMSPEC_API_KEY must be"),
    (["knnlm", "serve", "--datastore", "/nonexistent", "--api-key", ""], {}, "--api-key must be"),
    (["serve", "--retriever-api-key", KEY], {}, "--retriever-api-key is the key of a --retriever-url service"),
])
def test_bad_key_flags_exit_2_before_anything_loads(capsys, monkeypatch, argv, env, msg):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main([*argv[:1], "--model", "tiny", *argv[1:]] if argv[0] == "serve" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err, err
