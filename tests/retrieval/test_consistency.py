"""search == score, bit for bit, for every retriever kind (the speculation cache relies on it)."""

from __future__ import annotations

import numpy as np
import pytest

from ralmspec.retrieval.base import rank_hits

from .conftest import KINDS, N_PASSAGES

K = 10


@pytest.mark.parametrize("kind", KINDS)
def test_score_of_search_hits_equals_hit_scores(kind, kb_retrievers, kb_queries):
    r = kb_retrievers[kind]
    for q, hits in zip(kb_queries, r.search_sync(kb_queries, K)):
        assert len(hits) == K
        ids = [h.doc_id for h in hits]
        assert len(set(ids)) == K
        assert r.score(q, ids) == [h.score for h in hits]  # exact equality, not approx
        # rank() over the hit ids (in any order) reproduces the search order
        shuffled = list(reversed(ids))
        assert r.rank(q, shuffled, k=K) == hits
        # canonical order: score descending, then doc id ascending
        assert hits == sorted(hits, key=lambda h: (-h.score, h.doc_id))


@pytest.mark.parametrize("kind", KINDS)
def test_top1_does_not_depend_on_k(kind, kb_retrievers, kb_queries):
    r = kb_retrievers[kind]
    top1 = r.search_sync(kb_queries, 1)
    top20 = r.search_sync(kb_queries, 20)
    for a, b in zip(top1, top20):
        assert a == b[:1]


@pytest.mark.parametrize("kind", ["exact", "bm25"])
def test_exact_kinds_equal_brute_force_over_the_whole_corpus(kind, kb_retrievers, kb_queries):
    """Flat and BM25 return the true top-k of the canonical metric over all passages."""
    r = kb_retrievers[kind]
    all_ids = list(range(N_PASSAGES))
    for q, hits in zip(kb_queries, r.search_sync(kb_queries, K)):
        assert hits == rank_hits(all_ids, r.score(q, all_ids), K)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_are_close_to_exact(kind, kb_retrievers, kb_queries):
    """Sanity: ANN top-1 agrees with exact search for most queries (real FAISS, not a copy)."""
    exact = kb_retrievers["exact"].search_sync(kb_queries, 1)
    approx = kb_retrievers[kind].search_sync(kb_queries, 1)
    agree = sum(a == b for a, b in zip(exact, approx))
    assert agree >= 0.6 * len(kb_queries)


def test_dense_score_is_float64_inner_product_of_stored_vectors(kb_retrievers, kb_queries, encoder):
    r = kb_retrievers["exact"]
    vecs = np.load(f"{r.index_dir}/embeddings.npy")
    assert vecs.dtype == np.float32 and vecs.shape == (N_PASSAGES, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    for q in kb_queries[:8]:
        qv = encoder.encode_queries([q])[0].astype(np.float64)
        ref = vecs.astype(np.float64) @ qv
        np.testing.assert_allclose(r.score(q, range(N_PASSAGES)), ref, rtol=0, atol=1e-12)


def test_bm25_scores_match_bm25s_reference(kb_retrievers, kb_queries):
    """Our float64 sums equal bm25s's own float32 scores up to float32 rounding."""
    import bm25s

    from ralmspec.retrieval.sparse import tokenize

    r = kb_retrievers["bm25"]
    ref = bm25s.BM25.load(f"{r.index_dir}/bm25")
    for q in kb_queries:
        toks = tokenize([q])[0]
        toks = [t for t in toks if t in ref.vocab_dict]
        expected = ref.get_scores(toks) if toks else np.zeros(N_PASSAGES)
        np.testing.assert_allclose(r.score(q, range(N_PASSAGES)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_arguments_raise_typed_errors(kind, kb_retrievers):
    from ralmspec.errors import ConfigError

    r = kb_retrievers[kind]
    with pytest.raises(ConfigError):
        r.search_sync(["q"], 0)
    with pytest.raises(ConfigError):
        r.score("q", [N_PASSAGES])
    with pytest.raises(ConfigError):
        r.score("q", [-1])
    assert r.search_sync([], 3) == []
    assert r.score("q", []) == []
    everything = r.search_sync(["q"], N_PASSAGES + 50)[0]  # k is capped at N
    if kind in ("exact", "bm25"):
        assert sorted(h.doc_id for h in everything) == list(range(N_PASSAGES))
    else:  # ANN: only what the graph walk / the probed lists reach
        assert 0 < len(everything) <= N_PASSAGES
