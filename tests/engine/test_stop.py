"""Stop sequences (ralmspec/engine/stop.py): the cut rule, the streaming filter that never sends
text a stop string could still claim, and both loops ending at the same chunk with the same
answer, speculating or not (real tiny LM, real exact and BM25 knowledge bases)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
from ralmspec.engine.core import RalmEngine
from ralmspec.engine.stop import StopStream, find_stop, stable_text


def test_find_stop_takes_the_occurrence_that_ends_first():
    assert find_stop("abcdef", ["cd"]) == (2, 4)
    assert find_stop("abcdef", ["abcdef", "cd"]) == (2, 4)  # "cd" is complete before "abcdef" is
    assert find_stop("abcdef", ["bcd", "cd"]) == (1, 4)  # same end: the longer one
    assert find_stop("abcdef", ["x"]) is None
    assert find_stop("", ["x"]) is None


TEXT = st.text(alphabet="ab\nc", max_size=40)
STOPS = st.lists(st.text(alphabet="ab\nc", min_size=1, max_size=4), min_size=1, max_size=4)


@settings(max_examples=400, deadline=None)
@given(text=TEXT, stops=STOPS, cuts=st.lists(st.integers(0, 40), max_size=8))
def test_stream_filter_sends_exactly_the_cut_text(text, stops, cuts):
    """Whatever the chunking, the sent text is the text cut at its first stop: nothing sent is
    ever taken back, and a stop spanning two chunks is never sent in part."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    f = StopStream(stops)
    sent = "".join(f.push(text[a:b]) for a, b in zip(bounds, bounds[1:])) + f.finish()
    hit = find_stop(text, stops)
    assert sent == (text if hit is None else text[: hit[0]])


def test_stream_filter_holds_back_a_partial_match_until_it_is_decided():
    f = StopStream(["STOP"])
    assert f.push("hello ST") == "hello "  # "ST" may start "STOP"
    assert f.push("O") == ""
    assert f.push("RM") == "STORM"  # it did not
    assert f.push(" then STO") == " then "
    assert f.push("P and more") == "" and f.stopped
    assert f.push("ignored") == "" and f.finish() == ""


@pytest.fixture(scope="module")
def engines(tiny_lm, small_indexes):
    gen = GenerationConfig(stride=2, query_len=16, max_new_tokens=24, passage_tokens=64)
    return {kind: RalmEngine(tiny_lm, small_indexes[kind], EngineConfig(model="tiny", generation=gen))
            for kind in ("exact", "bm25")}


QUESTIONS = ["who wrote the song hey jude", "what is the capital of australia", "when did the war end"]
FORCED = SpeculationConfig(os3=False, fixed_stride=3, prefetch=1, async_verify=True)


def test_stop_ends_both_loops_at_the_same_answer(engines):
    """A stop string taken from the middle of each full answer, spanning a chunk boundary: the
    answer ends before it (shortest token prefix that completes it), identically with
    speculation (which must have run and rolled back somewhere in the sweep) and without."""
    speculated = rolled_back = 0
    for engine, q in [(e, q) for e in engines.values() for q in QUESTIONS]:
        tok = engine.lm.tokenizer
        full = engine.generate_sync(q, speculate=False)
        ids = full.token_ids
        # the text of tokens 9..10 spans the boundary between chunks [8, 10) and [10, 12)
        before, upto = stable_text(tok, ids[:9]), stable_text(tok, ids[:11])
        stop = upto[len(before):].strip() or upto[-3:]
        start = full.text.find(stop)
        gen = replace(engine.config.generation, stop=(stop, "\x00never"))
        naive = engine.generate_sync(q, gen=gen, speculate=False)
        spec = engine.generate_sync(q, gen=gen, spec=FORCED, speculate=True)
        assert naive.finish_reason == spec.finish_reason == "stop"
        assert naive.text == spec.text == full.text[:start]
        assert naive.token_ids == spec.token_ids == ids[: len(naive.token_ids)]
        k = len(naive.token_ids)
        assert stop in stable_text(tok, ids[:k]) and stop not in stable_text(tok, ids[: k - 1])
        assert naive.steps == spec.steps and naive.steps[-1].end == k
        # the loop stopped at the chunk that completed it: no more LM steps than that
        assert naive.stats["steps"] == (k + 1) // 2
        speculated += spec.stats["speculated"]
        rolled_back += spec.stats["rollbacks"]
    assert speculated > 0 and rolled_back > 0


def test_a_stop_string_absent_from_the_answer_changes_nothing(engines):
    engine = engines["exact"]
    q = QUESTIONS[0]
    plain = engine.generate_sync(q, speculate=False)
    gen = replace(engine.config.generation, stop=("\x00absent",))
    res = engine.generate_sync(q, gen=gen, spec=FORCED, speculate=True)
    assert res.token_ids == plain.token_ids and res.text == plain.text and res.finish_reason == plain.finish_reason


@pytest.mark.parametrize("model", ["smollm2", "tiny"])
def test_stop_watch_answers_as_the_full_check_under_growth_and_rollbacks(model, tiny_lm, request):
    """``StopWatch`` (what the loops ask after every chunk) decodes a window, not the whole
    answer: over answers that grow by chunks and are rolled back to random points and regrown
    with other tokens (as speculation does), with stop strings taken from the text (multi-byte
    characters, leading spaces, one-character and long ones), it answers exactly as
    ``find_stop`` over the whole decoded text."""
    import random

    from ralmspec.engine.stop import StopWatch

    tok = (request.getfixturevalue("smollm2_lm") if model == "smollm2" else tiny_lm).tokenizer
    base = tok.encode("Zürich – 東京 🎸🎸 naïve café. The end of the war came in 1945, " * 30)
    rng = random.Random(3)
    checked = hits = rollbacks = 0
    for trial in range(24):
        text = stable_text(tok, base[: rng.randrange(50, len(base))])
        n = rng.choice((1, 2, 4, 12, 30))
        at = rng.randrange(len(text) // 2, len(text) - n)
        stops = [text[at: at + n], "\u2603never"] if trial % 4 else ["\u2603never"]
        watch = StopWatch(tok, stops)
        ids: list[int] = []
        for _ in range(120):
            if ids and rng.random() < 0.2:  # a rollback of a few chunks, regrown with another token
                ids = ids[: max(0, len(ids) - rng.randrange(1, 12))] + [base[rng.randrange(len(base))]]
                rollbacks += 1
            else:
                ids = ids + base[len(ids): len(ids) + rng.randrange(1, 6)]
            want = find_stop(stable_text(tok, ids), stops) is not None
            assert watch.completed(ids) == want, (trial, stops, len(ids))
            checked += 1
            hits += want
            if want and rng.random() < 0.5:
                break
    assert hits > 10 and rollbacks > 10 and checked > 500, (hits, rollbacks, checked)
