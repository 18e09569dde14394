"""kNN-LM: speculative == naive whatever the stride scheduler decides (docs/design.md §2
invariant 1): ``StrideScheduler.decide`` replaced by seeded draws (``tests/identity.py``
``AnyDecisions``), over every datastore index and the knobs that shape a round."""

from __future__ import annotations

import os
import random

import pytest

from ralmspec.knnlm.speculative import SpeculativeKNNConfig, SpeculativeKNNLM
from tests.identity import AnyDecisions, SpeculationCheck


# RALMSPEC_ANY_DECISIONS_SEEDS=1,2,3,... runs more draws (a soak); CI runs one
SEEDS = [int(x) for x in os.environ.get("RALMSPEC_ANY_DECISIONS_SEEDS", "12").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_knnlm_equals_naive_for_any_sequence_of_decisions(seed, monkeypatch, naive_results, knn_prompts):
    decisions = AnyDecisions(seed=seed).install(monkeypatch)
    rng, check = random.Random(seed - 6), SpeculationCheck()
    for kind, (knn, naive) in naive_results.items():
        for _ in range(3):
            cfg = SpeculativeKNNConfig(async_verify=rng.random() < 0.5, strict=rng.random() < 0.3,
                                       successors=rng.choice((1, 10)), cache_capacity=rng.choice((16, 2048)),
                                       self_feed=rng.random() < 0.7, probe_every=rng.choice((0, 1, 4)))
            spec = SpeculativeKNNLM(knn, cfg)
            for i in rng.sample(range(len(knn_prompts)), 3):
                r = spec.generate(knn_prompts[i])
                check.same(r.tokens, naive[i].tokens, r.stats, where=(kind, i, cfg))
    assert decisions.drawn > 50, decisions.drawn
    check.ran(min_speculated=10, min_rollbacks=1)
