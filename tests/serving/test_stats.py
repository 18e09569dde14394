"""``GET /v1/stats`` over a real socket: the speculation totals (what the server's token identity
covered) grow by exactly what a finished speculative request reports, and naive requests add
nothing to them."""

from __future__ import annotations

import platform

import pytest

from ralmspec.errors import ConfigError
from ralmspec.serving.app import ServerConfig
from tests.serving.support import MODEL, request

# forced speculation that misses: fixed stride 3 (no OS^3 fallback), synchronous rounds, one
# passage cached per verification and 4-token queries, so guesses go wrong and roll back
FORCED = {"speculate": True, "os3": False, "fixed_stride": 3, "async_verify": False, "prefetch": 1,
          "stride": 2, "query_len": 4}
KEYS = ("requests", "speculated_steps", "verified_steps", "accepted", "rollbacks")


def _speculation(url: str) -> dict[str, int]:
    status, body = request("GET", f"{url}/v1/stats")
    assert status == 200
    return body["speculation"]


def _complete(url: str, prompt: str, ralm: dict) -> dict:
    status, body = request("POST", f"{url}/v1/completions",
                           {"model": MODEL, "prompt": prompt, "max_tokens": 24, "ralm": ralm})
    assert status == 200, body
    return body["ralm"]["stats"]


def test_v1_stats_counts_the_speculation_of_finished_requests(server):
    before = _speculation(server.url)
    assert set(before) == set(KEYS)
    spec = _complete(server.url, "the history of the roman empire", FORCED)
    assert spec["speculated"] > 0 and spec["rollbacks"] > 0, "the request was built to speculate and miss"
    assert spec["verified_steps"] >= 1  # its first step at least was retrieved for real
    mid = _speculation(server.url)
    assert {k: mid[k] - before[k] for k in KEYS} == {
        "requests": 1, "speculated_steps": spec["speculated"],
        "verified_steps": spec["verified_steps"] + spec["verified_ahead"],  # every step retrieved before its output
        "accepted": spec["accepted"], "rollbacks": spec["rollbacks"]}
    _complete(server.url, "the history of the roman empire", {"speculate": False})
    assert _speculation(server.url) == mid  # a naive request speculates nothing


def test_v1_stats_accounts_for_the_servers_memory(server):
    """``memory``: the process's RSS, the LM's caches (each within its bound) and the query
    encoder's LRU cache, read without waiting for the LM."""
    _complete(server.url, "the history of the roman empire", {"speculate": False})
    status, body = request("GET", f"{server.url}/v1/stats")
    assert status == 200
    mem = body["memory"]
    assert mem["rss_bytes"] > 50 << 20
    heap = mem["heap"]  # glibc's view of the C heap (None off glibc)
    if platform.libc_ver()[0] == "glibc":
        assert set(heap) == {"in_use_bytes", "free_bytes", "mmapped_bytes", "arena_bytes", "releasable_bytes"}
        assert 10 << 20 < heap["in_use_bytes"] < mem["rss_bytes"] + heap["mmapped_bytes"]
        trim = mem["heap_trim"]  # the periodic malloc_trim (ralmspec/memory.py), on by default
        assert trim["interval_s"] == 60.0 and trim["calls"] >= 0 and trim["released_bytes"] >= 0
    assert mem["pid"] > 0 and mem["workers"] == []  # one process: no Ray workers to read
    lm = mem["lm"]
    assert set(lm) == {"sessions", "session_kv_bytes", "runner_kv_bytes", "prefix_blocks", "prefix_bytes",
                       "prefix_capacity_bytes", "scored_chunks"}
    assert all(isinstance(v, int) and v >= 0 for v in lm.values())
    assert 0 < lm["prefix_bytes"] <= lm["prefix_capacity_bytes"] and lm["prefix_blocks"] >= 1
    assert lm["session_kv_bytes"] + lm["runner_kv_bytes"] > 0  # the KV the request ran in
    enc = mem["encoder_cache"]
    assert enc["size"] <= enc["capacity"] and enc["misses"] >= 1


def test_server_config_refuses_bad_memory_settings():
    for kw, msg in (({"malloc_trim_s": -1}, "malloc_trim_s must be >= 0"),
                    ({"worker_stats_timeout_s": 0}, "worker_stats_timeout_s must be > 0"),
                    ({"worker_stats_timeout_s": float("nan")}, "worker_stats_timeout_s must be > 0")):
        with pytest.raises(ConfigError, match=msg):
            ServerConfig(**kw)
