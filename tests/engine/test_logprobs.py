"""Log-probabilities of the answer (ralmspec/engine/logprobs.py, ``LanguageModel.token_logprobs``):
each step's tokens are scored under that step's own passage, with the decoding's own logits, so
they are identical with speculation on and off (real tiny LM, real exact knowledge base)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
from ralmspec.engine.core import RalmEngine
from ralmspec.engine.logprobs import step_inputs
from ralmspec.engine.result import VerifiedChunk
from ralmspec.errors import ConfigError
from tests.identity import SpeculationCheck

QUESTIONS = ["who wrote the song hey jude", "what is the capital of australia", "when did the war end",
             "how many moons does mars have"]
FORCED = SpeculationConfig(os3=False, fixed_stride=3, prefetch=1, async_verify=True)


@pytest.fixture(scope="module")
def engine(tiny_lm, small_indexes):
    gen = GenerationConfig(stride=2, query_len=8, max_new_tokens=16, passage_tokens=64, logprobs=3)
    return RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig(model="tiny", generation=gen))


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_logprobs_are_identical_with_and_without_speculation(engine, sampled):
    gen = engine.config.generation
    if sampled:
        gen = replace(gen, temperature=0.9, top_p=0.9, seed=5)
    speculated = rolled_back = switched = 0
    for q in QUESTIONS:
        naive = engine.generate_sync(q, gen=gen, speculate=False)
        spec = engine.generate_sync(q, gen=gen, spec=FORCED, speculate=True)
        assert spec.token_ids == naive.token_ids
        assert spec.logprobs == naive.logprobs  # floats compared exactly
        assert [lp.token for lp in naive.logprobs] == naive.token_ids
        for lp in naive.logprobs:
            assert len(lp.top) == 3 and [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
            assert lp.logprob <= lp.top[0][1] <= 0.0
            if not sampled:  # greedy: the kept token is the argmax of the logits it was decoded from
                assert lp.top[0] == (lp.token, lp.logprob)
        speculated += spec.stats["speculated"]
        rolled_back += spec.stats["rollbacks"]
        switched += len({st.doc_id for st in naive.steps}) > 1
    assert speculated > 0 and rolled_back > 0 and switched > 0


@pytest.mark.parametrize("runner", ["eager", "static", "batched"])
def test_logprobs_are_taken_from_decoding_and_equal_the_replay(tiny_lm, small_indexes, runner):
    """A request that asks for logprobs has its chunks scored from the logits they were decoded
    with (``Sampling.logprobs``), so the answer is scored without replaying it; the values are
    the replay's, bit for bit (the backend's memo turned off), greedy and sampled, naive and
    speculative (rolled-back chunks are never looked up)."""
    from tests.lm.conftest import make_view

    lm = make_view(tiny_lm, runner=runner)
    gen = GenerationConfig(stride=2, query_len=8, max_new_tokens=16, passage_tokens=64, logprobs=3)
    engine = RalmEngine(lm, small_indexes["exact"], EngineConfig(model="tiny", generation=gen))
    runs = {}
    for memo in (True, False):
        lm.max_scored_chunks = 1024 if memo else 0
        lm.clear_prefix_cache()
        before = (lm.scored_from_decode, lm.scored_by_replay)
        out = []
        for i, q in enumerate(QUESTIONS):
            g = replace(gen, temperature=0.9, top_p=0.9, seed=5 + i) if i % 2 else gen
            out.append(engine.generate_sync(q, gen=g, speculate=False))
            out.append(engine.generate_sync(q, gen=g, spec=FORCED, speculate=True))
        tokens = sum(len(r.token_ids) for r in out)
        from_decode, by_replay = lm.scored_from_decode - before[0], lm.scored_by_replay - before[1]
        if memo:
            assert from_decode == tokens and by_replay == 0, (from_decode, by_replay, tokens)
            assert sum(r.stats["rollbacks"] for r in out[1::2]) > 0  # rolled-back chunks were scored too
        else:
            assert from_decode == 0 and by_replay == tokens
        runs[memo] = out
    for a, b in zip(runs[True], runs[False]):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs  # floats compared exactly


def test_each_step_is_scored_under_its_own_passage(engine):
    """The first token of every step scores with the logits of that step's LM input (its own
    passage), bit for bit; another step's passage gives other numbers."""
    for q in QUESTIONS:
        res = engine.generate_sync(q, speculate=False)
        if len({st.doc_id for st in res.steps}) > 1:
            break
    else:
        pytest.fail("no question switched passages; the check below would be empty")
    ctx = engine.context()
    inputs = step_inputs(ctx, res)
    assert len(inputs) == len(res.steps)
    at = 0
    for (prompt, toks), st in zip(inputs, res.steps):
        assert toks == res.token_ids[st.start: st.end]
        logits = engine.lm.next_token_states([prompt], hidden=False)[0].logits.double()
        want = torch.log_softmax(logits, -1)[toks[0]].item()
        assert res.logprobs[at].logprob == want
        at += len(toks)
    first = res.steps[0].doc_id
    other = next(st for st in res.steps if st.doc_id != first)
    n0 = len(res.prompt_ids)
    tokens = res.prompt_ids + res.token_ids
    wrong = ctx.lm_prompt(first, tokens[: n0 + other.start], n0, ctx.chunk_size(other.start))
    rescored = engine.lm.token_logprobs(wrong, res.token_ids[other.start: other.end], 3)
    assert [lp.logprob for lp in rescored] != [lp.logprob for lp in res.logprobs[other.start: other.end]]


def test_logprobs_cover_the_stopped_answer(engine):
    q = QUESTIONS[0]
    full = engine.generate_sync(q, speculate=False)
    stop = engine.lm.tokenizer.decode(full.token_ids[5:7]).strip()
    gen = replace(engine.config.generation, stop=(stop,))
    res = engine.generate_sync(q, gen=gen, spec=FORCED, speculate=True)
    assert res.finish_reason == "stop" and len(res.logprobs) == len(res.token_ids) < len(full.token_ids)
    assert res.logprobs == full.logprobs[: len(res.token_ids)]


def test_logprobs_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="logprobs"):
        GenerationConfig(logprobs=21)
    with pytest.raises(ConfigError, match="stop"):
        GenerationConfig(stop=("",))


@pytest.mark.parametrize("memo", [True, False], ids=["from-decoding", "replayed"])
def test_each_verified_chunk_carries_its_logprobs(tiny_lm, small_indexes, memo):
    """``on_tokens`` gets every verified chunk with its tokens' logprobs (``VerifiedChunk``), in
    order, before ``generate`` returns: concatenated, they are the result's logprobs exactly, naive
    and speculative (with rollbacks), greedy and sampled, and with a stop string the result's are
    their prefix. From decoding, each chunk is passed on at once; replayed (the memo off), the
    chunks wait for their replays in a thread and still arrive in order."""
    from tests.lm.conftest import make_view

    lm = make_view(tiny_lm)
    lm.max_scored_chunks = 1024 if memo else 0
    gen = GenerationConfig(stride=2, query_len=8, max_new_tokens=16, passage_tokens=64, logprobs=2)
    engine = RalmEngine(lm, small_indexes["exact"], EngineConfig(model="tiny", generation=gen))
    check = SpeculationCheck()
    for i, q in enumerate(QUESTIONS):
        g = replace(gen, temperature=0.9, top_p=0.9, seed=11 + i) if i % 2 else gen
        runs = []
        for speculate in (False, True):
            chunks: list = []
            res = engine.generate_sync(q, gen=g, spec=FORCED, speculate=speculate, on_tokens=chunks.append)
            assert all(isinstance(c, VerifiedChunk) and len(c.logprobs) == len(c) for c in chunks)
            assert [t for c in chunks for t in c] == res.token_ids
            assert [lp for c in chunks for lp in c.logprobs] == res.logprobs
            assert len(chunks) > 1
            runs.append(res)
        check.same(runs[1].token_ids, runs[0].token_ids, runs[1].stats, where=q)
        assert runs[1].logprobs == runs[0].logprobs
    check.ran(min_speculated=4, min_rollbacks=1)
    assert (lm.scored_by_replay == 0) if memo else (lm.scored_from_decode == 0 and lm.scored_by_replay > 0)
    # a stop string: every chunk is still passed on, the result's logprobs are a prefix of theirs
    full = engine.generate_sync(QUESTIONS[0], speculate=False)
    stop = engine.lm.tokenizer.decode(full.token_ids[5:7]).strip()
    chunks = []
    res = engine.generate_sync(QUESTIONS[0], gen=replace(gen, stop=(stop,)), spec=FORCED, speculate=True,
                               on_tokens=chunks.append)
    streamed = [lp for c in chunks for lp in c.logprobs]
    assert res.finish_reason == "stop" and res.logprobs == streamed[:len(res.token_ids)] == full.logprobs[:len(res.token_ids)]


def test_chunks_without_logprobs_carry_none(engine):
    chunks: list = []
    res = engine.generate_sync(QUESTIONS[1], gen=replace(engine.config.generation, logprobs=None),
                               on_tokens=chunks.append)
    assert res.logprobs is None and chunks and all(isinstance(c, VerifiedChunk) and c.logprobs is None for c in chunks)
    assert [t for c in chunks for t in c] == res.token_ids
