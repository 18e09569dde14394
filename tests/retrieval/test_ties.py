"""Tie-breaking: equal scores -> lower doc id first, for every kind; the candidate-boundary rule."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from ralmspec.data.corpus import Corpus, Passage
from ralmspec.retrieval.base import rank_hits
from ralmspec.retrieval.dense import DenseRetriever
from ralmspec.retrieval.index import build_index, load_retriever

from .conftest import KINDS, kb_config

A = "Du Fu was a prominent Chinese poet of the Tang dynasty."
B = "The European lobster is a species of clawed lobster from the eastern Atlantic Ocean."
C = "A hurricane struck the Treasure Coast of Florida in 1933."


@pytest.fixture(scope="module")
def tie_dirs(encoder, tmp_path_factory):
    """A corpus where A appears at doc ids 1, 3 and 6 and B at 0 and 5 (all exact duplicates)."""
    texts = [B, A, C, A, "Unrelated text about cricket in Australia.", B, A, "Battleships of the Royal Navy."]
    corpus = Corpus([Passage(i, "", t, f"p{i}") for i, t in enumerate(texts)])
    root = str(tmp_path_factory.mktemp("ties"))
    return {kind: build_index(corpus, kind, os.path.join(root, kind), kb_config(kind, ivf_nlist=2, ivf_nprobe=1),
                              encoder, show_progress=False) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_duplicates_tie_and_lower_doc_id_wins(kind, tie_dirs, encoder):
    r = load_retriever(tie_dirs[kind], kb_config(kind, ivf_nlist=2, ivf_nprobe=1), encoder)
    for query, dup_ids in ((A, [1, 3, 6]), (B, [0, 5])):
        hits = r.search_sync([query], len(dup_ids))[0]
        assert [h.doc_id for h in hits] == dup_ids
        assert len({h.score for h in hits}) == 1  # exact tie
        assert r.search_sync([query], 1)[0] == hits[:1]
        assert r.rank(query, list(reversed(dup_ids)) + [2], k=1)[0].doc_id == dup_ids[0]


def test_bm25_all_out_of_vocabulary_query_returns_lowest_doc_ids(kb_retrievers):
    r = kb_retrievers["bm25"]
    for q in ("zzqxv wqqj", "", "the of and is"):
        hits = r.search_sync([q], 5)[0]
        assert hits == [(i, 0.0) for i in range(5)]


def test_rescore_boundary_rule_finds_float64_top_k(encoder):
    """Near-ties that float32 FAISS orders wrongly are fixed by re-scoring + candidate widening.

    500 passage vectors are tiny perturbations of a real query vector (a few float32 ulps), so
    their float64 scores differ below float32 resolution: FAISS's float32 scores tie in large
    groups and its top-k *set* differs from the float64 top-k. With rescore_margin=0 only the
    widening rule can recover the float64 top-k.
    """
    query = "who wrote the poems of the Tang dynasty"
    q = encoder.encode_queries([query])[0]
    rng = np.random.default_rng(0)
    n = 500
    scale = 10.0 ** rng.uniform(-8.5, -7, size=(n, 1))
    vecs = (q[None, :] + scale * rng.standard_normal((n, q.size))).astype(np.float32)
    vecs[[10, 200, 480]] = vecs[7]  # exact duplicates too
    corpus = Corpus([Passage(i, "", f"p{i}") for i in range(n)])
    index = faiss.IndexFlatIP(q.size)
    index.add(vecs)
    r = DenseRetriever(corpus, vecs, index, "exact", encoder, kb_config("exact", rescore_margin=0))
    all_ids = list(range(n))
    truth = rank_hits(all_ids, r.score(query, all_ids), 50)
    for k in (3, 10):  # (k = 1 happens to come out right in float32 with faiss-cpu 1.15)
        faiss_ids = index.search(q[None, :], k)[1][0].tolist()
        assert set(faiss_ids) != {h.doc_id for h in truth[:k]}  # float32 really picks other passages
    for k in (1, 3, 10, 50):
        assert r.search_sync([query], k)[0] == truth[:k]


def test_an_ivf_index_over_duplicate_passages_has_no_empty_lists(encoder):
    """10 distinct passages, 5 copies each, 40 lists asked for: k-means split clusters of copies
    into lists no vector lands in, and queries whose best centroid was one of those found
    nothing (an empty top-1 from a healthy index: the engine failed on it). The build keeps only
    filled lists, so every probe finds passages, with nprobe 1 as with more."""
    rng = np.random.default_rng(3)
    distinct = rng.standard_normal((10, 32)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    vecs = np.ascontiguousarray(np.repeat(distinct, 5, axis=0))
    from ralmspec.retrieval.dense import build_faiss_index

    index, params = build_faiss_index("ivf", vecs, kb_config("ivf", ivf_nlist=40))
    sizes = [index.invlists.list_size(i) for i in range(index.nlist)]
    assert params["ivf_nlist"] == index.nlist <= 10 and min(sizes) > 0, sizes
    corpus = Corpus([Passage(i, "", f"p{i}") for i in range(len(vecs))])
    for nprobe in (1, 3):
        r = DenseRetriever(corpus, vecs, index, "ivf", None, kb_config("ivf", ivf_nprobe=nprobe))
        hits = r.search_vectors(distinct, 5)
        assert [sorted(h.doc_id for h in row) for row in hits] == [list(range(5 * i, 5 * i + 5)) for i in range(10)]


def ivf_lists(index) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, codes) of every inverted list of an IVF ``index``, in list order."""
    ivf = faiss.extract_index_ivf(index)
    out = []
    for i in range(ivf.nlist):
        size = ivf.invlists.list_size(i)
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(i), size).copy() if size else np.zeros(0, np.int64)
        codes = (faiss.rev_swig_ptr(ivf.invlists.get_codes(i), size * ivf.code_size).copy() if size
                 else np.zeros(0, np.uint8))
        out.append((ids, codes))
    return out


def assert_compacted(index, trained, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index`` holds ``trained``'s filled lists, in order, with the same ids and code bytes, and a
    search probing every list finds the same ids at the same distances; returns (distances, ids)."""
    kept = [lst for lst in ivf_lists(trained) if lst[0].size]
    now = ivf_lists(index)
    assert len(now) == len(kept)
    for i, (was, lst) in enumerate(zip(kept, now)):
        np.testing.assert_array_equal(lst[0], was[0], err_msg=f"ids of list {i}")
        np.testing.assert_array_equal(lst[1], was[1], err_msg=f"codes of list {i}")
    faiss.extract_index_ivf(index).nprobe = len(now)
    faiss.extract_index_ivf(trained).nprobe = faiss.extract_index_ivf(trained).nlist
    d, ids = index.search(queries, k)
    d0, ids0 = trained.search(queries, k)
    np.testing.assert_array_equal(ids, ids0)
    np.testing.assert_array_equal(d, d0)
    return d, ids


@pytest.fixture
def one_faiss_thread():
    """FAISS on one thread (this one), so that two k-means runs over the same points agree."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_an_ivf_build_drops_the_lists_kmeans_left_empty_and_keeps_every_other(one_faiss_thread):
    """64 distinct vectors, 3 copies each, 64 lists asked for: k-means leaves some lists empty
    (the old builds, redone with fewer lists up to 4 times, still kept 3 of 55). One k-means, then
    the empty lists are dropped: no list is empty, each kept list holds the same ids in the same
    order as in the trained index (the same centroids, in order), and a search probing every list
    finds what the trained index finds, which is the brute-force top-k."""
    from ralmspec.retrieval.dense import _ivf_ip, build_faiss_index, empty_ivf_lists

    rng = np.random.default_rng(1)
    distinct = rng.standard_normal((64, 16)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    x = np.ascontiguousarray(np.repeat(distinct, 3, axis=0))
    trained = _ivf_ip(faiss, x, 64)  # what the build trains (and fills) first
    assert empty_ivf_lists(trained) > 0  # the case
    filled = [i for i, (ids, _) in enumerate(ivf_lists(trained)) if ids.size]

    index, params = build_faiss_index("ivf", x, kb_config("ivf", ivf_nlist=64))
    assert empty_ivf_lists(index) == 0, f"{empty_ivf_lists(index)} empty lists of {index.nlist}"
    assert params["ivf_nlist"] == index.nlist == len(filled) and index.ntotal == len(x)
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT and index.is_trained
    np.testing.assert_array_equal(index.quantizer.reconstruct_n(0, index.nlist),
                                  trained.quantizer.reconstruct_n(0, trained.nlist)[filled])
    queries = (distinct + rng.normal(0, 0.05, distinct.shape)).astype(np.float32)
    k = 6  # two groups of 3 copies
    d, ids = assert_compacted(index, trained, queries, k)
    exact = queries.astype(np.float64) @ x.astype(np.float64).T
    truth = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    assert [set(r) for r in ids.tolist()] == [set(r) for r in truth.tolist()]
    np.testing.assert_allclose(d, np.take_along_axis(exact, truth, axis=1), rtol=1e-5, atol=1e-6)


def test_an_old_ivf_index_with_empty_lists_is_opened_with_a_warning(tie_dirs, encoder, tmp_path, caplog):
    """An index built before the empty-list fix keeps them (and a cached one is reused): opening
    it says so, with the command that rebuilds it; a healthy one opens silently."""
    import logging
    import shutil

    from ralmspec.retrieval.dense import empty_ivf_lists
    from ralmspec.retrieval.index import FAISS_FILE, read_vectors

    old = str(tmp_path / "old-ivf")
    shutil.copytree(tie_dirs["ivf"], old)
    x = np.ascontiguousarray(read_vectors(os.path.join(old, "embeddings.npy"), ""), dtype=np.float32)
    quantizer = faiss.IndexFlatIP(x.shape[1])
    quantizer.add(np.concatenate([x[:2], -x[:2]]))  # two centroids nothing is nearest to
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], 4, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    index.add(x)
    assert empty_ivf_lists(index) == 2
    faiss.write_index(index, os.path.join(old, FAISS_FILE))
    with caplog.at_level(logging.WARNING, logger="ralmspec.retrieval.index"):
        load_retriever(tie_dirs["ivf"], kb_config("ivf", ivf_nprobe=1), encoder)
        assert not caplog.records
        load_retriever(old, kb_config("ivf", ivf_nprobe=1), encoder)
    assert "has 2 empty lists of 4" in caplog.text and "ralmspec index build" in caplog.text


def test_a_faiss_index_of_another_structure_is_refused():
    """An exact manifest over an HNSW file opened and answered approximately, labelled exact."""
    from ralmspec.errors import ConfigError
    from ralmspec.retrieval.dense import build_faiss_index

    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    built = {kind: build_faiss_index(kind, x, kb_config(kind, ivf_nlist=4))[0] for kind in KINDS if kind != "bm25"}
    for kind, index in built.items():
        for other in built:
            if other == kind:
                DenseRetriever(None, x, index, other, None, kb_config(other))
            else:
                with pytest.raises(ConfigError, match=f"not an Index.*a {other} index"):
                    DenseRetriever(None, x, index, other, None, kb_config(other))
