"""/v1/completions through the official ``openai`` client: same tokens as the engine's oracle,
streaming of verified tokens only, the ``ralm`` extension, concurrency over HTTP."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from tests.serving.support import MODEL, TEST_ENGINE_CONFIG, http, request

QUESTIONS = ["who wrote the song hey jude", "when did the roman empire fall",
             "what is the tallest mountain in europe", "how many players are on a cricket team",
             "who was the first president of the united states", "what is the capital of australia"]


def oracle(engine, prompt: str, max_tokens: int, **gen_kw):
    gen = replace(TEST_ENGINE_CONFIG.generation, max_new_tokens=max_tokens, **gen_kw)
    return engine.generate_sync(prompt, gen=gen, speculate=False)


@pytest.mark.parametrize("i,ralm", [
    (0, None),
    (1, {"speculate": False}),
    (2, {"async_verify": False, "os3": False, "fixed_stride": 3, "prefetch": 1}),
    (3, {"stride": 1, "query_len": 8, "retriever": "exact", "return_trace": True}),
])
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
    assert resp.usage.prompt_tokens == len(want.prompt_ids)
    assert resp.usage.completion_tokens == len(want.token_ids)
    assert resp.usage.total_tokens == len(want.prompt_ids) + len(want.token_ids)
    extra = resp.model_extra["ralm"]
    assert extra["mode"] == ("naive" if ralm and ralm.get("speculate") is False else "speculative")
    assert extra["retriever"] == "exact"
    assert [(p["doc_id"], p["start"], p["end"]) for p in extra["passages"]] == \
           [(s.doc_id, s.start, s.end) for s in want.steps]
    assert all(p["title"] == serving_engine.retriever.corpus[p["doc_id"]].title for p in extra["passages"])
    if extra["mode"] == "speculative":
        assert extra["stats"]["speculated"] >= extra["stats"]["accepted"]
    assert ("trace" in extra) == bool(ralm and ralm.get("return_trace"))


def test_prompt_as_list_of_one_string(server, serving_engine):
    status, body = request("POST", f"{server.url}/v1/completions",
                           {"model": MODEL, "prompt": [QUESTIONS[4]], "max_tokens": 6})
    assert status == 200, body
    assert body["choices"][0]["text"] == oracle(serving_engine, QUESTIONS[4], 6).text


def test_openai_client_streaming_sends_only_verified_tokens(client, serving_engine):
    """Rolled-back speculation never reaches the client: the stream concatenates to the oracle."""
    rollbacks = 0
    for q in QUESTIONS[:4]:
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
        assert "".join(texts) == want.text
        got = ""
        for t in texts:  # every prefix the client saw is a prefix of the verified answer
            got += t
            assert want.text.startswith(got)
        assert len([t for t in texts if t]) > 1, "the answer was not streamed in pieces"
        assert finish == ("stop" if want.finish_reason == "eos" else "length")
        assert usage.completion_tokens == len(want.token_ids)
        assert [p["doc_id"] for p in ralm["passages"]] == [s.doc_id for s in want.steps]
        rollbacks += ralm["stats"]["rollbacks"]
    assert rollbacks > 0, "no rollback happened while streaming: the test proves nothing"


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


def test_concurrent_http_requests_identical_to_oracle(server, serving_engine):
    """16 concurrent HTTP clients (mixed speculative / naive, async on / off) == the oracle one by one."""
    n = 16
    qs = [QUESTIONS[i % len(QUESTIONS)] + ("?" if i >= len(QUESTIONS) else "") for i in range(n)]
    ralms = [{"speculate": i % 4 != 0, "async_verify": bool(i % 2), "prefetch": (1, 20)[i % 2]} for i in range(n)]
    before = request("GET", f"{server.url}/v1/stats")[1]

    async def go():
        return await asyncio.gather(*(http("POST", f"{server.url}/v1/completions",
                                           {"model": MODEL, "prompt": q, "max_tokens": 8, "ralm": r})
                                      for q, r in zip(qs, ralms)))

    out = asyncio.run(go())
    after = request("GET", f"{server.url}/v1/stats")[1]
    for q, (status, body) in zip(qs, out):
        assert status == 200, body
        assert body["choices"][0]["text"] == oracle(serving_engine, q, 8).text
    new_lm = {int(k): v - before["lm_batch_sizes"]["counts"].get(k, 0)
              for k, v in after["lm_batch_sizes"]["counts"].items()}
    assert max(k for k, v in new_lm.items() if v > 0) > 1, "no LM batch spanned two requests"
    assert after["kb_batch_callers"]["max"] > 1


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
