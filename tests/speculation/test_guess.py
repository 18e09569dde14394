"""The guess policy: what each guesser does on the critical path, and when refinement redoes a chunk."""

from __future__ import annotations

import pytest

from ralmspec.config import SpeculationConfig
from ralmspec.errors import ConfigError
import numpy as np

from ralmspec.speculation.guess import (GUESSERS, CacheBM25Ranker, GuessPlan, OracleRanker, StaticEmbeddingRanker,
                                        plan_guess, refined_doc)


def test_plans():
    assert plan_guess("exact", dense=True).rank_now
    last = plan_guess("last", dense=True)
    assert not last.rank_now and not last.rank_beside and last.encode_beside
    assert not plan_guess("last", dense=False).encode_beside  # BM25 has nothing to encode
    refine = plan_guess("refine", dense=False)
    assert refine.rank_beside and not refine.rank_now
    with pytest.raises(ValueError):
        plan_guess("psychic", dense=True)
    oracle = plan_guess("oracle", dense=True)  # a bound: cheap lookup, exact encoding beside
    assert oracle.cheap == "oracle" and oracle.encode_beside and not oracle.rank_now


@pytest.mark.parametrize("cheap,exact,verified,expected", [
    (3, 3, False, None),  # agree: keep the chunk
    (3, 7, False, 7),  # the exact cache guess differs: regenerate with it
    (3, 7, True, None),  # already verified (its passage is the truth): keep
    (3, None, False, None),  # no exact guess (empty cache / worker failed): keep
])
def test_refined_doc(cheap, exact, verified, expected):
    assert refined_doc(cheap, exact, verified) == expected


def test_config_validates_the_guesser():
    assert set(GUESSERS) == {"exact", "last", "refine", "static", "bm25"}
    with pytest.raises(ConfigError, match="guesser"):
        SpeculationConfig(guesser="psychic")


def test_oracle_ranker_answers_what_it_was_taught_whatever_the_cache():
    o = OracleRanker()
    assert o.top1("q", [1, 2]) is None  # unknown query: no guess
    o.learn("q", 7)
    assert o.top1("q", [1, 2]) == 7 and o.top1("q", []) == 7
    assert SpeculationConfig(guesser="oracle").guesser == "oracle"  # bench's bound, a valid config


def test_cheap_plans():
    static = plan_guess("static", dense=True)
    assert static.cheap == "static" and static.encode_beside and not static.rank_now
    assert plan_guess("bm25", dense=False) == GuessPlan(False, False, False, "bm25")
    with pytest.raises(ConfigError, match="dense"):
        plan_guess("static", dense=False)


def test_cache_bm25_ranker_prefers_matching_words_and_breaks_ties_by_id():
    texts = {3: "the river flows into the sea", 5: "a mountain of granite", 9: "the sea and the river delta"}
    r = CacheBM25Ranker(texts.__getitem__)
    assert r.top1("granite mountain", [3, 5, 9]) == 5
    assert r.top1("nothing in common", [9, 3]) == 3  # all zero: lower id
    assert r.top1("delta", [3, 5, 9]) == 9
    assert r.top1("x", []) is None


def test_static_ranker_is_cosine_of_mean_token_vectors():
    table = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    vocab = {"a": 0, "b": 1, "c": 2}
    texts = {1: "a a", 2: "b", 4: "c"}
    r = StaticEmbeddingRanker(lambda t: [vocab[w] for w in t.split()], table, texts.__getitem__)
    assert r.top1("a", [1, 2, 4]) == 1
    assert r.top1("b", [1, 2, 4]) == 2
    assert r.top1("a b", [1, 2, 4]) == 4
    assert r.top1("", [2, 1]) == 1  # zero vector: all tie, lower id


def test_static_ranker_on_the_real_encoder(encoder):
    tokenize, table = encoder.token_embeddings()
    assert table.shape[1] == 384 and table.dtype == np.float32 and tokenize("hello world")
    texts = {0: "The cat sat on the mat.", 1: "Stock markets fell sharply on Monday."}
    r = StaticEmbeddingRanker(tokenize, table, texts.__getitem__)
    assert r.top1("a cat on a mat", [0, 1]) == 0
    assert r.top1("markets and stocks", [0, 1]) == 1


def test_would_guess_is_each_guessers_own_guess_at_a_fallback_step():
    """A verified (fallback) step scores the guess the request's own guesser would have made
    (OS^3's acceptance for THAT guesser), given the exact cache top-1 its probe computed: `last`
    keeps the current passage, a cheap ranker ranks the cache (no answer: the current passage),
    `exact` is the probe, `refine` ends on the probe's answer when there is one."""
    from ralmspec.speculation.guess import CheapRankers, make_guesser

    class Cache:
        def doc_ids(self):
            return [3, 5, 8]

    class Kit:
        cache = Cache()

    class Retriever:
        corpus = {3: None, 5: None, 8: None}

    rankers = CheapRankers(Retriever())
    rankers.get("oracle").learn("q taught", 8)
    kit, last, exact = Kit(), 5, 3
    own = {g: make_guesser(g, dense=True, rankers=rankers).would_guess("q taught", last, exact, kit)
           for g in ("exact", "last", "refine", "oracle")}
    assert own == {"exact": 3, "last": 5, "refine": 3, "oracle": 8}
    assert make_guesser("oracle", dense=True, rankers=rankers).would_guess("q unknown", last, exact, kit) == last
    assert make_guesser("refine", dense=True, rankers=rankers).would_guess("q", last, None, kit) == last
