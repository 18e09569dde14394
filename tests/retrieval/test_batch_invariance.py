"""Invariant 2: a query's top-k (ids, order, scores) is the same alone and inside any batch."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from .conftest import KINDS

K = 8


def _batches(queries: list[str], size: int, seed: int) -> list[list[str]]:
    """Shuffled batches of ``size`` mixed queries; with size > len(queries), repeats included."""
    rng = random.Random(seed)
    pool = list(queries) * (1 + size // len(queries))
    rng.shuffle(pool)
    if size >= len(queries):
        return [pool[:size]]
    return [pool[i:i + size] for i in range(0, len(queries), size)]


@pytest.mark.parametrize("kind", KINDS)
def test_same_answer_alone_and_in_batches_of_1_8_64(kind, kb_retrievers, kb_queries):
    r = kb_retrievers[kind]
    alone = {q: r.search_sync([q], K)[0] for q in kb_queries}
    for size in (1, 8, 64):
        for seed in (0, 1):
            for batch in _batches(kb_queries, size, seed):
                for q, hits in zip(batch, r.search_sync(batch, K)):
                    assert hits == alone[q], (kind, size, q)


@pytest.mark.parametrize("kind", KINDS)
async def test_concurrent_async_searches_agree(kind, kb_retrievers, kb_queries):
    """Many overlapping async searches (worker threads) give the same answers as sequential ones."""
    r = kb_retrievers[kind]
    expected = r.search_sync(kb_queries, K)
    chunks = [kb_queries[i::6] for i in range(6)]
    results = await asyncio.gather(*(r.search(c, K) for c in chunks))
    for i, (c, res) in enumerate(zip(chunks, results)):
        assert res == [expected[kb_queries.index(q)] for q in c], i


def test_query_encoding_is_batch_invariant_and_cache_transparent(encoder, kb_queries):
    """Fresh (uncached) encodings equal cached ones bit for bit, in any batch composition."""
    qs = kb_queries[:4]
    fresh = encoder.with_cache(0)
    a = fresh.encode_queries(qs)
    b = fresh.encode_queries(list(reversed(qs)))[::-1]
    c = encoder.encode_queries(qs)  # possibly cached from earlier tests
    assert a.dtype == np.float32 and a.shape == (4, 384)
    assert np.array_equal(a, b) and np.array_equal(a, c)
