"""The guess policy: what each guesser does on the critical path, and when refinement redoes a chunk."""

from __future__ import annotations

import pytest

from ralmspec.config import SpeculationConfig
from ralmspec.errors import ConfigError
from ralmspec.speculation.guess import GUESSERS, plan_guess, refined_doc


def test_plans():
    assert plan_guess("exact", dense=True).rank_now
    last = plan_guess("last", dense=True)
    assert not last.rank_now and not last.rank_beside and last.encode_beside
    assert not plan_guess("last", dense=False).encode_beside  # BM25 has nothing to encode
    refine = plan_guess("refine", dense=False)
    assert refine.rank_beside and not refine.rank_now
    with pytest.raises(ValueError):
        plan_guess("oracle", dense=True)


@pytest.mark.parametrize("cheap,exact,verified,expected", [
    (3, 3, False, None),  # agree: keep the chunk
    (3, 7, False, 7),  # the exact cache guess differs: regenerate with it
    (3, 7, True, None),  # already verified (its passage is the truth): keep
    (3, None, False, None),  # no exact guess (empty cache / worker failed): keep
])
def test_refined_doc(cheap, exact, verified, expected):
    assert refined_doc(cheap, exact, verified) == expected


def test_config_validates_the_guesser():
    assert set(GUESSERS) == {"exact", "last", "refine"}
    with pytest.raises(ConfigError, match="guesser"):
        SpeculationConfig(guesser="psychic")
