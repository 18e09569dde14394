"""Datastore: corpus order, keys = LM hidden states, canonical batch-invariant search, round trip, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ralmspec.errors import ConfigError, IndexNotFoundError
from ralmspec.knnlm.datastore import (
    DatastoreBuildConfig,
    build_datastore,
    corpus_documents,
    load_datastore,
    rank_entries,
    squared_l2,
)

from tests.concurrent import raised, run_together
from tests.conftest import KNN_DATASTORE_TOKENS as DATASTORE_TOKENS


def _queries(ds, n, seed=0):
    """Realistic queries: stored keys plus noise (so neighbours are close and ties are rare)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(ds.n, size=n, replace=False)
    return (ds.key_vectors(ids) + rng.normal(0, 0.5, size=(n, ds.dim))).astype(np.float32)


def test_size_bound_and_manifest(knn_datastores):
    ds = knn_datastores["flat"]
    assert ds.n == DATASTORE_TOKENS
    m = ds.manifest
    assert m["count"] == DATASTORE_TOKENS and m["dim"] == 128 and m["key_layer"] == "lm_head_input"
    assert m["model"] == "tiny" and m["build"]["total_s"] > 0
    assert ds.keys.dtype == np.float16 and ds.values.dtype == np.int32
    assert ds.params.gemm_min_batch == 2  # batches take the GEMM candidate path by default


def test_entries_follow_corpus_order(knn_datastores, knn_corpus, tiny_lm):
    ds = knn_datastores["flat"]
    docs = corpus_documents(knn_corpus)
    offs = ds.doc_offsets
    for di in range(len(offs) - 1):
        ids = tiny_lm.tokenizer.encode(docs[di])
        n = offs[di + 1] - offs[di]
        # value of entry j = token j+1 of its document
        assert np.array_equal(ds.values[offs[di]:offs[di + 1]], np.asarray(ids[1:n + 1], dtype=np.int32))
    # successors never cross a document boundary
    last_of_doc0 = offs[1] - 1
    assert ds.successors([last_of_doc0], 10).size == 0
    assert ds.successors([0], 3).tolist() == [1, 2, 3]


def test_keys_are_lm_head_inputs(knn_datastores, knn_corpus, tiny_lm):
    """Keys at the start of a document equal the LM's final hidden state (input of lm_head)."""
    ds = knn_datastores["flat"]
    ids = tiny_lm.tokenizer.encode(corpus_documents(knn_corpus)[1])[:40]
    with torch.inference_mode():
        h = tiny_lm.model.transformer(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
    got = ds.key_vectors(np.arange(ds.doc_offsets[1], ds.doc_offsets[1] + 39))
    np.testing.assert_allclose(got, h[:39], rtol=2e-3, atol=2e-2)  # float16 storage


def test_squared_l2_is_per_row_canonical():
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(300, 64)).astype(np.float16)
    q = rng.normal(size=64).astype(np.float32)
    full = squared_l2(q, keys)
    sub = rng.permutation(300)[:41]
    assert np.array_equal(squared_l2(q, keys[sub]), full[sub])
    assert all(squared_l2(q, keys[i:i + 1])[0] == full[i] for i in sub[:10])
    ref = ((keys.astype(np.float64) - q.astype(np.float64)) ** 2).sum(1)
    np.testing.assert_allclose(full, ref, rtol=1e-12)


def test_rank_entries_tie_break():
    ids, d = rank_entries(np.array([9, 4, 7, 1]), np.array([2.0, 1.0, 1.0, 3.0]), 3)
    assert ids.tolist() == [4, 7, 9] and d.tolist() == [1.0, 1.0, 2.0]


def test_flat_search_is_exact_top_k(knn_datastores):
    """The flat search equals a brute-force float64 ranking over ALL entries, whether the
    candidates come from FAISS's per-query scan or from the batched GEMM path."""
    ds = knn_datastores["flat"]
    gemm = load_datastore(ds.path, gemm_min_batch=2)
    all_keys = ds.key_vectors(np.arange(ds.n))
    qs = _queries(ds, 6, seed=1)
    g_ids, g_d = gemm.search(qs, 10)
    for i, q in enumerate(qs):
        ids, d = ds.search(q, 10)
        ref_ids, ref_d = rank_entries(np.arange(ds.n), squared_l2(q, all_keys), 10)
        assert ids[0].tolist() == ref_ids.tolist() == g_ids[i].tolist()
        assert np.array_equal(d[0], ref_d) and np.array_equal(g_d[i], ref_d)
    # duplicate keys (exact ties): the tie-break by entry id decides, on both paths
    q = ds.key_vectors([123]).astype(np.float32)[0]
    both = np.stack([q, q])
    assert gemm.search(both, 4)[0].tolist() == [ds.search(q, 4)[0][0].tolist()] * 2


@pytest.mark.parametrize("kind", ["flat", "flat-faiss-only", "ivf", "hnsw"])
def test_search_batch_invariant_and_deterministic(knn_datastores, kind):
    """flat: batches use the GEMM candidate path, single queries FAISS; flat-faiss-only: FAISS
    chunks for every batch size. Every answer is the same whatever the batch."""
    if kind == "flat-faiss-only":
        ds = load_datastore(knn_datastores["flat"].path, gemm_min_batch=0)
    else:
        ds = knn_datastores[kind]
    qs = _queries(ds, 40, seed=2)
    whole_ids, whole_d = ds.search(qs, 8)
    again_ids, again_d = ds.search(qs, 8)
    assert np.array_equal(whole_ids, again_ids) and np.array_equal(whole_d, again_d)
    for bs in (1, 3, 17):
        for s in range(0, 40, bs):
            ids, d = ds.search(qs[s:s + bs], 8)
            assert np.array_equal(ids, whole_ids[s:s + bs]) and np.array_equal(d, whole_d[s:s + bs])
    # reported distances are the canonical ones, in canonical order
    for i in range(5):
        assert np.array_equal(whole_d[i], ds.distances(qs[i], whole_ids[i]))
        order = np.lexsort((whole_ids[i], whole_d[i]))
        assert order.tolist() == list(range(8))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_an_approximate_index_short_of_k_is_widened_per_query(knn_datastores, kind):
    """HNSW at efSearch 16 answered fewer than k=128 candidates for most queries (and IVF can,
    where its probed lists are small): that was an error mid-answer, in both decoding loops. The
    query that comes up short is searched again, alone, wider: k answers, the same in any batch."""
    ds = knn_datastores[kind]
    qs = _queries(ds, 24, seed=5)
    before = ds.widened_searches
    ids, d = ds.search(qs, 128)
    assert ids.shape == (24, 128) and (ids >= 0).all()
    if kind == "hnsw":
        assert ds.widened_searches > before  # the case does come up short at efSearch 16
    for s in range(0, 24, 5):
        part_ids, part_d = ds.search(qs[s:s + 5], 128)
        assert np.array_equal(part_ids, ids[s:s + 5]) and np.array_equal(part_d, d[s:s + 5])
    for i in range(3):
        assert np.array_equal(d[i], ds.distances(qs[i], ids[i]))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_concurrent_searches_from_a_fresh_load_answer_as_one_at_a_time(knn_datastores, kind):
    """Threads searching one freshly loaded datastore at once (the kNN-LM server's decoding
    threads) get the answers of searches one at a time, first use included: the flat GEMM path's
    keys are built on first use (once a race that gave a search half of them: a TypeError)."""
    whole = knn_datastores[kind]
    expected = [whole.search(_queries(whole, 8, seed=s), 8) for s in range(6)]
    for _attempt in range(3):
        fresh = load_datastore(whole.path)
        got = run_together(6, lambda i: fresh.search(_queries(whole, 8, seed=i), 8))
        assert not raised(got), raised(got)
        for (ids, d), (eids, ed) in zip(got, expected):
            np.testing.assert_array_equal(ids, eids)
            np.testing.assert_array_equal(d, ed)


def test_approximate_indexes_mostly_agree_with_exact(knn_datastores):
    qs = _queries(knn_datastores["flat"], 30, seed=4)
    exact = knn_datastores["flat"].search(qs, 8)[0]
    for kind in ("ivf", "hnsw"):
        approx = knn_datastores[kind].search(qs, 8)[0]
        recall = np.mean([len(set(a) & set(e)) / 8 for a, e in zip(approx, exact)])
        assert 0.3 < recall <= 1.0, (kind, recall)
        assert knn_datastores[kind].index_kind == kind


def test_save_load_round_trip(knn_datastores):
    ds = knn_datastores["flat"]
    again = load_datastore(ds.path)
    assert again.manifest == ds.manifest
    assert np.array_equal(np.asarray(again.keys), np.asarray(ds.keys))
    assert np.array_equal(again.values, ds.values) and np.array_equal(again.doc_offsets, ds.doc_offsets)
    qs = _queries(ds, 5, seed=5)
    for a, b in zip(ds.search(qs, 8), again.search(qs, 8)):
        assert np.array_equal(a, b)
    hn = load_datastore(knn_datastores["hnsw"].path, ef_search=64)
    assert hn.params.ef_search == 64 and hn.n == ds.n


def test_build_small_ivf_directly(tmp_path, tiny_lm):
    docs = ["the cat sat on the mat and then the dog came in", "a second document about kings and queens " * 5]
    ds = build_datastore(tiny_lm, docs, tmp_path / "d",
                         DatastoreBuildConfig(index="ivf", ivf_nlist=2, max_tokens=30, key_dtype="float32",
                                              window=8, stride=3), progress=False)
    n0 = len(tiny_lm.tokenizer.encode(docs[0])) - 1
    assert ds.n == 30 and ds.doc_offsets.tolist() == [0, n0, 30]
    assert ds.keys.dtype == np.float32 and (tmp_path / "d" / "index.faiss").is_file()
    ids, d = ds.search(ds.key_vectors([5]).astype(np.float32), 3)
    assert ids[0, 0] == 5 and d[0, 0] == 0.0


def test_an_ivf_datastore_over_repeated_contexts_has_no_empty_lists(tmp_path, tiny_lm):
    """More lists than distinct keys (a document repeated: 20 distinct contexts, 30 times each):
    k-means left 44 of 64 lists empty, the nearest centroid of most queries was an empty one and
    their searches were widened (566 widened searches for these 600 queries). The build drops the
    lists no key fills (``ivf_without_empty_lists``, as for passages)."""
    import faiss

    text = "the cat sat on the mat and then the dog came in and sat by the door of the old house"
    ds = build_datastore(tiny_lm, [text] * 30, tmp_path / "d",
                         DatastoreBuildConfig(index="ivf", ivf_nlist=64, ivf_nprobe=1, key_dtype="float32",
                                              window=64, stride=48), progress=False)
    keys = np.asarray(ds.keys)
    distinct = np.unique(keys, axis=0).shape[0]
    assert distinct < 64 and ds.n >= 30 * distinct  # the case: repeated contexts, more lists asked
    ivf = faiss.extract_index_ivf(ds.index)
    sizes = [ivf.invlists.list_size(i) for i in range(ivf.nlist)]
    assert ds.manifest["index"]["nlist"] == ivf.nlist <= distinct and min(sizes) > 0, sizes
    rng = np.random.default_rng(0)
    scale = float(np.linalg.norm(keys, axis=1).mean())
    qs = (keys + rng.normal(0, 0.05 * scale / np.sqrt(ds.dim), keys.shape)).astype(np.float32)
    assert (ds.index.search(qs, 8)[1][:, 0] >= 0).all()  # the probed list always has candidates
    ids, _ = ds.search(qs, 8)
    assert ids.shape == (ds.n, 8) and ds.widened_searches == 0


@pytest.mark.parametrize("pq_m", [0, 4])
def test_an_ivf_datastore_index_drops_the_lists_kmeans_left_empty_and_keeps_every_key(pq_m):
    """300 distinct keys, 3 copies each, 290 lists asked for (IVF-Flat and IVF-PQ): the old builds,
    redone with fewer lists up to 4 times, still kept 8 empty lists of 252. One k-means, then the
    empty lists are dropped: no list is empty, each kept list holds the same entries in the same
    order with byte-identical codes (IVF-PQ: the trained codebooks reused), and a search probing
    every list finds what the trained index finds (IVF-Flat: the brute-force top-k)."""
    import faiss

    from ralmspec.knnlm.datastore import make_faiss_index
    from ralmspec.retrieval.dense import empty_ivf_lists
    from tests.retrieval.test_ties import assert_compacted, ivf_lists

    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((300, 16)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    keys = np.ascontiguousarray(np.repeat(distinct, 3, axis=0))
    cfg = DatastoreBuildConfig(index="ivf", ivf_nlist=290, ivf_nprobe=4, pq_m=pq_m)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # two k-means runs over the same points agree
    try:
        quantizer = faiss.IndexFlatL2(16)  # what the build trains (on every key: 290 * 64 > 900) and fills first
        trained = faiss.IndexIVFPQ(quantizer, 16, 290, pq_m, 8) if pq_m else faiss.IndexIVFFlat(quantizer, 16, 290)
        trained.cp.seed = cfg.seed
        trained.train(keys)
        trained.add(keys)
        index, info = make_faiss_index("ivf", keys, cfg)
    finally:
        faiss.omp_set_num_threads(threads)
    assert empty_ivf_lists(trained) > 0  # the case
    kept = [lst for lst in ivf_lists(trained) if lst[0].size]

    ivf = faiss.extract_index_ivf(index)
    assert empty_ivf_lists(index) == 0, f"{empty_ivf_lists(index)} empty lists of {ivf.nlist}"
    assert info["nlist"] == ivf.nlist == len(kept) and info["train_points"] == len(keys) and info["pq_m"] == pq_m
    assert type(index) is type(trained) and index.metric_type == faiss.METRIC_L2 and index.is_trained
    assert ivf.nprobe == 4 and index.ntotal == len(keys)
    queries = (distinct + rng.normal(0, 0.05, distinct.shape)).astype(np.float32)
    k = 6  # two groups of 3 copies
    d, ids = assert_compacted(index, trained, queries, k)
    if not pq_m:
        exact = ((queries.astype(np.float64)[:, None, :] - keys.astype(np.float64)[None]) ** 2).sum(axis=2)
        truth = np.argsort(exact, axis=1, kind="stable")[:, :k]
        assert [set(r) for r in ids.tolist()] == [set(r) for r in truth.tolist()]
        np.testing.assert_allclose(d, np.take_along_axis(exact, truth, axis=1), rtol=1e-4, atol=1e-5)


def test_missing_and_broken_datastores(tmp_path, knn_datastores):
    with pytest.raises(IndexNotFoundError, match="not found"):
        load_datastore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match="incomplete"):
        load_datastore(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    src = knn_datastores["flat"].path
    for name in ("keys.npy", "values.npy", "doc_offsets.npy"):
        (bad / name).write_bytes((src / name).read_bytes())
    m = json.loads((src / "manifest.json").read_text())
    m["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="format version"):
        load_datastore(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError):
        load_datastore(bad)


def _corrupt_copy(src, dst, fault):
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    keys, values = np.load(dst / "keys.npy"), np.load(dst / "values.npy")
    {
        "keys-truncated": lambda: (dst / "keys.npy").write_bytes((src / "keys.npy").read_bytes()[:5000]),
        "keys-not-npy": lambda: (dst / "keys.npy").write_bytes(b"hello"),
        "keys-integers": lambda: np.save(dst / "keys.npy", keys.astype(np.int32)),
        "values-floats": lambda: np.save(dst / "values.npy", values.astype(np.float32)),
        "values-pickled": lambda: np.save(dst / "values.npy", np.array([object()] * len(values)), allow_pickle=True),
        "offsets-empty": lambda: np.save(dst / "doc_offsets.npy", np.zeros(0, dtype=np.int64)),
        "index-a-string": lambda: (dst / "manifest.json").write_text(json.dumps(dict(m, index="flat"))),
        "count-a-string": lambda: (dst / "manifest.json").write_text(json.dumps(dict(m, count=str(m["count"])))),
    }[fault]()
    return dst


@pytest.mark.parametrize("fault,match", [
    ("keys-truncated", "cannot read .*keys.npy"), ("keys-not-npy", "cannot read .*keys.npy"),
    ("keys-integers", "keys.npy' holds int32 entries, expected floats"),
    ("values-floats", "values.npy' holds float32 entries, expected integers"),
    ("values-pickled", "cannot read .*values.npy"), ("offsets-empty", "inconsistent"),
    ("index-a-string", "unknown index kind"), ("count-a-string", "inconsistent"),
])
def test_a_corrupt_datastore_is_a_config_error_naming_the_file(tmp_path, knn_datastores, fault, match):
    """Each was a bare numpy error, an AttributeError or a ValueError, or (floats as values)
    accepted."""
    bad = _corrupt_copy(knn_datastores["flat"].path, tmp_path / fault, fault)
    with pytest.raises(ConfigError, match=match):
        load_datastore(bad)


def test_bad_build_inputs(tmp_path, tiny_lm, knn_datastores):
    with pytest.raises(ConfigError):
        DatastoreBuildConfig(index="annoy")
    with pytest.raises(ConfigError):
        DatastoreBuildConfig(max_tokens=0)
    with pytest.raises(ConfigError):
        DatastoreBuildConfig(window=16, stride=32)
    with pytest.raises(ConfigError, match="no datastore entries"):
        build_datastore(tiny_lm, ["a"], tmp_path / "x", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        build_datastore(tiny_lm, ["some text here"], tmp_path / "full", progress=False)
    with pytest.raises(ConfigError, match="not a datastore"):
        build_datastore(tiny_lm, ["some text here"], tmp_path / "full", overwrite=True, progress=False)
    assert (tmp_path / "full" / "something.txt").read_text() == "keep me"
    ds = knn_datastores["flat"]
    with pytest.raises(ConfigError, match="shape"):
        ds.search(np.zeros((2, 7), dtype=np.float32), 4)
    with pytest.raises(ConfigError, match="NaN"):
        ds.search(np.full((1, ds.dim), np.nan, dtype=np.float32), 4)
    with pytest.raises(ConfigError, match="k must"):
        ds.search(np.zeros((1, ds.dim), dtype=np.float32), 0)


def test_reindex_prefix(tmp_path, knn_datastores):
    from ralmspec.knnlm.datastore import reindex_datastore

    src = knn_datastores["flat"]
    n = int(src.doc_offsets[1]) + 100  # cuts the second document
    sub = reindex_datastore(src.path, tmp_path / "p", DatastoreBuildConfig(index="flat", max_tokens=n))
    assert sub.n == n and sub.manifest["count"] == n
    assert np.array_equal(np.asarray(sub.keys), np.asarray(src.keys[:n]))
    assert np.array_equal(sub.values, src.values[:n])
    assert sub.doc_offsets.tolist() == [0, int(src.doc_offsets[1]), n]
    assert sub.successors([n - 1], 5).size == 0
