"""``X-Request-Id``: every answer of the server carries one (the client's, or a new one), plain,
streamed, refused or not found, so one request can be followed through a proxy's, a client's and
the server's logs (the server's warnings name it)."""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
import pytest

from tests.serving.support import MODEL

BODY = {"model": MODEL, "prompt": "who wrote hamlet", "max_tokens": 3}


async def _answer(url: str, method: str, path: str, body=None, headers=None) -> tuple[int, str | None, bytes]:
    async with aiohttp.ClientSession() as s, s.request(method, url + path, json=body, headers=headers or {}) as r:
        return r.status, r.headers.get("X-Request-Id"), await r.read()


@pytest.mark.parametrize("method,path,body,status", [
    ("POST", "/v1/completions", BODY, 200),
    ("POST", "/v1/completions", dict(BODY, stream=True), 200),
    ("POST", "/v1/completions", dict(BODY, max_tokens=-1), 400),
    ("GET", "/v1/nowhere", None, 404),
    ("GET", "/health", None, 200),
])
def test_every_answer_carries_the_clients_request_id_or_a_new_one(server, method, path, body, status):
    got = asyncio.run(_answer(server.url, method, path, body, {"X-Request-Id": "trace-42/a.b"}))
    assert got[:2] == (status, "trace-42/a.b"), got
    fresh = [asyncio.run(_answer(server.url, method, path, body))[1] for _ in range(2)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid or "") for rid in fresh) and fresh[0] != fresh[1], fresh


@pytest.mark.parametrize("sent", ["x" * 129, "tab\there", ""])
def test_a_request_id_a_log_line_should_not_carry_is_replaced(server, sent):
    rid = asyncio.run(_answer(server.url, "GET", "/health", None, {"X-Request-Id": sent}))[1]
    assert rid != sent and re.fullmatch(r"[0-9a-f]{32}", rid), rid


def test_the_servers_warning_names_the_request_id(server, caplog, monkeypatch):
    from ralmspec.serving import app as app_module

    def broken(_exc, *_a, **_k):
        return app_module.APIError(500, "broken on purpose", "server_error")

    monkeypatch.setattr(app_module, "error_for", broken)
    with caplog.at_level(logging.WARNING, logger="ralmspec.serving"):
        status, rid, _ = asyncio.run(_answer(server.url, "POST", "/v1/completions", {"model": 5},
                                             {"X-Request-Id": "find-me-7"}))
    assert (status, rid) == (500, "find-me-7")
    assert any("broken on purpose" in r.getMessage() and "find-me-7" in r.getMessage() for r in caplog.records)
