"""The three candidate paths of an exact flat index propose the same float32 top-k."""

import faiss
import numpy as np
import pytest

from ralmspec.retrieval.dense import BLOCK_ROWS, BLOCKED_MAX_BATCH, FlatScan, blocked_top_ip, flat_ip_view, gemm_top_ip


@pytest.fixture(scope="module")
def flat_index():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5 * BLOCK_ROWS + 37, 48)).astype(np.float32)  # a ragged last block
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(48)
    index.add(x)
    return index


@pytest.mark.parametrize("nq", [2, 5, BLOCKED_MAX_BATCH, BLOCKED_MAX_BATCH + 1, 30])
def test_blocked_gemm_and_faiss_agree(flat_index, nq):
    import torch

    rng = np.random.default_rng(nq)
    qs = rng.standard_normal((nq, 48)).astype(np.float32)
    kk = 40
    f_d, f_i = flat_index.search(qs, kk)
    b_d, b_i = blocked_top_ip(flat_ip_view(flat_index), qs, kk)
    g_d, g_i = gemm_top_ip(torch.from_numpy(flat_ip_view(flat_index)), qs, kk)
    s_d, s_i = FlatScan(flat_index).search(qs, kk)
    for d, i in ((b_d, b_i), (g_d, g_i), (s_d, s_i)):
        assert i.shape == (nq, kk) and i.dtype == np.int64
        np.testing.assert_allclose(d, f_d, atol=1e-5)
        # same candidates (random data: no ties within float32 rounding)
        assert (np.sort(i, axis=1) == np.sort(f_i, axis=1)).all()


def test_blocked_clamps_k_to_the_index_size():
    x = np.eye(4, dtype=np.float32)
    d, i = blocked_top_ip(x, x[:2], 10)
    assert i.shape == (2, 4) and i[0, 0] == 0 and i[1, 0] == 1
