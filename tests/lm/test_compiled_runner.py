"""The compiled runner (``--lm-runner compiled``): the static runner with its 1-row decode step
``torch.compile``d (ralmspec/lm/static.py, docs/lm-runner.md).

Fused kernels may round differently from the uncompiled step, so the contract is the LM
contract on this runner itself: tokens a function of the prompt (rollbacks, reuse, seeded
sampling), logprobs replaying decoding's logits, speculative == naive with speculation and
rollbacks asserted; on the tiny model it also gives the static runner's tokens. A compiler that
fails is a ``ConfigError`` when the runner is made, not an error inside a request.
"""

from __future__ import annotations

import random

import pytest
import torch

from ralmspec.errors import ConfigError
from ralmspec.lm.sampling import Sampling
from ralmspec.lm.static import StaticRunner
from tests.lm.conftest import make_view, random_tokens, speculative_equals_naive


@pytest.fixture(scope="module")
def compiled(tiny_lm):
    return make_view(tiny_lm, block_size=16, runner="compiled")


def test_compiled_equals_static_with_rollbacks_reuse_and_spans(compiled, tiny_lm):
    """An engine-like session over prompts of 20-200 tokens (attention spans 64, 128, 256),
    rolled back and with its passage swapped: the compiled runner's tokens == the static
    runner's, and a call repeated on the reused slot gives the same tokens."""
    static = make_view(tiny_lm, block_size=16, runner="static")
    assert compiled.runner.name == "compiled"
    rng = random.Random(17)
    reused = 0
    for trial in range(3):
        passage, answer = random_tokens(rng, rng.randrange(20, 150)), []
        for step in range(8):
            if answer and rng.random() < 0.3:
                answer = answer[:rng.randrange(len(answer))]
            if rng.random() < 0.15:
                passage = random_tokens(rng, rng.randrange(20, 150))
            prompt = passage + answer
            n = rng.choice((1, 3, 6))
            got = compiled.greedy([prompt], n, [f"c{trial}"])[0]
            assert got == static.greedy([prompt], n, [f"s{trial}"])[0], (trial, step, len(prompt))
            reused += compiled.last_call_stats.reused_tokens
            assert compiled.greedy([prompt], n, [f"c{trial}"])[0] == got
            answer += got
    assert reused > 0
    assert {64, 128, 256} <= compiled.runner.compiled_spans  # the compiled step ran at every span


def test_compiled_seeded_sampling_and_logprobs(compiled):
    rng = random.Random(2)
    for i in range(3):
        prompt = random_tokens(rng, rng.randrange(10, 90))
        s = Sampling(temperature=0.9, top_p=0.95, seed=50 + i)
        a = compiled.generate([prompt], 8, [f"p{i}"], [s])[0]
        assert compiled.generate([prompt], 8, None, [s])[0] == a
        greedy = compiled.greedy([prompt], 8)[0]
        scored = compiled.token_logprobs(prompt, greedy, top_k=1)
        assert [t.top[0][0] for t in scored] == greedy  # logprobs replay the compiled decode


def test_engine_speculative_equals_naive_on_the_compiled_runner(compiled, small_indexes):
    seen = speculative_equals_naive(compiled, small_indexes["exact"], 6)
    assert seen["speculated"] > 0 and seen["rollbacks"] > 0, seen


def test_a_failing_compiler_is_a_config_error_at_start(tiny_lm, monkeypatch):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ConfigError, match="--lm-runner compiled.*no C\\+\\+ compiler.*--lm-runner static"):
        StaticRunner(tiny_lm.model, max_len=128, capacity=2, compile_step=True)


def test_compiled_batched_is_refused(tiny_lm):
    with pytest.raises(ConfigError, match="batch_rows 1"):
        StaticRunner(tiny_lm.model, max_len=128, capacity=8, batch_rows=8, compile_step=True)
