"""The lean speculation machinery: LM scores computed once per position, the cache's certified
prefilter, vectorised successor inserts, verification without re-deciding unchanged neighbours,
and (the invariant all of it must keep) speculative == naive over prompts, strides and async."""

from __future__ import annotations

import numpy as np
import pytest

from ralmspec.knnlm.model import (
    KNNLM,
    KNNLMConfig,
    LMScores,
    LMState,
    interpolate,
    knn_distribution,
    lm_distribution,
    next_token,
)
from ralmspec.knnlm.speculative import (
    NeighbourCache,
    SpeculativeKNNConfig,
    SpeculativeKNNLM,
)
from tests.identity import SpeculationCheck, forces_speculation

from .conftest import FALLBACK_WHY, check_fallback_sibling


def test_lm_scores_give_the_same_token_as_logits():
    rng = np.random.default_rng(3)
    for trial in range(300):
        vocab = int(rng.integers(2, 60))
        logits = (rng.normal(size=vocab) * rng.choice([0.5, 3.0, 20.0])).astype(np.float32)
        if trial % 4 == 0:
            logits = np.round(logits)  # ties
        k = int(rng.integers(1, 9))
        d = np.round(rng.uniform(0, 3, size=k), 1 if trial % 2 else 6)
        v = rng.integers(0, vocab, size=k)
        cfg = KNNLMConfig(lam=float(rng.choice([0.0, 0.25, 0.5, 1.0])), temperature=float(rng.choice([0.5, 1.0])))
        scores = LMScores.of(logits)
        full = interpolate(knn_distribution(d, v, vocab, cfg.temperature), lm_distribution(logits), cfg.lam)
        assert next_token(scores, d, v, cfg) == next_token(logits, d, v, cfg) == int(np.argmax(full)), trial
        z = logits.astype(np.float64)
        assert np.array_equal(scores.exp, np.exp(z - z.max()))  # the same bits as the one-shot formula
        assert scores.argmax == int(np.argmax(z)) and scores.total == float(np.exp(z - z.max()).sum())


def test_lm_state_scores_are_computed_once():
    st = LMState(hidden=np.zeros(4, dtype=np.float32), logits=np.arange(5, dtype=np.float32), seconds=0.0)
    assert st.scores is st.scores and st.scores.argmax == 4


def _reference_add_search_result(cache: NeighbourCache, ids: np.ndarray, m: int) -> None:
    """The original per-offset loop (priority: neighbours worst first, then offsets m..1)."""
    nb = np.asarray(ids, dtype=np.int64)[::-1]
    parts = [nb]
    end = cache.ds.doc_end(nb)
    for o in range(m, 0, -1):
        c = nb + o
        parts.append(c[c < end])
    cache.add(np.concatenate(parts))


def test_vectorised_successor_insert_keeps_the_priority_order(knn_datastores):
    ds = knn_datastores["flat"]
    rng = np.random.default_rng(5)
    ends = ds.doc_offsets[1:]
    for m in (0, 1, 3, 10):
        a, b = NeighbourCache(ds, 64), NeighbourCache(ds, 64)
        for _ in range(12):  # small capacity: evictions depend on the priority order
            ids = rng.choice(ds.n, size=8, replace=False)
            ids[0] = int(ends[0]) - 2  # near a document end
            a.add_search_result(ids, m)
            _reference_add_search_result(b, ids, m)
            n = len(a)
            assert np.array_equal(a._ids[:n], b._ids[:n]) and np.array_equal(a._stamp[:n], b._stamp[:n])
            assert a.evictions == b.evictions


def test_prefilter_certificate_is_exact_with_ties_and_no_margin(knn_datastores):
    ds = knn_datastores["flat"]
    rng = np.random.default_rng(9)
    ids = rng.choice(ds.n, size=400, replace=False)
    exact = NeighbourCache(ds, 512, prefilter=False)
    for margin in (0, 1, 32):
        fast = NeighbourCache(ds, 512, prefilter=True, prefilter_margin=margin)
        exact.add(ids)
        fast.add(ids)
        keys = ds.key_vectors(ids[:30]).astype(np.float32)
        queries = np.concatenate([keys[:10],  # distance 0 to a cached entry
                                  keys[10:20] + rng.normal(0, 1e-3, size=(10, ds.dim)).astype(np.float32),
                                  keys[20:] + rng.normal(0, 0.5, size=(10, ds.dim)).astype(np.float32)])
        for q in queries:
            for k in (1, 8):
                a_ids, a_d = exact.topk(q, k)
                b_ids, b_d = fast.topk(q, k)
                assert np.array_equal(a_ids, b_ids) and np.array_equal(a_d, b_d)
                all_d = ds.distances(q, ids)
                assert a_ids.tolist() == ids[np.lexsort((ids, all_d))[:k]].tolist()


def _count_decisions(monkeypatch) -> list[int]:
    calls = [0]
    original = KNNLM.decide

    def counting(self, lm, ids, dists):
        calls[0] += 1
        return original(self, lm, ids, dists)

    monkeypatch.setattr(KNNLM, "decide", counting)
    return calls


def test_unchanged_neighbours_are_not_decided_again(naive_results, knn_prompts, monkeypatch):
    """A verified step whose true neighbours are the speculated ones costs no second decision."""
    knn, naive = naive_results["flat"]
    calls = _count_decisions(monkeypatch)
    results = [SpeculativeKNNLM(knn, SpeculativeKNNConfig(os3=False, fixed_stride=4)).generate(p)
               for p in knn_prompts[:8]]
    check = SpeculationCheck()
    for r, a in zip(results, naive):
        check.same(r.tokens, a.tokens, r.stats)
    check.ran(min_speculated=len(results))
    speculated = sum(r.stats.speculated for r in results)
    assert calls[0] < 2 * speculated + sum(r.stats.verified_steps for r in results)  # some verifications
    # needed no decision ...
    assert calls[0] >= sum(len(r.tokens) for r in results)  # ... but every token was decided once


# Speculative == naive (docs/design.md §2 invariant 1) over a seeded sample of the knob space.
_RNG = np.random.default_rng(2024)
SWEEP = []
for _i in range(10):
    os3 = bool(_RNG.integers(0, 2))
    SWEEP.append(SpeculativeKNNConfig(
        os3=os3, fixed_stride=int(_RNG.choice([1, 2, 5, 16])), s_max=int(_RNG.choice([4, 16])),
        async_verify=bool(_i % 2), self_feed=bool(_RNG.integers(0, 2)), prefilter=bool(_RNG.integers(0, 2)),
        cache_capacity=int(_RNG.choice([2, 40, 2048])), successors=int(_RNG.choice([0, 3, 10])),
        gamma_max=float(_RNG.choice([0.5, 0.9, 0.98])), strict=bool(_i % 5 == 4)))


@pytest.mark.parametrize("i", range(len(SWEEP)), ids=[f"sweep-{i}" for i in range(len(SWEEP))])
def test_speculative_equals_naive_sweep(naive_results, knn_prompts, i):
    cfg = SWEEP[i]
    knn, naive = naive_results["flat"]
    spec = SpeculativeKNNLM(knn, cfg)
    picks = list(range(0, len(knn_prompts), 4))  # 8 prompts: in-datastore, elsewhere, questions
    check = SpeculationCheck()
    for j in picks:
        r = spec.generate(knn_prompts[j])
        check.same(r.tokens, naive[j].tokens, r.stats, where=(j, cfg))
    if forces_speculation(cfg):  # a fixed stride speculates in every request
        check.ran(min_speculated=len(picks))
    else:
        check.ran(min_speculated=0, why=FALLBACK_WHY)
        check_fallback_sibling(knn, cfg, [knn_prompts[j] for j in picks], [naive[j] for j in picks])
