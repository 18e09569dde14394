"""experiments/identity_soak.py: its random requests are valid requests (the server's own parser
takes them, both of each pair), its comparison catches a changed token, logprob or passage, a
stream's logprobs are put back together in order, and a short run against a spawned tiny server
compares pairs that speculated."""

from __future__ import annotations

import copy
import json
import random

import pytest

from experiments import identity_soak as soak
from ralmspec.config import EngineConfig
from ralmspec.serving.protocol import parse_chat, parse_completion

QUESTIONS = ["Who wrote Hamlet?", "Where is the Eiffel tower?", "What is a comet?"]


@pytest.mark.parametrize("kind", ["exact", "bm25"])
def test_every_drawn_request_is_valid_and_the_draws_cover_the_settings(kind):
    rng = random.Random(7)
    defaults = EngineConfig(model="tiny")
    seen = set()
    for _ in range(400):
        endpoint, body, stream = soak.draw_request(rng, QUESTIONS, "tiny", chat=True, dense=kind != "bm25")
        parse = parse_chat if endpoint == "chat" else parse_completion
        for speculate in (True, False):
            req = parse(soak.with_speculate(body, speculate), defaults, "tiny", kind, 4096)
            assert req.speculate is speculate
        seen |= {endpoint, f"stream={stream}", f"os3={body['ralm']['os3']}"} | set(body) | set(body["ralm"])
        seen.add(f"guesser={body['ralm'].get('guesser')}")
    assert {"chat", "completions", "stream=True", "stream=False", "os3=True", "os3=False", "temperature", "logprobs",
            "stop", *soak.RALM_CHOICES} <= seen
    assert ("guesser=static" in seen) == (kind != "bm25")
    assert "speculate" not in body["ralm"]  # with_speculate copies the body


def test_every_drawn_knnlm_request_is_valid():
    from ralmspec.knnlm.model import KNNLMConfig
    from ralmspec.knnlm.speculative import SpeculativeKNNConfig
    from ralmspec.serving.protocol import parse_knnlm_completion

    rng = random.Random(3)
    seen = set()
    for _ in range(300):
        endpoint, body, _ = soak.draw_request(rng, QUESTIONS, "tiny", chat=True, dense=True, knnlm=True)
        assert "ralm" not in body and "temperature" not in body and "logprobs" not in body
        for speculate in (True, False):
            req = parse_knnlm_completion(soak.with_speculate(body, speculate), KNNLMConfig(), SpeculativeKNNConfig(),
                                         True, "tiny", 4096, chat=endpoint == "chat")
            assert req.speculate is speculate
        seen |= {endpoint} | set(body) | set(body["knnlm"])
    assert {"chat", "completions", "stop", "os3", *soak.KNNLM_CHOICES} <= seen


def test_without_a_chat_template_every_request_is_a_completion():
    rng = random.Random(1)
    assert {soak.draw_request(rng, QUESTIONS, "m", chat=False, dense=True)[0] for _ in range(50)} == {"completions"}


def answer(text="a b", lp=(-0.5, -1.0), docs=((3, 0, 2),)):
    return {"text": text, "finish_reason": "length", "usage": {"completion_tokens": 2}, "streamed": False,
            "logprobs": {"tokens": ["a", " b"], "token_logprobs": list(lp), "top_logprobs": None, "text_offset": [0, 1]},
            "ralm": {"passages": [{"doc_id": d, "title": "t", "start": s, "end": e} for d, s, e in docs],
                     "stats": {"speculated": 1}}}


def test_differences_name_each_changed_field():
    base = answer()
    assert soak.differences(base, copy.deepcopy(base)) == []
    assert soak.differences(answer(text="a c"), base) == ["text"]
    assert soak.differences(answer(lp=(-0.5, -1.0000001)), base) == ["logprobs"]
    assert soak.differences(answer(docs=((3, 0, 1), (4, 1, 2))), base) == ["passages"]
    stopped = {**answer(), "finish_reason": "stop"}
    assert soak.differences(stopped, base) == ["finish_reason"]
    # latency, stats and the streamed flag are not compared
    other = {**copy.deepcopy(base), "streamed": True}
    other["ralm"]["stats"] = {"speculated": 9}
    assert soak.differences(other, base) == []


def test_a_streams_logprobs_are_its_chunks_in_order():
    parts = [None, {"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [{"a": -1.0}], "text_offset": [0]},
             {"tokens": [" b", "c"], "token_logprobs": [-2.0, -3.0], "top_logprobs": [{" b": -2.0}, {"c": -3.0}],
              "text_offset": [1, 3]}, None]
    assert soak.merge_logprobs("completions", parts) == {
        "tokens": ["a", " b", "c"], "token_logprobs": [-1.0, -2.0, -3.0],
        "top_logprobs": [{"a": -1.0}, {" b": -2.0}, {"c": -3.0}], "text_offset": [0, 1, 3]}
    chat = [{"content": [{"token": "x"}], "refusal": None}, None, {"content": [{"token": "y"}], "refusal": None}]
    assert soak.merge_logprobs("chat", chat) == {"content": [{"token": "x"}, {"token": "y"}], "refusal": None}
    assert soak.merge_logprobs("chat", [None, None]) is None


def test_a_short_soak_compares_pairs_that_speculated(tmp_path):
    """The soak runs for a fixed time, so how many pairs it compares depends on the machine: 0.2
    minutes gave 14 pairs with the 2 cores otherwise busy (the bound is 10); 0.4 minutes leave room."""
    out = tmp_path / "soak.json"
    rc = soak.main(["--model", "tiny", "--clients", "2", "--minutes", "0.4", "--progress", "5", "--abandon", "0.5",
                    "--json", str(out), "--", "--lm-prefix-cache-mib", "1"])
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert rc == 0, s
    assert s["pairs"] >= 10 and s["mismatches"] == 0 and s["errors"] == 0
    assert s["speculated"] > 0 and s["answers_speculated"] > 0 and s["streamed"] > 0
    # tiny has no chat template
    assert s["chat_endpoint"] is False and "chat" not in s and s["completions"] == s["pairs"]
    assert s.get("abandoned_left", 0) > 0  # neighbours left mid-answer, and the pairs still agree
    assert s["lm_runner"] and doc["settings"]["server_args"] == ["--lm-prefix-cache-mib", "1"]


def test_a_short_knnlm_soak_compares_pairs_that_speculated(tmp_path, knn_datastores):
    out = tmp_path / "soak.json"
    rc = soak.main(["--model", "tiny", "--knnlm", str(knn_datastores["flat"].path), "--clients", "2",
                    "--minutes", "0.15", "--progress", "5", "--json", str(out), "--", "--speculate-max-active", "4"])
    s = json.loads(out.read_text())["summary"]
    assert rc == 0, s
    assert s["pairs"] >= 5 and s["mismatches"] == 0 and s["errors"] == 0
    assert s["speculated"] > 0 and s["answers_speculated"] > 0 and s["logprobs"] == s["sampled"] == 0
