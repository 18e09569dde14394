"""Fixtures of the HF backend tests: one tiny random GPT-2 shared by all, viewed with several
block sizes (an ``HFLanguageModel`` is a thin stateful wrapper around the shared torch module)."""

from __future__ import annotations

import random

import pytest

from ralmspec.lm.hf import HFLanguageModel


def make_view(lm: HFLanguageModel, **overrides) -> HFLanguageModel:
    """A fresh backend (own sessions and counters) around the same weights as ``lm``."""
    kw = dict(eos_token_id=lm.eos_token_id, max_context=lm.max_context, device=lm.device,
              block_size=lm.block_size, name=lm.name)
    kw.update(overrides)
    return HFLanguageModel(lm.model, lm.tokenizer, **kw)


def random_tokens(rng: random.Random, n: int) -> list[int]:
    """Ordinary WordPiece ids (no special tokens, no [unused*])."""
    return [rng.randrange(1000, 30000) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny(tiny_lm) -> HFLanguageModel:
    """The shared tiny model (``tests/conftest.py``), default block size."""
    return tiny_lm


@pytest.fixture
def fresh(tiny_lm):
    """Factory of fresh backends around the tiny weights: ``fresh(block_size=8)``."""
    return lambda **kw: make_view(tiny_lm, **kw)
