"""Pinned query batching (retrieval/encoder.py, ``batching="pinned"``): every encoder forward has
the fixed shape PINNED_ROWS x a length bucket, so queries share forwards and a query's vector is
still the same bits alone and inside any batch. On the CPU here; on CUDA too where there is one
(the default there)."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from ralmspec.config import EngineConfig, GenerationConfig, RetrievalConfig, SpeculationConfig
from ralmspec.engine.core import RalmEngine
from ralmspec.errors import ConfigError
from ralmspec.retrieval.encoder import PINNED_ROWS, QueryEncoder, default_batching, encoder_for
from ralmspec.retrieval.index import load_retriever
from tests.identity import SpeculationCheck, engine_trace

from .conftest import kb_config


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU"))]


@pytest.fixture(scope="module", params=DEVICES)
def pinned(request) -> QueryEncoder:
    return QueryEncoder(device=request.param, batching="pinned", cache_size=0)  # every call encodes


@pytest.fixture(scope="module")
def texts(kb_queries, kb_corpus) -> list[str]:
    """Twelve of the retrieval test queries (questions, passage snippets, the empty one and
    nonsense), passage-length ones (the 64- and 96-token buckets) and one past the encoder's
    256-token limit (truncated)."""
    long = [" ".join(kb_corpus[i].text.split() * 2) for i in (1, 40, 90)]
    return kb_queries[:8] + kb_queries[-4:] + long + [" ".join(kb_corpus[7].text.split() * 12)]


def _forwards(enc: QueryEncoder) -> list[tuple[int, ...]]:
    """The input shapes of the encoder's forwards, recorded from now on."""
    shapes: list[tuple[int, ...]] = []
    # on the Transformer module: sentence-transformers 5.2 runs its modules without the outer forward
    enc._model[0].register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0]["input_ids"].shape)))
    return shapes


def test_a_vector_is_the_same_bits_alone_and_in_any_batch(pinned, texts):
    alone = {t: pinned.encode_queries([t])[0] for t in texts}
    rng = random.Random(5)
    for size in (2, 8, 9, 30):
        for _ in range(2):
            batch = [rng.choice(texts) for _ in range(size)]  # repeats and mixed buckets included
            got = pinned.encode_queries(batch)
            for t, v in zip(batch, got):
                assert np.array_equal(v, alone[t]), (pinned.device, size, t[:40])


def test_queries_of_a_bucket_share_fixed_shape_forwards(texts):
    enc = QueryEncoder(batching="pinned", cache_size=0)
    shapes = _forwards(enc)
    questions = texts[:9]  # NQ questions: all in the 32-token bucket
    enc.encode_queries(questions[:PINNED_ROWS])
    assert shapes == [(PINNED_ROWS, 32)]
    enc.encode_queries(questions + [texts[-1]])  # 9 short ones and one truncated at 256 tokens
    assert shapes[1:] == [(PINNED_ROWS, 32), (PINNED_ROWS, 32), (PINNED_ROWS, 256)]
    single = QueryEncoder(cache_size=0)
    assert single.batching == "single"
    one_each = _forwards(single)
    single.encode_queries(questions[:3])
    assert len(one_each) == 3 and all(s[0] == 1 for s in one_each)


def test_pinned_and_single_vectors_agree_closely(pinned, encoder, texts):
    """Not bit for bit (other shapes), which is why an engine uses one encoder for both paths."""
    a = pinned.encode_queries(texts)
    b = encoder.encode_queries(texts)
    assert a.dtype == np.float32 and a.shape == b.shape
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert float(np.abs(a - b).max()) < 1e-4


def test_batching_defaults_and_bad_values():
    assert default_batching("cpu") == "single"
    assert default_batching("cuda") == default_batching("cuda:1") == "pinned"
    with pytest.raises(ConfigError, match="encoder batching"):
        QueryEncoder(batching="padded")
    with pytest.raises(ConfigError, match="--encoder-batching"):
        RetrievalConfig(encoder_batching="padded")
    assert encoder_for(RetrievalConfig(encoder_batching="pinned")).batching == "pinned"
    assert encoder_for(RetrievalConfig()).batching == "single"


def test_speculative_equals_naive_with_the_pinned_encoder(tiny_lm, kb_index_dirs, kb_queries):
    """End to end: the naive loop encodes its queries one per forward, verification several per
    forward (the ``last`` guess encodes nothing, so verification's queries are not cached)."""
    enc = QueryEncoder(batching="pinned", cache_size=0)
    shapes = _forwards(enc)
    engine = RalmEngine(tiny_lm, load_retriever(kb_index_dirs["exact"], kb_config("exact"), enc), EngineConfig())
    check = SpeculationCheck()
    misses_before = enc.misses

    async def go():
        for i, q in enumerate(kb_queries[:4]):
            gen = GenerationConfig(stride=(2, 3)[i % 2], query_len=16, max_new_tokens=10, passage_tokens=48)
            naive = await engine.generate(q, gen=gen, speculate=False)
            # os3=False: OS^3 picks strides from measured timings; on a slow machine (CI, stop 38)
            # they left every verification one query and the batching assertion below failed
            spec = SpeculationConfig(os3=False, fixed_stride=4, guesser="last", async_verify=bool(i % 2),
                                     naive_fallback=False)
            res = await engine.generate(q, gen=gen, spec=spec, speculate=True)
            check.same(engine_trace(res), engine_trace(naive), res.stats, where=(i, q))

    asyncio.run(go())
    check.ran(min_speculated=4)
    assert all(rows == PINNED_ROWS for rows, _ in shapes)
    assert enc.misses - misses_before > len(shapes), "no forward encoded two queries: verification did not batch"


def test_the_flag_reaches_the_config():
    import argparse

    from ralmspec.cli_options import add_engine_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args([])).retrieval.encoder_batching is None
    cfg = engine_config_from_args(p.parse_args(["--encoder-batching", "pinned"]))
    assert cfg.retrieval.encoder_batching == "pinned"
    with pytest.raises(SystemExit):  # argparse: "invalid choice", exit status 2
        p.parse_args(["--encoder-batching", "padded"])
