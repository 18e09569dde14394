"""Fixtures of the HF backend tests: one tiny random GPT-2 shared by all, viewed with several
block sizes (an ``HFLanguageModel`` is a thin stateful wrapper around the shared torch module)."""

from __future__ import annotations

import random

import pytest
import torch

from ralmspec.lm.hf import HFLanguageModel
from ralmspec.lm.static import StaticRunner


def make_view(lm: HFLanguageModel, **overrides) -> HFLanguageModel:
    """A fresh backend (own sessions and counters) around the same weights as ``lm``."""
    kw = dict(eos_token_id=lm.eos_token_id, max_context=lm.max_context, device=lm.device,
              block_size=lm.block_size, name=lm.name)
    kw.update(overrides)
    return HFLanguageModel(lm.model, lm.tokenizer, **kw)


def step_mixes(runner: StaticRunner, prompts: list[list[int]], mixes: list[list[int | None]],
               toks: list[int]) -> list[torch.Tensor]:
    """Prefill one slot per prompt, then for each mix (slot numbers, None = a padding row) one
    batch-invariant step fed ``toks``, rolled back after it; every live row's logits, in order."""
    slots = []
    for prompt in prompts:
        slot = runner.open()
        runner.prefill_block(slot, prompt, last=True, want_hidden=False)
        slots.append(slot)
    out = []
    for mix in mixes:
        kvs = [None if i is None else slots[i] for i in mix]
        keep = [None if kv is None else kv.length for kv in kvs]
        logits = runner._step_rows(kvs, torch.tensor(toks[:len(mix)], device=runner.decoder.device))
        out += [logits[r] for r, kv in enumerate(kvs) if kv is not None]
        for kv, n in zip(kvs, keep):
            if kv is not None:
                runner.crop(kv, n)
    for slot in slots:
        runner.free(slot)
    return out


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
