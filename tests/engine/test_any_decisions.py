"""RaLM: speculative == naive whatever the stride scheduler decides (docs/design.md §2 invariant 1).

``StrideScheduler.decide`` is replaced by seeded draws (``tests/identity.py`` ``AnyDecisions``:
strides 0-9, a verified step included, overlap where allowed), and every retriever, on the eager
and the static runner, greedy and seeded sampling, one at a time and concurrently, must still
return the naive loop's tokens and passages, with speculation and rollbacks counted.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
from ralmspec.data.loaders import default_questions
from ralmspec.engine.core import RalmEngine
from tests.engine.test_equivalence import guessers_for
from tests.engine.test_identity_edges import outcome
from tests.identity import AnyDecisions, SpeculationCheck


def request(rng: random.Random, kind: str) -> tuple[GenerationConfig, SpeculationConfig]:
    sampled = rng.random() < 0.3
    gen = GenerationConfig(stride=rng.choice((1, 2, 3, 4)), query_len=rng.choice((4, 8, 16)),
                           max_new_tokens=rng.choice((9, 16, 24)), passage_tokens=rng.choice((16, 64)),
                           **(dict(temperature=1.0, top_p=0.9, seed=rng.randrange(100)) if sampled else {}))
    spec = SpeculationConfig(async_verify=rng.random() < 0.6, prefetch=rng.choice((1, 4, 20)),
                             cache_capacity=rng.choice((1, 4, 1024)), max_inflight=rng.choice((1, 2, 4)),
                             guesser=rng.choice(guessers_for(kind)))
    return gen, spec


# RALMSPEC_ANY_DECISIONS_SEEDS=1,2,3,... runs more draws (a soak); CI runs one
SEEDS = [int(x) for x in os.environ.get("RALMSPEC_ANY_DECISIONS_SEEDS", "11").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_ralm_equals_naive_for_any_sequence_of_decisions(seed, monkeypatch, tiny_lm, small_indexes):
    decisions = AnyDecisions(seed=seed).install(monkeypatch)
    questions = [q.question for q in default_questions()[200:240]]
    lms = {"eager": tiny_lm, "static": tiny_lm.view(runner="static")}
    rng, check, n = random.Random(seed - 6), SpeculationCheck(), 0
    for kind, index in small_indexes.items():
        for runner, lm in lms.items():
            engine = RalmEngine(lm, index, EngineConfig())
            reqs = [(questions[(4 * n + j) % len(questions)], *request(rng, kind)) for j in range(4)]
            n += 1

            async def go():
                naive = [await engine.generate(q, gen=g, speculate=False) for q, g, _ in reqs]
                alone = [await engine.generate(q, gen=g, spec=s) for q, g, s in reqs[:2]]
                together = await asyncio.gather(*(engine.generate(q, gen=g, spec=s) for q, g, s in reqs))
                return naive, alone + list(together)

            naive, spec = asyncio.run(go())
            for i, (a, b) in enumerate(zip(naive[:2] + naive, spec)):
                check.same(outcome(b), outcome(a), b.stats, where=(kind, runner, i, reqs[(i - 2) % 4][1:]))
    assert decisions.drawn > 100, decisions.drawn
    check.ran(min_speculated=2 * n, min_rollbacks=2)
