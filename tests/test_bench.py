"""ralmspec/bench.py: run_bench refuses arguments of the wrong kind before any request."""

from __future__ import annotations

import pytest

from ralmspec.bench import run_bench
from ralmspec.config import GenerationConfig, SpeculationConfig
from ralmspec.errors import ConfigError

GEN = GenerationConfig(max_new_tokens=4)
SPEC = SpeculationConfig()


@pytest.mark.parametrize("questions, gen, variants, message", [
    # its characters became the questions: a ConfigError 'prompt must be a non-empty string' at the first space
    ("Who is Robert Boulter?", GEN, {"s": SPEC}, "got one string: pass \\[question\\]"),
    # every request ran, then summarize failed: TypeError: asdict() should be called on dataclass instances
    (["q"], None, {"s": SPEC}, "gen must be a GenerationConfig"),
    (["q"], GEN, {"s": {"prefetch": 1}}, "variant 's' must be a SpeculationConfig, got dict"),  # AttributeError
    (["q"], GEN, [SPEC], "variants must be a dict"),
    # its results were appended to the naive runs' list: a summary of the naive loop against itself
    (["q"], GEN, {"naive": SPEC}, "'naive' names the naive runs"),
])
def test_run_bench_refuses_wrong_arguments_before_any_request(questions, gen, variants, message):
    with pytest.raises(ConfigError, match=message):
        run_bench(None, questions, gen, variants, "exact")  # no engine: nothing may run
