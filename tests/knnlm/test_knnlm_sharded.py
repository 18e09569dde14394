"""Sharded kNN-LM datastores (ralmspec/knnlm/sharded.py): the shards answer as the whole datastore.

- split layout and typed errors for bad input;
- 2 and 3 in-process shards == the whole flat datastore on 240 queries and k in {1, 8, 32, 100}
  (ids, order, float64 distances), alone and in batches; ties broken by the lower id across shard
  edges (a datastore of repeated keys); per-entry lookups (keys, distances, values, doc_end,
  successors) equal;
- IVF shards (the whole index's quantizer, each entry in its list) == the whole IVF datastore on
  the test queries; HNSW shards == the exact merge of their own answers;
- 2 Ray shards: search == whole; naive and speculative kNN-LM generation token-identical to the
  whole datastore; a shard killed mid-search fails the search with RetrievalError (no partial
  answer), then Ray restarts it and the next search is right; the CLI over Ray shards.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ralmspec.errors import ConfigError, RetrievalError
from ralmspec.knnlm.cli import main
from ralmspec.knnlm.datastore import load_datastore, rank_entries
from ralmspec.knnlm.model import KNNLM, KNNLMConfig
from ralmspec.knnlm.sharded import (
    LocalDatastoreShards, ShardedDatastore, is_sharded_datastore, open_ray_sharded_datastore, open_sharded_datastore,
    shard_datastore,
)
from ralmspec.knnlm.speculative import SpeculativeKNNConfig, SpeculativeKNNLM
from ralmspec.cluster import RayShardConfig, ray_available
from ralmspec.retrieval.sharded import contiguous_ranges
from tests.identity import SpeculationCheck

needs_ray = pytest.mark.skipif(not ray_available(), reason='ray is not installed (pip install -e ".[ray]")')
KS = (1, 8, 32, 100)
N_PROMPTS = 6
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def whole(knn_datastores):
    return knn_datastores["flat"]


@pytest.fixture(scope="module")
def split(knn_datastores, tmp_path_factory):
    """(kind, shards) -> sharded datastore folder split from the session's datastores."""
    root = tmp_path_factory.mktemp("knnlm-sharded")
    out = {("flat", n): shard_datastore(knn_datastores["flat"].path, root / f"flat-{n}", n) for n in (2, 3)}
    for kind in ("ivf", "hnsw"):
        out[(kind, 2)] = shard_datastore(knn_datastores[kind].path, root / f"{kind}-2", 2)
    return out


@pytest.fixture(scope="module")
def queries(whole):
    """240 query vectors: stored keys (distance 0 to themselves), keys near the shard edges of 2
    and 3 shards, and noisy keys."""
    rng = np.random.default_rng(7)
    n = whole.n
    edges = [r.stop for s in (2, 3) for r in contiguous_ranges(n, s)[:-1]]
    ids = np.concatenate([rng.integers(0, n, 100), *[np.arange(e - 5, e + 5) for e in edges]])
    keys = whole.key_vectors(ids).astype(np.float32)
    noisy = keys[:100] + rng.normal(0.0, 0.5, keys[:100].shape).astype(np.float32)
    q = np.concatenate([keys, noisy])
    assert q.shape[0] >= 200
    return np.ascontiguousarray(q)


@pytest.fixture(scope="module")
def prompts(tiny_lm, knn_corpus):
    texts = [knn_corpus[i].text.split(". ")[0] for i in (0, 9, 21)] + \
            [knn_corpus[i].text.split(". ")[0] for i in (900, 2000, 3100)]
    return [tiny_lm.tokenizer.encode(t)[:24] for t in texts][:N_PROMPTS]


@pytest.fixture(scope="module")
def oracle(tiny_lm, whole, prompts):
    knn = KNNLM(tiny_lm, whole, KNNLMConfig(k=8, max_new_tokens=NEW_TOKENS))
    return [knn.generate(p).tokens for p in prompts]


def _assert_same_search(got: ShardedDatastore, want, qs: np.ndarray, ks=KS) -> None:
    for k in ks:
        gi, gd = got.search(qs, k)
        wi, wd = want.search(qs, k)
        assert gi.dtype == wi.dtype and gd.dtype == wd.dtype and gi.shape == wi.shape
        assert np.array_equal(gi, wi), k
        assert np.array_equal(gd, wd), k  # float64, bit for bit


# ------------------------------------------------------------------------ layout, errors


def test_split_layout(whole, split):
    for n in (2, 3):
        d = split[("flat", n)]
        assert is_sharded_datastore(d) and not is_sharded_datastore(whole.path)
        m = json.loads((d / "manifest.json").read_text())
        ranges = contiguous_ranges(whole.n, n)
        assert [(s["start"], s["stop"]) for s in m["shards"]] == [(r.start, r.stop) for r in ranges]
        assert m["count"] == whole.n and m["sharded_from"]["count"] == whole.n
        assert not (d / "keys.npy").exists(), "keys live in the shards only"
        for s, r in zip(m["shards"], ranges):
            shard = load_datastore(d / s["dir"])  # each shard is an ordinary datastore folder
            assert shard.n == r.size and shard.manifest["shard"]["start"] == r.start
            assert np.array_equal(np.asarray(shard.keys), np.asarray(whole.keys[r.start:r.stop]))
            assert np.array_equal(shard.values, whole.values[r.start:r.stop])


def test_bad_input_is_typed(whole, split, tmp_path):
    with pytest.raises(ConfigError, match="sharded kNN-LM datastore"):
        load_datastore(split[("flat", 2)])
    with pytest.raises(ConfigError, match="already sharded"):
        shard_datastore(split[("flat", 2)], tmp_path / "x", 2)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="positive integer"):
            shard_datastore(whole.path, tmp_path / "x", bad)
    with pytest.raises(ConfigError, match="non-empty shards"):
        shard_datastore(whole.path, tmp_path / "x", whole.n + 1)
    with pytest.raises(ConfigError, match="--shards 3 but the datastore"):
        open_sharded_datastore(split[("flat", 2)], shards=3)
    with pytest.raises(ConfigError, match="not a sharded datastore"):
        open_sharded_datastore(whole.path)
    with pytest.raises(ConfigError, match="invalid search parameters"):
        open_sharded_datastore(split[("flat", 2)], nprobe=0)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------ in-process shards


@pytest.mark.parametrize("shards", [2, 3])
def test_local_shards_equal_the_whole_datastore(shards, whole, split, queries):
    sharded = open_sharded_datastore(split[("flat", shards)])
    try:
        assert isinstance(sharded.backend, LocalDatastoreShards) and sharded.n_shards == shards
        _assert_same_search(sharded, whole, queries)
        wi, wd = whole.search(queries, 16)
        for r in range(0, queries.shape[0], 7):  # alone (FAISS path) == inside the batch (GEMM path)
            gi, gd = sharded.search(queries[r], 16)
            assert np.array_equal(gi[0], wi[r]) and np.array_equal(gd[0], wd[r])
        with pytest.raises(ConfigError):
            sharded.search(queries[:, :5], 4)
        with pytest.raises(ConfigError):
            sharded.search(queries, 0)
    finally:
        sharded.close()


def test_per_entry_lookups_equal(whole, split, queries):
    sharded = open_sharded_datastore(split[("flat", 3)])
    rng = np.random.default_rng(3)
    n = whole.n
    edges = [r.stop for r in contiguous_ranges(n, 3)[:-1]]
    ids = np.concatenate([rng.integers(0, n, 300), [0, n - 1], *[np.arange(e - 3, e + 3) for e in edges]])
    rng.shuffle(ids)
    assert np.array_equal(sharded.key_vectors(ids), whole.key_vectors(ids))
    for q in queries[::30]:
        assert np.array_equal(sharded.distances(q, ids), whole.distances(q, ids))
    assert np.array_equal(sharded.values[ids], whole.values[ids])
    assert int(sharded.values.max()) == int(whole.values.max())
    assert np.array_equal(sharded.doc_end(ids), whole.doc_end(ids))
    for m in (1, 10):
        assert np.array_equal(sharded.successors(ids, m), whole.successors(ids, m))
    assert sharded.key_vectors([]).shape == (0, whole.dim) and sharded.distances(queries[0], []).shape == (0,)
    with pytest.raises(ConfigError, match="entry ids"):
        sharded.key_vectors([n])
    d = sharded.describe()
    assert d["shards"] == 3 and d["entries"] == n and d["backend"] == "local"


def test_ties_break_by_the_lower_id_across_shards(whole, tmp_path):
    """300 entries = 50 distinct keys x 6 copies spread over the whole id range: every query has
    6 entries at distance 0 in different shards, which must come back in id order."""
    d = tmp_path / "ties"
    d.mkdir()
    rows = np.asarray(whole.keys[:50])
    keys = np.tile(rows, (6, 1))
    np.save(d / "keys.npy", keys)
    np.save(d / "values.npy", np.asarray(whole.values[:300]))
    np.save(d / "doc_offsets.npy", np.array([0, 120, 300], dtype=np.int64))
    m = dict(whole.manifest, count=300, documents=2)
    (d / "manifest.json").write_text(json.dumps(m))
    tied = load_datastore(d)
    qs = rows.astype(np.float32)
    for shards in (2, 3):
        sharded = open_sharded_datastore(shard_datastore(d, tmp_path / f"ties-{shards}", shards))
        _assert_same_search(sharded, tied, qs, ks=(1, 6, 7, 300, 400))
        ids, dist = sharded.search(qs, 6)
        assert np.all(dist == 0.0) and np.array_equal(ids, np.arange(50)[:, None] + 50 * np.arange(6)[None, :])
        assert sharded.search(qs, 400)[0].shape == (50, 300)  # k clamped to the entries


def test_ivf_and_hnsw_shards(knn_datastores, split, queries):
    ivf = open_sharded_datastore(split[("ivf", 2)])
    _assert_same_search(ivf, knn_datastores["ivf"], queries, ks=(1, 8, 32))
    hnsw = open_sharded_datastore(split[("hnsw", 2)])
    parts = [s.search(queries, 8) for s in hnsw.backend.shards]
    ids, dist = hnsw.search(queries, 8)
    for r in range(queries.shape[0]):  # the exact merge of the shards' own answers
        wi, wd = rank_entries(np.concatenate([p[0][r] for p in parts]), np.concatenate([p[1][r] for p in parts]), 8)
        assert np.array_equal(ids[r], wi) and np.array_equal(dist[r], wd)
    assert np.array_equal(dist[0], knn_datastores["flat"].distances(queries[0], ids[0]))


def test_a_failing_shard_fails_the_whole_search(split, queries):
    sharded = open_sharded_datastore(split[("flat", 2)])

    def boom(*_a, **_k):
        raise RetrievalError("kNN-LM datastore shard 1 is down")

    sharded.backend.shards[1].search = boom
    with pytest.raises(RetrievalError, match="shard 1"):
        sharded.search(queries[:4], 8)


# ------------------------------------------------------------------------ Ray shards


@needs_ray
def test_ray_shards_search_and_generate_like_the_whole_datastore(ray_cluster, tiny_lm, whole, split, queries,
                                                                  prompts, oracle):
    sharded = open_ray_sharded_datastore(split[("flat", 2)], RayShardConfig(), shards=2)
    try:
        assert sharded.describe()["backend"] == "ray"
        _assert_same_search(sharded, whole, queries, ks=(1, 16))
        ids = np.arange(whole.n)[::97]
        assert np.array_equal(sharded.key_vectors(ids), whole.key_vectors(ids))
        assert np.array_equal(sharded.distances(queries[3], ids), whole.distances(queries[3], ids))
        knn = KNNLM(tiny_lm, sharded, KNNLMConfig(k=8, max_new_tokens=NEW_TOKENS))
        assert [knn.generate(p).tokens for p in prompts] == oracle
        for cfg in (SpeculativeKNNConfig(os3=False, fixed_stride=3),
                    SpeculativeKNNConfig(async_verify=True, naive_fallback=False)):
            spec, check = SpeculativeKNNLM(knn, cfg), SpeculationCheck()
            for p, want in zip(prompts, oracle):
                r = spec.generate(p)
                check.same(r.tokens, want, r.stats, where=(p, cfg))
            check.ran(min_speculated=len(prompts))  # both configs force speculation
    finally:
        sharded.close()


@needs_ray
def test_ray_shard_killed_mid_search_fails_cleanly_then_recovers(ray_cluster, whole, split, queries, kill_during,
                                                                 when_sent):
    sharded = open_ray_sharded_datastore(split[("flat", 2)], RayShardConfig(emulated_latency_s=2.5))
    try:
        before = sharded.backend.pids()
        sent = when_sent(sharded.backend)  # the search's calls are sent to both shards
        # killed 0.4 s after the search was sent, while it is in flight on both shards (each sleeps 2.5 s first)
        out = kill_during(lambda: sharded.search(queries[:8], 8), before[1], after_s=0.4, sent=sent)
        assert "result" not in out, "a partial merge must never come back"
        assert isinstance(out["error"], RetrievalError) and "kNN-LM datastore shard 1" in str(out["error"])
        got = sharded.search(queries[:8], 8)  # waits for the restarted actor
        want = whole.search(queries[:8], 8)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        after = sharded.backend.pids()
        assert after[0] == before[0] and after[1] != before[1]
    finally:
        sharded.close()


@needs_ray
def test_cli_build_shards_and_generate_over_ray(ray_cluster, whole, tmp_path, capsys):
    out = tmp_path / "flat-2"
    assert main(["build", "--shards", "2", "--from-datastore", str(whole.path), "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == whole.n and len(info["shards"]) == 2
    prompt = "robert is an english film, television and theatre actor"
    args = ["generate", prompt, "--max-new-tokens", "6", "--json", "--k", "8"]
    assert main([*args, "--datastore", str(whole.path), "--no-speculate"]) == 0
    want = json.loads(capsys.readouterr().out)["tokens"]
    assert main([*args, "--datastore", str(out), "--no-speculate"]) == 0  # sharded, in this process
    assert json.loads(capsys.readouterr().out)["tokens"] == want
    assert main([*args, "--datastore", str(out), "--shards", "2", "--stride", "3"]) == 0  # Ray shards
    assert json.loads(capsys.readouterr().out)["tokens"] == want

    assert main([*args, "--datastore", str(out), "--shards", "3"]) == 2
    assert "--shards 3 but the datastore" in capsys.readouterr().err
    assert main([*args, "--datastore", str(out), "--shards", "0"]) == 2
    assert "(--shards) must be an integer >= 1" in capsys.readouterr().err
    assert main([*args, "--datastore", str(whole.path), "--shards", "2"]) == 2
    assert "not a sharded datastore" in capsys.readouterr().err
    assert main(["build", "--from-datastore", str(whole.path), "--out", str(tmp_path / "y")]) == 2
    assert "give --shards N" in capsys.readouterr().err
    assert main(["build", "--shards", "2", "--from-datastore", str(whole.path), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_build_with_shards(tmp_path, capsys):
    out = tmp_path / "built-3"
    assert main(["build", "--model", "tiny", "--out", str(out), "--max-tokens", "1500", "--window", "64",
                 "--context-stride", "48", "--quiet", "--shards", "3"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == 1500 and [s["stop"] for s in info["shards"]] == [500, 1000, 1500]
    assert is_sharded_datastore(out)
    assert [p.name for p in tmp_path.iterdir()] == ["built-3"], "the whole build was removed"
    shutil.rmtree(out)
