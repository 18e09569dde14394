"""Invariant 1 for SAMPLED decoding: with the same seed, speculative output is token-identical to
the naive oracle, because every token's draw is keyed by (seed, its answer position) and a
rollback regenerates a position from the prompt the naive loop builds there.

A seeded grid over prompts, seeds, temperatures, top_p, strides, prefetch, cache capacity,
OS^3, async verification and guessers (exact and BM25 knowledge bases), then the same through
the multi-request scheduler with sampled and greedy requests batched together. The grid must
roll back, or it would prove nothing about replayed draws, and every setting that forces
speculation must speculate (tests/identity.py).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
from ralmspec.engine.core import RalmEngine
from ralmspec.errors import ConfigError
from tests.identity import SpeculationCheck, engine_trace, forces_speculation, naive_then_scheduled
from tests.lm.conftest import make_view

N_CASES = 16  # per knowledge base; each: one naive run and two speculative runs
TEMPERATURES = (0.3, 0.8, 1.0, 1.7)
TOP_P = (0.5, 0.9, 1.0)
STRIDES = (1, 2, 3, 4)
PREFETCH = (1, 20, 256)
CAPACITY = (2, 4, 16, 1024)
GUESSERS = ("exact", "last", "refine")  # valid on dense and sparse knowledge bases alike


@pytest.fixture(scope="module")
def questions():
    from ralmspec.data.loaders import default_questions

    return [q.question for q in default_questions()[200:200 + N_CASES]]


def case(rng: random.Random, i: int) -> tuple[GenerationConfig, list[SpeculationConfig]]:
    gen = GenerationConfig(stride=STRIDES[i % len(STRIDES)], query_len=8, max_new_tokens=12, passage_tokens=48,
                           temperature=TEMPERATURES[i % len(TEMPERATURES)], top_p=TOP_P[i % len(TOP_P)],
                           seed=rng.randrange(2 ** 63))
    specs = [SpeculationConfig(prefetch=rng.choice(PREFETCH), cache_capacity=rng.choice(CAPACITY),
                               os3=rng.random() < 0.5, async_verify=j == 0 or rng.random() < 0.5,
                               fixed_stride=rng.choice((1, 2, 3, 5)), max_inflight=rng.choice((1, 2, 3)),
                               guesser=GUESSERS[(2 * i + j) % len(GUESSERS)])
             for j in range(2)]
    return gen, specs


@pytest.mark.parametrize("kind, runner", [("exact", "eager"), ("bm25", "eager"), ("exact", "static, draws on the device")])
def test_sampled_speculative_identical_to_sampled_naive(kind, runner, small_indexes, tiny_lm, questions):
    """On the default (eager) runner, and on the static runner with its seeded draws on the
    device (CUDA's layout, forced here on the CPU): tokens fed back without a host read."""
    lm = tiny_lm
    if runner != "eager":
        lm = make_view(tiny_lm, runner="static")
        lm.runner.device_sampling = True
    engine = RalmEngine(lm, small_indexes[kind], EngineConfig())
    rng = random.Random(99)
    check = SpeculationCheck()
    seen = {"forced": 0, "async": set(), "differs_from_greedy": 0, "seed_matters": 0}

    async def go():
        for i, q in enumerate(questions):
            gen, specs = case(rng, i)
            naive = await engine.generate(q, gen=gen, speculate=False)
            assert len(naive.token_ids) == gen.max_new_tokens or naive.finish_reason == "eos"
            for spec in specs:
                res = await engine.generate(q, gen=gen, spec=spec, speculate=True)
                check.same(engine_trace(res), engine_trace(naive), res.stats, where=(kind, i, gen, spec))
                seen["forced"] += forces_speculation(spec)
                seen["async"].add(spec.async_verify)
            if i < 3:  # the seed and the temperature matter (else the sweep tests greedy only)
                greedy = await engine.generate(q, gen=replace(gen, temperature=0.0), speculate=False)
                other = await engine.generate(q, gen=replace(gen, seed=gen.seed + 1), speculate=False)
                seen["differs_from_greedy"] += greedy.token_ids != naive.token_ids
                seen["seed_matters"] += other.token_ids != naive.token_ids

    asyncio.run(go())
    # every fixed-stride run speculates; a rollback replays draws
    assert check.ran(min_speculated=seen["forced"], min_rollbacks=1).accepted > 0
    assert seen["async"] == {True, False}
    assert seen["differs_from_greedy"] >= 2 and seen["seed_matters"] >= 2, seen


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(i=st.integers(0, N_CASES - 1), seed=st.integers(0, 2 ** 63 - 1), temperature=st.floats(0.05, 2.0),
       top_p=st.floats(0.05, 1.0), stride=st.integers(1, 5), prefetch=st.sampled_from(PREFETCH),
       capacity=st.sampled_from(CAPACITY), os3=st.booleans(), async_verify=st.booleans(),
       naive_fallback=st.booleans())
def test_property_sampled_speculative_equals_naive(small_indexes, tiny_lm, questions, i, seed, temperature, top_p,
                                                   stride, prefetch, capacity, os3, async_verify, naive_fallback):
    """Every example whose settings force speculation (fixed stride, or OS^3 without its naive
    fallback) speculates at least one step; OS^3 with the fallback may take only verified steps
    on this cheap knowledge base, and then checks the fallback path."""
    engine = RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())
    gen = GenerationConfig(stride=stride, query_len=8, max_new_tokens=8, passage_tokens=48,
                           temperature=temperature, top_p=top_p, seed=seed)
    spec = SpeculationConfig(prefetch=prefetch, cache_capacity=capacity, os3=os3, async_verify=async_verify,
                             fixed_stride=2, naive_fallback=naive_fallback)

    async def go():
        return (await engine.generate(questions[i], gen=gen, speculate=False),
                await engine.generate(questions[i], gen=gen, spec=spec, speculate=True))

    naive, spec_res = asyncio.run(go())
    check = SpeculationCheck()
    check.same(engine_trace(spec_res), engine_trace(naive), spec_res.stats)
    if forces_speculation(spec):
        check.ran(min_speculated=1)
    else:
        check.ran(min_speculated=0, why="OS^3 with its naive fallback on the cheap small knowledge base")


def test_sampled_and_greedy_requests_batched_together_equal_the_oracle(small_indexes, tiny_lm, questions):
    """Through the scheduler: sampled and greedy requests in flight at once share backend calls,
    each with its own sampling settings, and each equals its naive run alone. Half of the
    speculative requests force speculation (a fixed stride) and must speculate; the others run
    OS^3 with its fallback, which on this cheap knowledge base may take only verified steps.
    (They were OS^3 without the fallback, which may choose synchronous one-step rounds: the naive
    loop, counted as speculation until the counters were corrected.)"""
    engine = RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())
    qs = questions[:8]
    gens = [GenerationConfig(stride=2, query_len=8, max_new_tokens=10, passage_tokens=48,
                             temperature=(0.0, 0.8, 1.2, 0.8)[i % 4], top_p=(1.0, 0.9)[i % 2], seed=1000 + i % 3)
            for i in range(len(qs))]
    specs = [SpeculationConfig(async_verify=bool(i % 2), prefetch=(1, 20)[i % 2], cache_capacity=4 + i,
                               os3=i % 4 >= 2, fixed_stride=2 + i % 2)
             for i in range(len(qs))]
    speculative = [i % 3 != 0 for i in range(len(qs))]

    oracle, got, stats = naive_then_scheduled(engine, list(zip(qs, gens, specs, speculative)))
    check = SpeculationCheck()
    for i, (a, b) in enumerate(zip(oracle, got)):
        check.same(engine_trace(b), engine_trace(a), b.stats, where=(i, gens[i]))
    check.ran(min_speculated=sum(s and forces_speculation(sp) for s, sp in zip(speculative, specs)))
    assert stats["lm_batch_sizes"]["max"] > 1, "no LM call mixed requests"


def test_sampled_request_without_seed_is_refused(small_indexes, tiny_lm, questions):
    engine = RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())
    with pytest.raises(ConfigError, match="needs a seed"):
        engine.generate_sync(questions[0], gen=GenerationConfig(temperature=0.5, max_new_tokens=4))
