"""Invariant 1: speculative output is token-identical to the naive oracle.

A seeded sweep: for every retriever kind, 52 real NQ questions, each with a stride from
{1, 2, 4, 8} and two speculation settings drawn from prefetch {1, 20, 256} x OS^3 on/off x
async on/off x cache capacity {2, 4, 16, 1024} (small ones force evictions). The sweep must also
exercise rollbacks, or it would prove nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
from ralmspec.engine.core import RalmEngine

N_PROMPTS = 52
STRIDES = (1, 2, 4, 8)
PREFETCH = (1, 20, 256)
CAPACITY = (2, 4, 16, 1024)


@pytest.fixture(scope="module")
def questions():
    from ralmspec.data.loaders import default_questions

    return [q.question for q in default_questions()[:N_PROMPTS]]


def spec_settings(rng: random.Random, i: int) -> list[SpeculationConfig]:
    grid = list(itertools.product(PREFETCH, (True, False), (True, False), CAPACITY))
    picks = [grid[(2 * i) % len(grid)], grid[(2 * i + 7) % len(grid)]]
    return [SpeculationConfig(prefetch=p, os3=o, async_verify=a, cache_capacity=c,
                              fixed_stride=rng.choice((1, 2, 3, 5)), max_inflight=rng.choice((1, 2, 3)))
            for p, o, a, c in picks]


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf", "bm25"])
def test_speculative_identical_to_naive_sweep(kind, small_indexes, tiny_lm, questions):
    engine = RalmEngine(tiny_lm, small_indexes[kind], EngineConfig())
    rng = random.Random(1234)
    seen = {"rollbacks": 0, "accepted": 0, "evictions": 0, "configs": set()}

    async def go():
        for i, q in enumerate(questions):
            gen = GenerationConfig(stride=STRIDES[i % 4], query_len=16, max_new_tokens=16, passage_tokens=64)
            naive = await engine.generate(q, gen=gen, speculate=False)
            for spec in spec_settings(rng, i):
                res = await engine.generate(q, gen=gen, spec=spec, speculate=True)
                assert res.token_ids == naive.token_ids, (kind, i, gen, spec)
                assert [(s.start, s.end, s.doc_id) for s in res.steps] == \
                       [(s.start, s.end, s.doc_id) for s in naive.steps], (kind, i, spec)
                seen["rollbacks"] += res.stats["rollbacks"]
                seen["accepted"] += res.stats["accepted"]
                seen["evictions"] += res.stats["cache_evictions"]
                seen["configs"].add((spec.prefetch, spec.os3, spec.async_verify, spec.cache_capacity))

    asyncio.run(go())
    assert seen["rollbacks"] > 0, "the sweep never rolled back: it does not test the rollback path"
    assert seen["accepted"] > 0
    assert seen["evictions"] > 0, "small caches should have evicted"
    assert {c[0] for c in seen["configs"]} == set(PREFETCH)
    assert {c[1] for c in seen["configs"]} == {True, False}
    assert {c[2] for c in seen["configs"]} == {True, False}


def test_concurrent_requests_identical_to_sequential_naive(small_indexes, tiny_lm, questions):
    """16 requests in flight at once on one engine == the oracle run one by one."""
    engine = RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())
    gen = GenerationConfig(stride=2, query_len=16, max_new_tokens=20, passage_tokens=64)
    qs = questions[:16]

    async def go():
        naive = [await engine.generate(q, gen=gen, speculate=False) for q in qs]
        specs = [SpeculationConfig(async_verify=bool(i % 2), cache_capacity=4 + i, prefetch=(1, 20)[i % 2])
                 for i in range(len(qs))]
        conc = await asyncio.gather(*(engine.generate(q, gen=gen, spec=s) for q, s in zip(qs, specs)))
        return naive, conc

    naive, conc = asyncio.run(go())
    for a, b in zip(naive, conc):
        assert a.token_ids == b.token_ids
