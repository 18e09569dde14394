"""The three candidate paths of an exact flat index propose the same float32 top-k, and the scan
times its two batch paths before keeping the faster."""

import faiss
import numpy as np
import pytest

from ralmspec.retrieval.dense import (BLOCK_ROWS, SCAN_PATHS, FlatScan, batch_class, blocked_top_ip, faster_path,
                                      flat_ip_view, gemm_top_ip)


@pytest.fixture(scope="module")
def flat_index():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5 * BLOCK_ROWS + 37, 48)).astype(np.float32)  # a ragged last block
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(48)
    index.add(x)
    return index


@pytest.mark.parametrize("nq", [2, 5, 8, 9, 30])
def test_blocked_gemm_and_faiss_agree(flat_index, nq):
    import torch

    rng = np.random.default_rng(nq)
    qs = rng.standard_normal((nq, 48)).astype(np.float32)
    kk = 40
    f_d, f_i = flat_index.search(qs, kk)
    b_d, b_i = blocked_top_ip(flat_ip_view(flat_index), qs, kk)
    g_d, g_i = gemm_top_ip(torch.from_numpy(flat_ip_view(flat_index)), qs, kk)
    scan = FlatScan(flat_index)
    s_d, s_i = scan.search(qs, kk)  # blocked (the first trial) ...
    t_d, t_i = scan.search(qs, kk)  # ... then gemm
    for d, i in ((b_d, b_i), (g_d, g_i), (s_d, s_i), (t_d, t_i)):
        assert i.shape == (nq, kk) and i.dtype == np.int64
        np.testing.assert_allclose(d, f_d, atol=1e-5)
        # same candidates (random data: no ties within float32 rounding)
        assert (np.sort(i, axis=1) == np.sort(f_i, axis=1)).all()


def test_blocked_clamps_k_to_the_index_size():
    x = np.eye(4, dtype=np.float32)
    d, i = blocked_top_ip(x, x[:2], 10)
    assert i.shape == (2, 4) and i[0, 0] == 0 and i[1, 0] == 1


def test_faster_path_tries_each_path_then_keeps_the_fastest():
    assert faster_path({}, trials=2) == "blocked"
    assert faster_path({"blocked": [0.3, 0.2]}, trials=2) == "gemm"
    assert faster_path({"blocked": [0.3, 0.2], "gemm": [0.1]}, trials=2) == "gemm"
    assert faster_path({"blocked": [0.3, 0.2], "gemm": [0.25, 0.4]}, trials=2) == "blocked"
    assert faster_path({"blocked": [0.1, 0.2], "gemm": [0.1, 0.3]}, trials=2) == "blocked"  # tie: first
    assert faster_path({}, trials=2, first="gemm") == "gemm"
    assert faster_path({"gemm": [0.3, 0.2]}, trials=2, first="gemm") == "blocked"
    assert [batch_class(b) for b in (2, 16, 17, 32, 33)] == [2, 16, 32, 32, 64]


def test_flat_scan_times_both_paths_per_batch_class(flat_index):
    scan = FlatScan(flat_index, trials=2)
    qs = np.random.default_rng(0).standard_normal((4, 48)).astype(np.float32)
    for _ in range(5):
        scan.search(qs, 10)
    scan.search(qs[:1], 10)  # one query: FAISS, not timed
    times = scan.timings()
    assert list(times) == [4] and set(times[4]) == set(SCAN_PATHS)
    assert scan.path_for(4) == min(times[4], key=times[4].get)
    assert scan.path_for(3) == "blocked"  # a class below every timed one: SCAN_PATHS order
    winner = scan.path_for(4)
    assert scan.path_for(5) == winner  # a larger class, not timed yet: the last winner first
    scan._seconds[4] = {"blocked": [0.1, 0.1], "gemm": [0.2, 0.2]}
    assert scan.path_for(8) == "blocked"
    scan._seconds[4] = {"blocked": [0.3, 0.3], "gemm": [0.2, 0.2]}
    assert scan.path_for(8) == "gemm"


def test_calibrate_times_both_paths_before_any_search(flat_index):
    """After ``calibrate`` the first search of a calibrated size takes the kept path: a caller
    pricing a batch size from its first searches does not see the dropped path's trials."""
    scan = FlatScan(flat_index, trials=2)
    scan.calibrate([2, 3, 20], kk=5)
    times = scan.timings()
    assert sorted(times) == [2, 3, 32] and all(set(t) == set(SCAN_PATHS) for t in times.values())
    kept = scan.path_for(3)
    assert kept == min(times[3], key=times[3].get)
    scan.search(np.random.default_rng(1).standard_normal((3, 48)).astype(np.float32), 5)
    assert scan.timings() == times and scan.path_for(3) == kept  # no further trial


def test_padded_shard_calibrates_its_pad_scan_and_answers_as_its_shard(flat_index):
    """A Ray shard's EMULATED pad (``PaddedShard``, built in each shard actor) times its scan paths
    before any search, as the in-process EMULATED knowledge base does; answers stay the shard's."""
    from ralmspec.config import RetrievalConfig
    from ralmspec.retrieval.emulated import CALIBRATED_BATCHES, PaddedShard, build_pad_index
    from ralmspec.retrieval.shard_index import DenseShard
    from ralmspec.retrieval.sharded import ShardRange

    vectors = flat_ip_view(flat_index)
    shard = DenseShard(ShardRange(0, len(vectors)), vectors, flat_index, "exact", RetrievalConfig(kind="exact"))
    padded = PaddedShard(shard, build_pad_index(3000, 48, seed=1), margin=4)
    padded.calibrate()
    times = padded._scan.timings()
    assert sorted(times) == sorted({batch_class(b) for b in CALIBRATED_BATCHES})
    assert all(set(t) == set(SCAN_PATHS) for t in times.values())
    qs = np.random.default_rng(2).standard_normal((3, 48)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    assert padded.search(qs, 5) == shard.search(qs, 5)
