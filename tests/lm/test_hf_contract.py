"""The LanguageModel contract of the HF backend: EOS, limits, input validation, hidden states."""

from __future__ import annotations

import random

import pytest
import torch

from ralmspec.errors import ConfigError
from tests.lm.conftest import random_tokens


def _prompt_with_fresh_token(lm, rng):
    """A prompt whose greedy continuation has a token first appearing at index >= 1."""
    for _ in range(50):
        p = random_tokens(rng, rng.randrange(5, 60))
        out = lm.greedy([p], 8)[0]
        for k in range(1, len(out)):
            if out[k] not in out[:k]:
                return p, out, k
    raise AssertionError("the tiny model only repeats one token")


def test_stops_at_eos_and_includes_it(fresh):
    base = fresh()
    p, out, k = _prompt_with_fresh_token(base, random.Random(1))
    assert len(out) == 8 and base.eos_token_id not in out
    lm = fresh(eos_token_id=out[k])
    assert lm.greedy([p], 8) == [out[: k + 1]]
    assert lm.greedy([p], 8, sessions=["s"]) == [out[: k + 1]]
    assert lm.last_call_stats.decode_steps == k  # no work after EOS
    assert lm.greedy([p], k) == [out[:k]]  # n reached before EOS

    extra = fresh(stop_token_ids=[out[k]])  # extra stop ids (e.g. a list of EOS ids)
    assert extra.greedy([p], 8) == [out[: k + 1]]


def test_default_eos_is_sep(tiny):
    assert tiny.eos_token_id == 102 == tiny.tokenizer.hf.sep_token_id


def test_max_context_is_enforced(fresh, tiny):
    assert tiny.max_context == 1024
    lm = fresh(max_context=64)
    p = random_tokens(random.Random(0), 60)
    assert len(lm.greedy([p], 4)[0]) == 4
    with pytest.raises(ConfigError, match="max_context"):
        lm.greedy([p], 5)
    with pytest.raises(ConfigError, match="max_context"):
        lm.next_token_states([p + p])


@pytest.mark.parametrize("prompts, n, sessions, match", [
    ([[]], 4, None, "empty"),
    ([[5, 30522]], 4, None, "outside"),
    ([[-1, 5]], 4, None, "outside"),
    ([["a", 5]], 4, None, "token ids"),
    ("hello", 4, None, "string"),
    ([[5, 6]], -1, None, "n must be"),
    ([[5, 6]], 2.0, None, "n must be"),
    ([[5, 6]], True, None, "n must be"),
    ([[5, 6], [7]], 4, ["only-one"], "sessions"),
    ([[5, 6]], 4, [["a", "list"]], "hashable"),
])
def test_bad_requests_raise_config_error(tiny, prompts, n, sessions, match):
    with pytest.raises(ConfigError, match=match):
        tiny.greedy(prompts, n, sessions)


def test_text_that_is_not_unicode_is_refused_before_the_rust_tokenizer(tiny):
    with pytest.raises(ConfigError, match="not valid Unicode: a lone surrogate U[+]D800 at character 2"):
        tiny.tokenizer.encode("a \ud800 b")  # HF's tokenizer raised a bare TypeError
    assert tiny.tokenizer.encode("caf\u00e9 \U0001f642")  # a surrogate PAIR (JSON's emoji) is fine


def test_zero_new_tokens_and_empty_batch(tiny):
    assert tiny.greedy([[5, 6, 7]], 0) == [[]]
    assert tiny.greedy([], 4) == []


def test_bad_backend_settings(tiny):
    from tests.lm.conftest import make_view

    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError, match="block_size"):
            make_view(tiny, block_size=bad)
    with pytest.raises(ConfigError, match="max_context"):
        make_view(tiny, max_context=1)


def test_forward_hidden_matches_canonical_state_numerically(tiny):
    p = random_tokens(random.Random(8), 70)
    h = tiny.forward_hidden(p)
    assert h.shape == (70, tiny.model.config.n_embd) and h.dtype == torch.float32
    state = tiny.next_token_states([p])[0]
    # one plain forward vs canonical blocks: same math, possibly different last bits
    assert torch.allclose(h[-1], state.hidden, atol=1e-4, rtol=1e-4)
    logits = tiny.model.lm_head(h[-1:].to(tiny.dtype))[0]
    assert torch.allclose(logits, state.logits, atol=1e-4, rtol=1e-4)
    assert state.logits.shape == (tiny.vocab_size,)


def test_generation_config_sampling_is_ignored(fresh, tiny):
    """Decoding is argmax whatever the model's generation config asks for."""
    p = random_tokens(random.Random(6), 30)
    want = tiny.greedy([p], 6)
    gc = tiny.model.generation_config
    old = (gc.do_sample, gc.temperature)
    try:
        gc.do_sample, gc.temperature = True, 5.0
        assert fresh().greedy([p], 6) == want
    finally:
        gc.do_sample, gc.temperature = old


def test_a_view_shares_the_weights_and_decodes_alike_with_a_runner_of_its_own(tiny):
    """``HFLanguageModel.view``: same weights, tokenizer, stop tokens, context and runner kind;
    its own runner (sessions) and counters; the same greedy tokens."""
    v = tiny.view()
    assert v.model is tiny.model and v.tokenizer is tiny.tokenizer and v.runner is not tiny.runner
    assert (v.runner.name, v.max_context, v.block_size, v.stop_token_ids, v.eos_token_id) == \
        (tiny.runner.name, tiny.max_context, tiny.block_size, tiny.stop_token_ids, tiny.eos_token_id)
    prompts = [[5, 6, 7, 8], [9, 10]]
    assert v.greedy(prompts, 6) == tiny.greedy(prompts, 6)
    assert v.decode_steps > 0 and v.view(block_size=2).block_size == 2
