"""kNN-LM distribution (hand-computed cases), incremental decoder determinism, naive decoding."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from ralmspec.errors import ConfigError
from ralmspec.knnlm.model import (
    KNNLM,
    IncrementalDecoder,
    KNNLMConfig,
    interpolate,
    knn_distribution,
    lm_distribution,
    next_token,
)

from .conftest import MAX_NEW_TOKENS


def test_p_knn_hand_computed():
    # 3 neighbours: distances 1.0, 1.5, 2.0 with values 7, 7, 3 (T = 1)
    p = knn_distribution(np.array([1.0, 1.5, 2.0]), np.array([7, 7, 3]), vocab_size=10, temperature=1.0)
    z = math.exp(-1.0) + math.exp(-1.5) + math.exp(-2.0)
    assert p[7] == pytest.approx((math.exp(-1.0) + math.exp(-1.5)) / z, rel=1e-12)
    assert p[3] == pytest.approx(math.exp(-2.0) / z, rel=1e-12)
    assert p.sum() == pytest.approx(1.0) and np.count_nonzero(p) == 2
    # temperature 2: exp(-d/2)
    p2 = knn_distribution(np.array([1.0, 1.5, 2.0]), np.array([7, 7, 3]), 10, 2.0)
    z2 = math.exp(-0.5) + math.exp(-0.75) + math.exp(-1.0)
    assert p2[3] == pytest.approx(math.exp(-1.0) / z2, rel=1e-12)
    # large distances do not underflow (the minimum is subtracted)
    p3 = knn_distribution(np.array([5000.0, 5001.0]), np.array([1, 2]), 4, 1.0)
    assert p3[1] == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_interpolation_hand_computed():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))  # p_lm = [.1, .2, .3, .4]
    np.testing.assert_allclose(lm_distribution(logits), [0.1, 0.2, 0.3, 0.4], rtol=1e-12)
    # neighbours: values 0 (d=0) and 1 (d=ln 3)  => p_knn = [3/4, 1/4, 0, 0]
    d, v = np.array([0.0, math.log(3.0)]), np.array([0, 1])
    p_knn = knn_distribution(d, v, 4, 1.0)
    np.testing.assert_allclose(p_knn, [0.75, 0.25, 0, 0], rtol=1e-12)
    p = interpolate(p_knn, lm_distribution(logits), 0.25)
    np.testing.assert_allclose(p, [0.25 * 0.75 + 0.075, 0.25 * 0.25 + 0.15, 0.225, 0.3], rtol=1e-12)
    # p = [0.2625, 0.2125, 0.225, 0.3] -> the LM wins at λ = 0.25 ...
    assert next_token(logits, d, v, KNNLMConfig(lam=0.25)) == 3
    # ... the kNN wins at λ = 0.5: p = [0.425, 0.225, 0.15, 0.2]
    assert next_token(logits, d, v, KNNLMConfig(lam=0.5)) == 0
    # λ = 0 is the plain LM, λ = 1 the plain kNN distribution
    assert next_token(logits, d, v, KNNLMConfig(lam=0.0)) == 3
    assert next_token(logits, d, v, KNNLMConfig(lam=1.0)) == 0


def test_ties_go_to_the_lowest_token_id():
    logits = np.zeros(6)  # uniform LM
    # two neighbours at the same distance with values 4 and 2: p_knn(2) == p_knn(4)
    assert next_token(logits, np.array([1.0, 1.0]), np.array([4, 2]), KNNLMConfig(lam=0.5)) == 2
    assert next_token(logits, np.array([1.0]), np.array([5]), KNNLMConfig(lam=0.0)) == 0


def test_next_token_equals_full_argmax():
    """The candidate-only argmax equals the argmax of the full interpolated distribution."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        vocab = int(rng.integers(2, 50))
        logits = rng.normal(size=vocab) if trial % 3 else np.zeros(vocab)  # every 3rd: all tied
        if trial % 5 == 0:
            logits = np.round(logits)  # many ties
        k = int(rng.integers(1, 8))
        d = np.round(rng.uniform(0, 3, size=k), 1 if trial % 2 else 6)
        v = rng.integers(0, vocab, size=k)
        lam = float(rng.choice([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]))
        cfg = KNNLMConfig(lam=lam, temperature=float(rng.choice([0.5, 1.0, 3.0])))
        full = interpolate(knn_distribution(d, v, vocab, cfg.temperature), lm_distribution(logits), lam)
        assert next_token(logits, d, v, cfg) == int(np.argmax(full)), trial


def test_config_validation():
    for bad in (dict(k=0), dict(lam=1.5), dict(lam=-0.1), dict(temperature=0.0), dict(max_new_tokens=0)):
        with pytest.raises(ConfigError):
            KNNLMConfig(**bad)
    with pytest.raises(ConfigError):
        knn_distribution(np.array([1.0]), np.array([12]), 10, 1.0)
    with pytest.raises(ConfigError):
        next_token(np.zeros(10), np.array([1.0]), np.array([12]), KNNLMConfig())


def test_incremental_decoder_rollback_is_bit_identical(tiny_lm):
    """State at a position is the same bits whatever was fed and rolled back before."""
    prompt = [2023, 2003, 1037, 3231]
    a = IncrementalDecoder(tiny_lm)
    a.start(prompt)
    ref = [a.step(t) for t in (2000, 2001, 2002, 2003)]
    b = IncrementalDecoder(tiny_lm)
    b.start(prompt)
    b.step(2000)
    b.step(3000)  # a wrong token ...
    b.step(3001)
    b.truncate(len(prompt) + 1)  # ... rolled back
    got = [b.step(t) for t in (2001, 2002, 2003)]
    for r, g in zip(ref[1:], got):
        assert np.array_equal(r.hidden, g.hidden) and np.array_equal(r.logits, g.logits)
    assert b.length == len(prompt) + 4
    with pytest.raises(ValueError):
        b.truncate(0)


def test_naive_decoding(tiny_lm, naive_results, knn_prompts):
    knn, results = naive_results["flat"]
    r = results[0]
    assert len(r.tokens) == MAX_NEW_TOKENS and len(r.trace) == MAX_NEW_TOKENS and r.mode == "naive"
    assert [t.token for t in r.trace] == r.tokens
    assert r.lm_s > 0 and r.search_s > 0 and r.limit() > 1.0
    assert r.text == tiny_lm.tokenizer.decode(r.tokens)
    again = knn.generate(knn_prompts[0])
    assert again.tokens == r.tokens
    assert knn.generate(tiny_lm.tokenizer.decode(knn_prompts[0])).tokens  # str prompts work


def test_a_stop_token_besides_eos_ends_the_answer(tiny_lm, naive_results, knn_prompts):
    """The LM's other stop tokens (``LanguageModel.is_stop``) end a kNN-LM answer as EOS does,
    in the naive and the speculative decoder alike (it was EOS only)."""
    from ralmspec.knnlm.speculative import SpeculativeKNNConfig, SpeculativeKNNLM

    knn, results = naive_results["flat"]
    stop = results[0].tokens[3]
    mine = KNNLM(tiny_lm.view(stop_token_ids=frozenset([stop])), knn.datastore, knn.config)
    naive = mine.generate(knn_prompts[0])
    assert naive.tokens == results[0].tokens[:results[0].tokens.index(stop) + 1]
    spec = SpeculativeKNNLM(mine, SpeculativeKNNConfig(os3=False, fixed_stride=2)).generate(knn_prompts[0])
    assert spec.tokens == naive.tokens and spec.stats.speculated > 0


def test_knn_changes_the_output(tiny_lm, knn_datastores, knn_prompts):
    """The datastore matters: λ = 0 (plain LM) and λ = 0.25 decode differently on corpus prompts."""
    ds = knn_datastores["flat"]
    plain = KNNLM(tiny_lm, ds, KNNLMConfig(k=8, lam=0.0, max_new_tokens=8))
    mixed = KNNLM(tiny_lm, ds, KNNLMConfig(k=8, lam=0.25, max_new_tokens=8))
    diffs = sum(plain.generate(p).tokens != mixed.generate(p).tokens for p in knn_prompts[:6])
    assert diffs >= 3


def test_bad_prompts_and_mismatched_model(tiny_lm, knn_datastores):
    from transformers import GPT2Config, GPT2LMHeadModel

    knn = KNNLM(tiny_lm, knn_datastores["flat"], KNNLMConfig(max_new_tokens=8))
    with pytest.raises(ConfigError, match="empty"):
        knn.generate("")
    with pytest.raises(ConfigError, match="not valid Unicode"):
        knn.generate("the \ud800 river")
    with pytest.raises(ConfigError, match="context"):
        knn.generate([1000] * 1020)
    with pytest.raises(ConfigError, match="outside"):
        knn.generate([10 ** 6])
    store = knn_datastores["flat"]
    for bad in (-1, 30522):  # a corrupt datastore's value: refused when the model meets the datastore
        corrupt = copy.copy(store)
        corrupt.values = store.values.copy()
        corrupt.values[3] = bad
        with pytest.raises(ConfigError, match=r"values fall outside the model's vocabulary \[0, 30522\)"):
            KNNLM(tiny_lm, corrupt)

    class Other:  # a real (untrained) GPT-2 of another width, same tokenizer
        model = GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=64, n_layer=1, n_head=2))
        tokenizer = tiny_lm.tokenizer
        eos_token_id = 102
        max_context = 1024
        runner = tiny_lm.runner

    with pytest.raises(ConfigError, match="dimension"):
        KNNLM(Other(), knn_datastores["flat"])
    Other.runner = None
    with pytest.raises(ConfigError, match="KV runner"):
        KNNLM(Other(), knn_datastores["flat"])


def test_a_python_callers_wrong_arguments_are_config_errors(tiny_lm, knn_datastores, tmp_path):
    """Each was an AttributeError from deep inside (a dict for a config, a datastore's path for the
    datastore), or, for one string of documents, a datastore of its characters refused with a
    misleading "every document has < 2 tokens"."""
    from ralmspec.knnlm.datastore import build_datastore
    from ralmspec.knnlm.speculative import SpeculativeKNNLM

    store = knn_datastores["flat"]
    with pytest.raises(ConfigError, match="config must be a KNNLMConfig or None, got dict"):
        KNNLM(tiny_lm, store, {"k": 3})
    with pytest.raises(ConfigError, match="open it with ralmspec.knnlm.open.open_datastore"):
        KNNLM(tiny_lm, str(store.path))
    with pytest.raises(ConfigError, match="datastore must be a kNN-LM datastore"):
        KNNLM(tiny_lm, object())
    knn = KNNLM(tiny_lm, store)
    with pytest.raises(ConfigError, match="config must be a SpeculativeKNNConfig or None, got dict"):
        SpeculativeKNNLM(knn, {"os3": False})
    with pytest.raises(ConfigError, match="speculates over a KNNLM, got HFLanguageModel"):
        SpeculativeKNNLM(tiny_lm)
    with pytest.raises(ConfigError, match="got one string: pass \\[text\\]"):
        build_datastore(tiny_lm, "one long document", tmp_path / "ds", progress=False)
    with pytest.raises(ConfigError, match="config must be a DatastoreBuildConfig or None, got dict"):
        build_datastore(tiny_lm, ["a document"], tmp_path / "ds", {"max_tokens": 10}, progress=False)


def test_threads_decoding_on_one_static_runner_get_their_own_tokens(tiny_lm, knn_datastores):
    """One KNNLM (and a SpeculativeKNNLM over it) called from several threads at once, on the
    LM's static runner (the default on CUDA): its threads' steps read each other's inputs, and
    nearly every answer had wrong tokens. Each is now the answer it gets alone."""
    from ralmspec.knnlm.speculative import SpeculativeKNNConfig, SpeculativeKNNLM
    from tests.concurrent import run_together

    lm = tiny_lm.view(runner="static")
    knn = KNNLM(lm, knn_datastores["flat"], KNNLMConfig(k=8, max_new_tokens=12))
    spec = SpeculativeKNNLM(knn, SpeculativeKNNConfig(os3=False, fixed_stride=3))
    prompts = ["The storm formed", "Robert Boulter is an English", "Hed PE is an American", "The song was released"]
    alone = [knn.generate(p).tokens for p in prompts]
    got = run_together(8, lambda i: (spec if i % 2 else knn).generate(prompts[i % 4]))
    assert [r.tokens for r in got] == [alone[i % 4] for i in range(8)]
    assert all(r.stats.speculated > 0 for r in got[1::2])
    assert len(lm.runner._free) == lm.runner.capacity  # every decoder gave its KV slot back
