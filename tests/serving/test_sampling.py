"""Sampled completions over HTTP with the official ``openai`` client: ``temperature`` / ``top_p`` /
``seed`` give the same text every time and with speculation on or off; a request without a seed
gets the seed the server drew, and sending it back reproduces the text."""

from __future__ import annotations

import pytest

from tests.identity import SpeculationCheck
from tests.serving.support import MODEL, request

PROMPT = "who wrote the song hey jude"


def complete(client, speculate: bool | None = None, **kw):
    """One completion; a fixed stride (``os3: false``), so a speculative one speculates."""
    ralm = {"prefetch": 1, "os3": False, "fixed_stride": 3} | ({} if speculate is None else {"speculate": speculate})
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, extra_body={"ralm": ralm}, **kw)


def test_seeded_sampling_is_reproducible_and_exact(client):
    a = complete(client, temperature=0.8, seed=7)
    b = complete(client, temperature=0.8, seed=7)
    spec_on = complete(client, speculate=True, temperature=0.8, seed=7)
    spec_off = complete(client, speculate=False, temperature=0.8, seed=7)
    assert a.choices[0].text == b.choices[0].text
    check = SpeculationCheck()
    for res in (a, spec_on):
        check.same(res.choices[0].text, spec_off.choices[0].text, res.model_extra["ralm"]["stats"])
    check.ran(min_speculated=2)  # both speculative answers speculated
    assert spec_on.model_extra["ralm"]["mode"] == "speculative"
    assert spec_off.model_extra["ralm"]["mode"] == "naive"
    gen = a.model_extra["ralm"]["generation"]
    assert (gen["temperature"], gen["top_p"], gen["seed"]) == (0.8, 1.0, 7)
    assert complete(client, temperature=0.8, seed=8).choices[0].text != a.choices[0].text
    assert complete(client, temperature=0).choices[0].text != a.choices[0].text
    nucleus = complete(client, temperature=0.8, top_p=0.5, seed=7)
    assert nucleus.model_extra["ralm"]["generation"]["top_p"] == 0.5
    assert nucleus.choices[0].text == complete(client, speculate=False, temperature=0.8, top_p=0.5,
                                               seed=7).choices[0].text


def test_server_draws_a_seed_and_returns_it(client):
    first = complete(client, temperature=1.0)
    seed = first.model_extra["ralm"]["generation"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2 ** 53
    again = complete(client, speculate=False, temperature=1.0, seed=seed)
    check = SpeculationCheck()
    check.same(first.choices[0].text, again.choices[0].text, first.model_extra["ralm"]["stats"])
    check.ran(min_speculated=1)
    other = complete(client, temperature=1.0)
    assert other.model_extra["ralm"]["generation"]["seed"] != seed
    assert complete(client, temperature=0).model_extra["ralm"]["generation"]["seed"] is None  # greedy: no seed


def test_streamed_sample_equals_the_answer(client):
    want = complete(client, temperature=0.8, seed=11)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stream=True, temperature=0.8,
                                       seed=11, extra_body={"ralm": {"prefetch": 1, "async_verify": True}})
    texts, ralm = [], None
    for chunk in stream:
        texts.append(chunk.choices[0].text)
        ralm = chunk.model_extra.get("ralm") or ralm
    assert "".join(texts) == want.choices[0].text
    assert ralm["generation"]["seed"] == 11


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("temperature", 2.5), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5),
    ("top_p", "all"), ("seed", -1), ("seed", 2 ** 63), ("seed", 1.5), ("seed", "7"), ("seed", True),
])
def test_bad_sampling_fields_are_400_naming_the_field(server, field, value):
    status, body = request("POST", f"{server.url}/v1/completions",
                           {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0.8, field: value})
    assert status == 400, body
    assert body["error"]["param"] == field and field in body["error"]["message"]


def test_greedy_only_backend_refuses_temperature(server, serving_engine, monkeypatch):
    monkeypatch.setattr(type(serving_engine.lm), "supports_sampling", False)
    status, body = request("POST", f"{server.url}/v1/completions",
                           {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0.8, "seed": 1})
    assert status == 400 and body["error"]["param"] == "temperature", body
    status, body = request("POST", f"{server.url}/v1/completions",
                           {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert status == 200, body
