"""Sampled generation through LM replicas on Ray: each prompt's sampling settings reach its
replica, so a mixed batch equals the in-process backend (same torch thread count)."""

from __future__ import annotations

import pytest

from ralmspec.lm.sampling import Sampling
from ralmspec.cluster import ray_available
from tests.lm.test_ray_replicas import REPLICA_THREADS, torch_threads

pytestmark = pytest.mark.skipif(not ray_available(), reason='ray is not installed (pip install -e ".[ray]")')


def test_replicas_pass_per_prompt_sampling(ray_cluster, tiny_lm):
    from ralmspec.lm.ray_replicas import RayLMConfig, RayLMReplicas

    prompts = [tiny_lm.tokenizer.encode(f"question number {i} about the roman empire") for i in range(6)]
    modes = [None if i % 3 == 0 else Sampling(0.8, (1.0, 0.9)[i % 2], 40 + i, i) for i in range(6)]
    with torch_threads(REPLICA_THREADS):
        want = tiny_lm.generate(prompts, 5, None, modes)
    lm = RayLMReplicas("tiny", config=RayLMConfig(replicas=2, threads=REPLICA_THREADS), cluster=ray_cluster)
    try:
        assert lm.supports_sampling
        assert lm.generate(prompts, 5, [f"s{i}" for i in range(6)], modes) == want
    finally:
        lm.close()
