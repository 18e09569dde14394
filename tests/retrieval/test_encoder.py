"""The real MiniLM query encoder: shape, normalisation, bounded LRU cache, thread safety."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ralmspec.errors import ConfigError


def test_vectors_are_unit_norm_float32_384(encoder):
    v = encoder.encode_queries(["what is the capital of France", "Du Fu"])
    assert v.dtype == np.float32 and v.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert not np.array_equal(v[0], v[1])
    assert encoder.encode_queries([]).shape == (0, 384)


def test_lru_cache_is_bounded_and_counts_hits(encoder):
    e = encoder.with_cache(2)
    e.encode_queries(["a cat", "a dog"])
    e.encode_queries(["a cat"])  # hit; "a dog" is now least recent
    e.encode_queries(["a bird"])  # evicts "a dog"
    info = e.cache_info()
    assert info["size"] == 2 and info["capacity"] == 2
    assert info["hits"] == 1 and info["misses"] == 3
    e.encode_queries(["a dog"])
    assert e.cache_info()["misses"] == 4


def test_thread_safe_and_deterministic(encoder):
    qs = [f"question number {i} about history" for i in range(6)]
    e = encoder.with_cache(3)  # small cache: threads race on insert/evict
    ref = encoder.with_cache(0).encode_queries(qs)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: e.encode_queries(qs[i % 2::2]), range(8)))
    for i, out in enumerate(outs):
        assert np.array_equal(out, ref[i % 2::2])


def test_corpus_encoding_gives_duplicates_identical_vectors(encoder):
    texts = ["Tang dynasty poet", "European lobster", "Tang dynasty poet"]
    v = encoder.encode_corpus(texts, batch_size=2)
    assert v.shape == (3, 384) and np.array_equal(v[0], v[2])
    with pytest.raises(ConfigError):
        encoder.encode_corpus(texts, batch_size=0)
    with pytest.raises(ConfigError):
        encoder.encode_queries([3])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="query 1 is not valid Unicode"):
        encoder.encode_queries(["fine", "caf\udce9"])


def test_the_encoder_leaves_the_host_hub_settings_alone():
    """Making a QueryEncoder in a host program neither sets HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE
    in os.environ (process-wide, inherited by children) nor contacts the hub: the
    sentence-transformer is read from its local folder with local_files_only (network blocked
    here)."""
    from tests.host_process import run_as_host

    out = run_as_host("""
        from ralmspec.retrieval.encoder import QueryEncoder
        assert QueryEncoder().encode_queries(["a query"]).shape == (1, 384)
    """)
    assert out == {"env": {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None}, "network": [],
                   "hub_offline": False}
