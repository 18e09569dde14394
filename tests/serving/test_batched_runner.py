"""Serving on the batched LM runner (``--lm-runner batched``): concurrent HTTP requests whose LM
chunks share decode forwards return exactly what each returns alone, naive, and speculation ran."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from tests.identity import SpeculationCheck
from tests.serving.conftest import serve
from tests.serving.support import MODEL, TEST_ENGINE_CONFIG, http, request

QUESTIONS = ["who wrote the song hey jude", "when did the roman empire fall",
             "what is the tallest mountain in europe", "how many players are on a cricket team",
             "who was the first president of the united states", "what is the capital of australia"]


@pytest.fixture(scope="module", params=["batched", "batched, prompt blocks together"])
def batched_engine(small_indexes, tiny_lm, request):
    """The batched runner; also with CUDA's prompt blocks forced on the CPU (the requests' blocks
    share padded forwards: ``StaticRunner.prefills_together``)."""
    from ralmspec.engine.core import RalmEngine
    from tests.lm.conftest import make_view
    from tests.lm.test_batched_runner import blocks_together

    config = replace(TEST_ENGINE_CONFIG, lm_runner="batched")
    lm = make_view(tiny_lm, runner="batched")
    return RalmEngine(blocks_together(lm) if "together" in request.param else lm, small_indexes["exact"], config)


@pytest.fixture(scope="module")
def batched_server(batched_engine):
    """No load governor, so requests that force speculation (``os3: false``) speculate."""
    srv = serve(batched_engine, MODEL, 8, 120, governor=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def eager_engine(small_indexes, tiny_lm):
    from ralmspec.engine.core import RalmEngine

    return RalmEngine(tiny_lm, small_indexes["exact"], TEST_ENGINE_CONFIG)


def test_concurrent_requests_on_the_batched_runner_equal_each_alone(batched_server, batched_engine, eager_engine):
    """8 concurrent clients (speculative with a fixed stride, naive, one seeded sample) == the
    naive loop run alone on the same engine, and the greedy ones == the eager runner's engine;
    the LM runner stepped several requests in one forward."""
    qs = [QUESTIONS[i % len(QUESTIONS)] + ("?" if i >= len(QUESTIONS) else "") for i in range(8)]
    bodies = [{"model": MODEL, "prompt": q, "max_tokens": 8,
               "ralm": {"speculate": i % 4 != 0, "os3": False, "async_verify": bool(i % 2), "prefetch": (1, 20)[i % 2]}}
              | ({"temperature": 0.8, "seed": 5} if i == 3 else {}) for i, q in enumerate(qs)]
    runner = batched_engine.lm.runner
    shared_before = sum(v for k, v in runner.live_rows.items() if k > 1)
    blocks_before = sum(v for k, v in runner.block_rows.items() if k > 1)

    async def go():
        return await asyncio.gather(*(http("POST", f"{batched_server.url}/v1/completions", b) for b in bodies))

    out = asyncio.run(go())
    shared = sum(v for k, v in runner.live_rows.items() if k > 1) - shared_before
    check = SpeculationCheck()
    for b, (status, body) in zip(bodies, out):
        assert status == 200, body
        gen = replace(TEST_ENGINE_CONFIG.generation, max_new_tokens=8,
                      **({"temperature": 0.8, "seed": 5} if "seed" in b else {}))
        alone = batched_engine.generate_sync(b["prompt"], gen=gen, speculate=False)
        check.same(body["choices"][0]["text"], alone.text, body["ralm"]["stats"], where=b["prompt"])
        if "seed" not in b:
            eager = eager_engine.generate_sync(b["prompt"], gen=gen, speculate=False)
            assert alone.text == eager.text, b["prompt"]
    check.ran(min_speculated=sum(b["ralm"]["speculate"] for b in bodies))
    assert shared > 0, "no decode forward stepped two requests: the batched path did not run"
    if runner.prefills_together:
        assert sum(v for k, v in runner.block_rows.items() if k > 1) > blocks_before, "no shared block forward"
    stats = request("GET", f"{batched_server.url}/v1/stats")[1]
    assert stats["lm_batch_sizes"]["max"] > 1
    # the server says how its LM ran: steps that held more than one live row, no graphs on the CPU
    runner = stats["lm_runner"]
    assert runner["name"] == "batched" and runner["cuda_graphs"] == 0
    assert stats["lm_dtype"] == str(batched_engine.lm.dtype).removeprefix("torch.")
    assert any(int(rows) > 1 for rows in runner["batched_steps_by_live_rows"])
