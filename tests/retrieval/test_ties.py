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
