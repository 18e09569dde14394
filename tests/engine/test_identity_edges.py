"""Speculative == naive at the edges of the settings (docs/design.md §2 invariant 1).

The identity sweeps (test_equivalence.py, test_sampling_equivalence.py) cover ordinary
settings; this one pins the corners where a speculated chunk is cut or ended by something other
than the stride, each with forced speculation (a fixed stride) so the comparison is never naive
against naive:

- the context limit: a model of 48 tokens (eager, and a static runner's slots of 48), answers
  that fill it (``max_new_tokens`` 46 leaves a one-token prompt budget), passages longer than
  the context (cut to leave one context token), prompts longer than the budget (cut from the left);
- EOS inside speculated chunks: a view whose stop tokens are an eighth of the vocabulary, so
  chunks end early, guessed or true, and rolled-back chunks held the EOS the answer lacks;
- stop strings straddling a chunk boundary, taken from the naive answer's own text;
- the smallest and largest knobs: stride 1 and stride > ``max_new_tokens``, ``query_len`` 1 and
  longer than the context, ``max_new_tokens`` 1 and 2, ``passage_tokens`` 1, ``cache_capacity``
  1, ``prefetch`` 1 and beyond the knowledge base (and HNSW's beam), ``fixed_stride`` 1 and 64,
  ``max_inflight`` 1 and 16, eager rounds (a ``fixed_stride`` of 1 verified beside decoding: a
  synchronous one-step round is the naive loop, ``verified_ahead``);
- seeded sampling and logprobs at those corners; every retriever, a query with no BM25 term.

A request compares tokens, text, finish reason, the passage of every span and the logprobs.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
from ralmspec.engine.core import RalmEngine
from tests.identity import SpeculationCheck

CONTEXT = 48
SPEC = dict(os3=False, naive_fallback=False)
Q = ["who wrote the song hey jude", "when did the roman empire fall", "zzqx qqzv",
     "the river flows through the valley " * 12]  # the last one is longer than the context

# (lm, retriever, question, GenerationConfig fields, SpeculationConfig fields)
CASES = [
    ("ctx", "exact", 0, dict(stride=1, query_len=1, max_new_tokens=24, passage_tokens=8192),
     dict(fixed_stride=1, prefetch=1, cache_capacity=1, async_verify=True)),
    ("ctx", "exact", 3, dict(stride=2, query_len=4096, max_new_tokens=40, passage_tokens=8192),
     dict(fixed_stride=3, prefetch=4096, max_inflight=16, async_verify=True, eager_verify=True)),
    ("static", "ivf", 1, dict(stride=3, query_len=4, max_new_tokens=46, passage_tokens=1),
     dict(fixed_stride=64, prefetch=4096, cache_capacity=2, max_inflight=1, async_verify=True)),
    ("static", "hnsw", 3, dict(stride=1, query_len=2, max_new_tokens=30, passage_tokens=32),
     dict(fixed_stride=7, prefetch=4096, cache_capacity=1, max_inflight=2, async_verify=True, guesser="refine")),
    ("eos", "exact", 3, dict(stride=1, query_len=3, max_new_tokens=40, passage_tokens=16),
     dict(fixed_stride=3, prefetch=2, cache_capacity=1, async_verify=True, guesser="last")),
    ("eos", "bm25", 2, dict(stride=2, query_len=1, max_new_tokens=40, passage_tokens=64),
     dict(fixed_stride=2, prefetch=1, cache_capacity=1, async_verify=False, guesser="bm25")),
    ("eos", "hnsw", 1, dict(stride=1, query_len=1, max_new_tokens=40, passage_tokens=8,
                            temperature=2.0, top_p=0.3, seed=7, logprobs=3),
     dict(fixed_stride=2, prefetch=2, cache_capacity=1, async_verify=True, guesser="static")),
    ("ctx", "bm25", 2, dict(stride=1, query_len=1, max_new_tokens=2, passage_tokens=1, logprobs=0),
     dict(fixed_stride=1, prefetch=1, cache_capacity=1, async_verify=True)),
    ("ctx", "exact", 1, dict(stride=1, query_len=3, max_new_tokens=16, passage_tokens=16,
                             temperature=1.0, seed=3, logprobs=3),
     dict(fixed_stride=64, prefetch=2, cache_capacity=1, max_inflight=16, async_verify=True, eager_verify=True)),
]


@pytest.fixture(scope="module")
def engines(tiny_lm, small_indexes):
    """(lm key, retriever kind) -> engine: "ctx" an eager tiny LM of CONTEXT tokens, "static" a
    static runner's slots of CONTEXT, "eos" the full context with an eighth of the vocabulary
    as stop tokens."""
    stops = frozenset(random.Random(99).sample(range(200, tiny_lm.vocab_size), tiny_lm.vocab_size // 8))
    lms = {"ctx": tiny_lm.view(max_context=CONTEXT), "static": tiny_lm.view(runner="static", max_context=CONTEXT),
           "eos": tiny_lm.view(stop_token_ids=stops)}
    return {(k, kind): RalmEngine(lm, small_indexes[kind], EngineConfig()) for k, lm in lms.items()
            for kind in small_indexes}


def outcome(res):
    """Everything the two loops must agree on."""
    lps = None if res.logprobs is None else [(lp.token, lp.logprob, tuple(lp.top)) for lp in res.logprobs]
    return res.token_ids, res.text, res.finish_reason, [(s.start, s.end, s.doc_id) for s in res.steps], lps


def run_pair(engine, question, gen, spec):
    async def go():
        naive = await engine.generate(question, gen=gen, speculate=False)
        return naive, await engine.generate(question, gen=gen, spec=spec, speculate=True)
    return asyncio.run(go())


def test_identity_at_the_edges(engines):
    check = SpeculationCheck()
    finish = set()
    for i, (lm, kind, q, g, s) in enumerate(CASES):
        engine = engines[(lm, kind)]
        gen, spec = GenerationConfig(prompt_format="plain", **g), SpeculationConfig(**SPEC, **s)
        naive, res = run_pair(engine, Q[q], gen, spec)
        check.same(outcome(res), outcome(naive), res.stats, where=(i, lm, kind))
        assert res.stats["speculated"] > 0, (i, lm, kind)  # every corner speculated, none naive vs naive
        finish.add(naive.finish_reason)
        if lm != "eos" and g["max_new_tokens"] + 1 + len(naive.prompt_ids) > CONTEXT:
            assert len(naive.token_ids) == g["max_new_tokens"]  # the context slid, the answer went on
    assert {"eos", "length"} <= finish
    check.ran(min_speculated=len(CASES), min_rollbacks=5)


def test_stop_strings_straddling_chunk_boundaries(engines):
    """A stop string made of the text around a step boundary of the naive answer (the end of one
    chunk and the start of the next): both loops end at the same chunk, cut at the same place."""
    check = SpeculationCheck()
    gen0 = GenerationConfig(stride=2, query_len=2, max_new_tokens=24, passage_tokens=16, prompt_format="plain")
    spec = SpeculationConfig(**SPEC, fixed_stride=3, prefetch=2, cache_capacity=1, async_verify=True)
    tok = engines[("ctx", "exact")].lm.tokenizer
    for kind, q in (("exact", 0), ("hnsw", 1), ("bm25", 2)):
        engine = engines[("ctx", kind)]
        ref = engine.generate_sync(Q[q], gen=gen0, speculate=False)
        for st in ref.steps[2:8:2]:
            at = len(tok.decode(ref.token_ids[:st.end]))
            stop = ref.text[at - 2: at + 2]
            if not stop.strip():
                continue
            gen = GenerationConfig(**{**gen0.__dict__, "stop": (stop,)})
            naive, res = run_pair(engine, Q[q], gen, spec)
            assert naive.finish_reason == "stop" and res.stats["speculated"] > 0
            check.same(outcome(res), outcome(naive), res.stats, where=(kind, stop))
    check.ran(min_speculated=3, min_rollbacks=1)
