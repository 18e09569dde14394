"""/v1/completions through the official ``openai`` client: same tokens as the engine's oracle,
streaming of verified tokens only, the ``ralm`` extension, concurrency over HTTP."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from tests.identity import SpeculationCheck
from tests.serving.conftest import serve
from tests.serving.support import MODEL, TEST_ENGINE_CONFIG, http, request

QUESTIONS = ["who wrote the song hey jude", "when did the roman empire fall",
             "what is the tallest mountain in europe", "how many players are on a cricket team",
             "who was the first president of the united states", "what is the capital of australia"]


def oracle(engine, prompt: str, max_tokens: int, **gen_kw):
    gen = replace(TEST_ENGINE_CONFIG.generation, max_new_tokens=max_tokens, **gen_kw)
    return engine.generate_sync(prompt, gen=gen, speculate=False)


@pytest.fixture(scope="module")
def governor_off_server(serving_engine):
    """The test server without its load governor: a request that forces speculation (``os3:
    false``) speculates however busy the LM is, so the concurrency identity test can assert it."""
    srv = serve(serving_engine, MODEL, 8, 120, governor=False)
    yield srv
    srv.stop()


# "defaults" and "stride1-trace" run the server's default OS^3 with its naive fallback: on this
# cheap knowledge base it may take only verified steps, so they need not speculate; their
# forcing siblings ("defaults-fixed-stride", "sync-fixed-stride") use a fixed stride and must.
COMPLETION_CASES = {
    "defaults": (0, None),
    "defaults-fixed-stride": (0, {"os3": False}),
    "naive": (1, {"speculate": False}),
    "sync-fixed-stride": (2, {"async_verify": False, "os3": False, "fixed_stride": 3, "prefetch": 1}),
    "stride1-trace": (3, {"stride": 1, "query_len": 8, "retriever": "exact", "return_trace": True}),
}


@pytest.mark.parametrize("i,ralm", COMPLETION_CASES.values(), ids=COMPLETION_CASES.keys())
def test_openai_client_completion_equals_oracle(client, serving_engine, i, ralm):
    q = QUESTIONS[i]
    kw = {"extra_body": {"ralm": ralm}} if ralm else {}
    resp = client.completions.create(model=MODEL, prompt=q, max_tokens=12, temperature=0, **kw)
    gen_kw = {k: ralm[k] for k in ("stride", "query_len") if ralm and k in ralm}
    want = oracle(serving_engine, q, 12, **gen_kw)
    assert resp.object == "text_completion" and resp.model == MODEL and resp.id.startswith("cmpl-")
    (choice,) = resp.choices
    assert choice.text == want.text and choice.index == 0 and choice.logprobs is None
    assert choice.finish_reason == ("stop" if want.finish_reason == "eos" else "length")
    assert resp.usage.prompt_tokens == want.prompt_tokens == len(want.prompt_ids)  # plain: no template
    assert resp.usage.completion_tokens == len(want.token_ids)
    assert resp.usage.total_tokens == len(want.prompt_ids) + len(want.token_ids)
    extra = resp.model_extra["ralm"]
    assert extra["mode"] == ("naive" if ralm and ralm.get("speculate") is False else "speculative")
    assert extra["retriever"] == "exact"
    assert [(p["doc_id"], p["start"], p["end"]) for p in extra["passages"]] == \
           [(s.doc_id, s.start, s.end) for s in want.steps]
    assert all(p["title"] == serving_engine.retriever.corpus[p["doc_id"]].title for p in extra["passages"])
    assert ("trace" in extra) == bool(ralm and ralm.get("return_trace"))
    if extra["mode"] == "speculative":
        check = SpeculationCheck()
        check.same(choice.text, want.text, extra["stats"])
        if ralm and ralm.get("os3") is False:
            check.ran(min_speculated=1)
        else:
            check.ran(min_speculated=0, why="the default OS^3 may fall back to verified steps on a cheap KB")


def test_prompt_as_list_of_one_string(server, serving_engine):
    status, body = request("POST", f"{server.url}/v1/completions",
                           {"model": MODEL, "prompt": [QUESTIONS[4]], "max_tokens": 6})
    assert status == 200, body
    assert body["choices"][0]["text"] == oracle(serving_engine, QUESTIONS[4], 6).text


def test_openai_client_streaming_sends_only_verified_tokens(client, serving_engine):
    """Rolled-back speculation never reaches the client: the stream concatenates to the oracle.
    Fixed stride: every request speculates, and the stream crosses rollbacks."""
    check, qs = SpeculationCheck(), QUESTIONS[:4]
    for q in qs:
        want = oracle(serving_engine, q, 16)
        stream = client.completions.create(
            model=MODEL, prompt=q, max_tokens=16, stream=True, stream_options={"include_usage": True},
            extra_body={"ralm": {"prefetch": 1, "os3": False, "fixed_stride": 3, "async_verify": True}})
        texts, finish, usage, ralm = [], None, None, None
        for chunk in stream:
            if chunk.choices:
                texts.append(chunk.choices[0].text)
                if chunk.choices[0].finish_reason is not None:
                    finish = chunk.choices[0].finish_reason
                    ralm = chunk.model_extra.get("ralm")
            if chunk.usage is not None:
                usage = chunk.usage
        check.same("".join(texts), want.text, ralm["stats"], where=q)
        got = ""
        for t in texts:  # every prefix the client saw is a prefix of the verified answer
            got += t
            assert want.text.startswith(got)
        assert len([t for t in texts if t]) > 1, "the answer was not streamed in pieces"
        assert finish == ("stop" if want.finish_reason == "eos" else "length")
        assert usage.completion_tokens == len(want.token_ids)
        assert [p["doc_id"] for p in ralm["passages"]] == [s.doc_id for s in want.steps]
    check.ran(min_speculated=len(qs), min_rollbacks=1)


def test_raw_sse_format(server):
    async def go():
        import aiohttp

        async with aiohttp.ClientSession() as s:
            async with s.post(f"{server.url}/v1/completions",
                              json={"model": MODEL, "prompt": QUESTIONS[5], "max_tokens": 6, "stream": True}) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/event-stream")
                return (await r.read()).decode()

    raw = asyncio.run(go())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["choices"][0]["index"] == 0 for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_a_fault_after_the_stream_started_ends_it_with_an_error_event(server, monkeypatch):
    """An exception in the stream's own code once the 200 headers are sent (here planted in its
    text step; a byte-fallback tokenizer's logprobs once raised there) ends the stream with an
    SSE error event; before, the middleware wrote a second HTTP answer (a 500) into the body and
    the client read a broken chunked body."""
    from ralmspec.engine.stream import VerifiedText

    pushes = []
    real_push = VerifiedText.push

    def faulty_push(self, ids):
        pushes.append(len(ids))
        if len(pushes) == 2:
            raise AssertionError("planted fault")
        return real_push(self, ids)
    monkeypatch.setattr(VerifiedText, "push", faulty_push)

    async def go():
        import aiohttp

        async with aiohttp.ClientSession() as s:
            async with s.post(f"{server.url}/v1/completions",
                              json={"model": MODEL, "prompt": QUESTIONS[3], "max_tokens": 24, "stream": True,
                                    "ralm": {"stride": 2}}) as r:
                return r.status, (await r.read()).decode()

    status, raw = asyncio.run(go())
    assert status == 200 and len(pushes) == 2
    assert "HTTP/1.1" not in raw
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    last = json.loads(events[-1][len("data: "):])
    assert last["error"]["code"] is None and "planted fault" in last["error"]["message"], last


@pytest.mark.parametrize("forced", [True, False], ids=["governor-off-fixed-stride", "defaults-need-not-speculate"])
def test_concurrent_http_requests_identical_to_oracle(forced, server, governor_off_server, serving_engine):
    """16 concurrent HTTP clients (mixed speculative / naive, async on / off) == the oracle one by one.

    ``defaults-need-not-speculate``: the shared server as configured (load governor on) and the
    requests' default OS^3 with its naive fallback: on this cheap knowledge base OS^3 may take
    only verified steps and 16 clients may make the governor pause speculation, so whether it
    speculates depends on timing. ``governor-off-fixed-stride`` is its forcing sibling: no
    governor and a fixed stride, so every speculative request speculates."""
    n = 16
    srv = governor_off_server if forced else server
    qs = [QUESTIONS[i % len(QUESTIONS)] + ("?" if i >= len(QUESTIONS) else "") for i in range(n)]
    ralms = [{"speculate": i % 4 != 0, "async_verify": bool(i % 2), "prefetch": (1, 20)[i % 2]}
             | ({"os3": False} if forced else {}) for i in range(n)]
    before = request("GET", f"{srv.url}/v1/stats")[1]

    async def go():
        return await asyncio.gather(*(http("POST", f"{srv.url}/v1/completions",
                                           {"model": MODEL, "prompt": q, "max_tokens": 8, "ralm": r})
                                      for q, r in zip(qs, ralms)))

    out = asyncio.run(go())
    after = request("GET", f"{srv.url}/v1/stats")[1]
    check = SpeculationCheck()
    for q, (status, body) in zip(qs, out):
        assert status == 200, body
        check.same(body["choices"][0]["text"], oracle(serving_engine, q, 8).text, body["ralm"]["stats"], where=q)
    if forced:
        check.ran(min_speculated=sum(r["speculate"] for r in ralms))
    else:
        check.ran(min_speculated=0, why="default OS^3 on a cheap KB, load governor on: speculation depends on timing")
    new_lm = {int(k): v - before["lm_batch_sizes"]["counts"].get(k, 0)
              for k, v in after["lm_batch_sizes"]["counts"].items()}
    assert max(k for k, v in new_lm.items() if v > 0) > 1, "no LM batch spanned two requests"
    assert after["kb_batch_callers"]["max"] > 1


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


RALM_CHOICES = {
    "stride": [1, 2, 3, 5], "query_len": [1, 4, 16], "passage_tokens": [1, 8, 64], "prefetch": [1, 2, 20, 256],
    "fixed_stride": [1, 2, 5, 16], "async_verify": [True, False], "max_inflight": [1, 2, 4],
    "eager_verify": [True, False], "cache_capacity": [1, 2, 8, 1000], "s_max": [1, 4, 16], "window": [1, 5, 50],
    "gamma_max": [0.1, 0.5, 0.98], "guesser": ["exact", "last", "refine", "static", "bm25"],
}


def test_any_ralm_settings_over_http_equal_the_naive_answer(governor_off_server):
    """Property over the HTTP mapping of the ``ralm`` extension: for 24 random combinations of
    its settings (half of them each; greedy or seeded sampling, logprobs, stop strings), the
    answer with ``speculate: true`` equals ``speculate: false`` in text, finish reason and
    logprobs, and the sweep speculated (OS^3 off in half of them, so it must)."""
    import random

    rng = random.Random(20261206)
    check = SpeculationCheck()
    for i in range(24):
        ralm = {k: rng.choice(v) for k, v in RALM_CHOICES.items() if rng.random() < 0.5}
        ralm["os3"] = i % 2 == 1
        body = {"model": MODEL, "prompt": QUESTIONS[i % len(QUESTIONS)], "max_tokens": rng.choice([6, 14]),
                "logprobs": rng.choice([None, 2])}
        if i % 3 == 0:
            body.update(temperature=0.9, top_p=0.9, seed=i)
        if i % 4 == 0:
            body["stop"] = [rng.choice([".", " the", "a"])]
        body = {k: v for k, v in body.items() if v is not None}
        status, spec = request("POST", f"{governor_off_server.url}/v1/completions", {**body, "ralm": {**ralm}})
        assert status == 200, (ralm, spec)
        status, naive = request("POST", f"{governor_off_server.url}/v1/completions",
                                {**body, "ralm": {**ralm, "speculate": False}})
        assert status == 200 and naive["ralm"]["mode"] == "naive", naive
        (a,), (b,) = spec["choices"], naive["choices"]
        check.same((a["text"], a["finish_reason"], a["logprobs"]), (b["text"], b["finish_reason"], b["logprobs"]),
                   spec["ralm"]["stats"], where=ralm)
    check.ran(min_speculated=20)
