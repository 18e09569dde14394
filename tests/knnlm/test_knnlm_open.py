"""``knnlm.open.open_datastore``: one opener for whole, in-process sharded and Ray-sharded kNN-LM
datastores (real datastores of the session), and its typed errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ralmspec.cluster import RayShardConfig, ray_available
from ralmspec.errors import ConfigError, IndexNotFoundError
from ralmspec.knnlm.datastore import Datastore, load_datastore
from ralmspec.knnlm.open import open_datastore
from ralmspec.knnlm.sharded import ShardedDatastore, shard_datastore


@pytest.fixture(scope="module")
def flat2(knn_datastores, tmp_path_factory):
    return shard_datastore(knn_datastores["flat"].path, tmp_path_factory.mktemp("open-knn") / "flat-2", 2)


@pytest.fixture(scope="module")
def queries(knn_datastores):
    whole = knn_datastores["flat"]
    ids = np.random.default_rng(3).integers(0, whole.n, 40)
    return np.ascontiguousarray(whole.key_vectors(ids).astype(np.float32) + 0.25)


def test_the_manifest_decides_whole_or_sharded(knn_datastores, flat2, queries):
    whole = open_datastore(knn_datastores["flat"].path)
    sharded = open_datastore(flat2)
    try:
        assert isinstance(whole, Datastore) and isinstance(sharded, ShardedDatastore) and sharded.n_shards == 2
        assert sharded.describe()["backend"] == "local"
        for k in (1, 16):
            wi, wd = whole.search(queries, k)
            si, sd = sharded.search(queries, k)
            assert np.array_equal(si, wi) and np.array_equal(sd, wd)  # float64 distances, bit for bit
        assert open_datastore(flat2, shards=2).n_shards == 2
    finally:
        sharded.close()
    # search parameters reach whichever kind it is
    assert open_datastore(knn_datastores["hnsw"].path, ef_search=80).params.ef_search == 80
    assert open_datastore(flat2, gemm_min_batch=0).params.gemm_min_batch == 0


def test_bad_folders_and_requests_are_typed_errors(knn_datastores, flat2, tmp_path):
    with pytest.raises(IndexNotFoundError, match="not found; build one with"):
        open_datastore(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="--shards 3 but the datastore"):
        open_datastore(flat2, shards=3)
    with pytest.raises(ConfigError, match="not a sharded datastore"):
        open_datastore(knn_datastores["flat"].path, shards=2)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=r"\(--shards\) must be an integer >= 1"):
            open_datastore(flat2, shards=bad)
    with pytest.raises(ConfigError, match="invalid search parameters"):
        open_datastore(flat2, nprobe=0)
    with pytest.raises(ConfigError, match="open it with ralmspec.knnlm.open.open_datastore"):
        load_datastore(flat2)  # the whole-datastore loader refuses a sharded folder
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "manifest.json").write_text("{not json")
    with pytest.raises(IndexNotFoundError, match="incomplete"):
        open_datastore(garbled)
    bad_shards = tmp_path / "bad-shards"
    bad_shards.mkdir()
    m = json.loads((flat2 / "manifest.json").read_text())
    (bad_shards / "manifest.json").write_text(json.dumps(dict(m, shards=[{"dir": "x", "start": "a"}])))
    with pytest.raises(ConfigError, match="shard list .* is invalid"):
        open_datastore(bad_shards)


@pytest.mark.skipif(not ray_available(), reason='ray is not installed (pip install -e ".[ray]")')
def test_ray_shards_answer_as_the_whole_datastore(ray_cluster, knn_datastores, flat2, queries):
    sharded = open_datastore(flat2, ray=RayShardConfig(), shards=2)
    try:
        assert sharded.describe()["backend"] == "ray" and sharded.n_shards == 2
        wi, wd = knn_datastores["flat"].search(queries, 8)
        si, sd = sharded.search(queries, 8)
        assert np.array_equal(si, wi) and np.array_equal(sd, wd)
    finally:
        sharded.close()


def test_warming_builds_what_the_first_searches_would(knn_datastores, flat2):
    """``warm_datastore``: a freshly loaded flat datastore has its GEMM keys and key norms built
    (the first verification no longer pays them); it works on every kind, sharded too."""
    from ralmspec.knnlm.open import warm_datastore

    fresh = load_datastore(knn_datastores["flat"].path)
    assert fresh._gemm_keys is None and fresh._max_norm2 is None
    assert warm_datastore(fresh, 8) > 0
    assert fresh._gemm_keys is not None and fresh._max_norm2 is not None
    for ds in (open_datastore(knn_datastores["hnsw"].path), open_datastore(flat2)):
        assert warm_datastore(ds, 8) > 0
