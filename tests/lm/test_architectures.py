"""The HF backend on the architecture variants a user's own checkpoint may have, not only the two
shipped models (tiny GPT-2, SmolLM2 Llama): each runner's greedy tokens equal the model's own
full forward (no cache: the whole sequence each token), or the runner refuses the model with the
reason. Small random-weight models of the real transformers classes; weights scaled up so that
greedy tokens vary (a near-uniform model would answer one token and prove nothing).

Found by running user-style configs (session 28): the static runner ran a Qwen2 sliding-window
model as full attention, GPT-2's ``scale_attn_by_inverse_layer_idx`` with layer 0's scale in
every layer, and a ``dynamic`` / ``longrope`` rotary table as one table, each silently another
model; ``dynamic`` NTK scaling also made the eager runner's answers depend on earlier requests.
Mistral (a Llama layer) joined the static families then, with its window checked.
"""

from __future__ import annotations

import random

import pytest
import torch

from ralmspec.errors import ConfigError
from ralmspec.lm.hf import HFLanguageModel
from ralmspec.lm.slot_decoder import static_unsupported, supports_static
from ralmspec.lm.static import StaticRunner
from tests.lm.conftest import small_model

VOCAB = 512
NEW_TOKENS = 12


def backend(model: torch.nn.Module, runner: str, tokenizer) -> HFLanguageModel:
    return HFLanguageModel(model, tokenizer, eos_token_id=None, max_context=512, block_size=16,
                           name="variant", runner=runner)


def full_forward_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """The reference: the model's forward over the whole sequence for every token."""
    out = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(prompt):]


def session_calls(lm: HFLanguageModel, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """An engine-like session (the prompt grows by its answer, is cut back at random points, its
    passage is swapped; positions past 64, the window and the rotary tables' interesting range):
    each call's (prompt, tokens)."""
    passage, question, answer, calls = [rng.randrange(4, VOCAB) for _ in range(90)], [7, 8, 9], [], []
    for step in range(7):
        if answer and rng.random() < 0.3:
            answer = answer[:rng.randrange(len(answer))]
        if rng.random() < 0.2:
            passage = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(20, 120))]
        prompt = passage + question + answer
        got = lm.greedy([prompt], rng.choice((1, 4, 7)), ["session"])[0]
        calls.append((prompt, got))
        answer += got
    return calls


SUPPORTED = {
    "llama": ("llama", {}),
    "llama, attention and MLP biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama, explicit head_dim": ("llama", dict(head_dim=32)),
    "llama, tied embeddings": ("llama", dict(tie_word_embeddings=True)),
    "llama, llama3 rope": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama, linear rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama, yarn rope": ("llama", dict(max_position_embeddings=256, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral, window as long as the context": ("mistral", dict(sliding_window=512)),
    "gpt2, attention scaled by inverse layer index": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
    "gpt2, unscaled attention": ("gpt2", dict(scale_attn_weights=False)),
}


@pytest.mark.parametrize("variant", list(SUPPORTED))
def test_every_runner_decodes_the_models_own_tokens(variant, tiny_lm):
    family, config = SUPPORTED[variant]
    model = small_model(family, **config)
    assert supports_static(model, 512), static_unsupported(model, 512)
    rng_seed = sum(map(ord, variant))
    seen = set()
    for runner in ("eager", "static", "batched"):
        calls = session_calls(backend(model, runner, tiny_lm.tokenizer), random.Random(rng_seed))
        for prompt, got in calls:
            assert got == full_forward_greedy(model, prompt, len(got)), (runner, len(prompt))
            seen.update(got)
    assert len(seen) > 5  # the tokens vary: the comparison can fail


@pytest.mark.parametrize("family, config", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=1)),  # the window on the modules
    ("mistral", dict(sliding_window=32)),  # the window in the config only
], ids=["qwen2", "mistral"])
def test_sliding_window_layers_keep_the_eager_runner(family, config, tiny_lm):
    """A window shorter than the context: the static runners refuse the model (they would attend
    past the window), "auto" picks the eager runner, which decodes the model's tokens. A window
    of at least the slot length leaves no key out: accepted (``SUPPORTED``, Mistral)."""
    model = small_model(family, **config)
    assert "sliding-window layers (window 32, shorter than the 512-position context)" in static_unsupported(model, 512)
    assert supports_static(model, 32)
    for runner in ("static", "batched"):
        with pytest.raises(ConfigError, match=r"sliding-window.*use lm_runner='eager' \(--lm-runner eager\)"):
            backend(model, runner, tiny_lm.tokenizer)
    with pytest.raises(ConfigError, match="sliding-window"):
        StaticRunner(model, max_len=256, capacity=2)
    lm = HFLanguageModel(model, tiny_lm.tokenizer, eos_token_id=None, max_context=512, block_size=16,
                         runner="auto", concurrent=True)  # "auto" on the CPU would pick batched
    assert lm.runner.name == "eager"
    for prompt, got in session_calls(lm, random.Random(3)):
        assert got == full_forward_greedy(model, prompt, len(got))
    # the eager runner's cache keeps every position (the window is the model's mask): sessions are
    # kept and reused; the model's own sliding cache could not be cropped, so none was kept
    assert lm.reused_tokens > 0


@pytest.mark.parametrize("family, config", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=1)),
    ("mistral", dict(sliding_window=32)),
], ids=["qwen2", "mistral"])
def test_a_kv_rollback_past_the_window_is_the_models_state(family, config, tiny_lm):
    """kNN-LM's decoder steps a sliding-window model well past its window and rolls back (a
    rejected speculation): its logits then equal a fresh decoder's. Before, the model's own sliding
    cache refused the crop (transformers' RuntimeError: "the sliding window size was already
    reached"), and ``knnlm bench`` on such a model died with a traceback."""
    from ralmspec.knnlm.model import IncrementalDecoder

    model = small_model(family, **config)
    lm = backend(model, "auto", tiny_lm.tokenizer)
    rng = random.Random(5)
    prompt, more = [rng.randrange(4, VOCAB) for _ in range(20)], [rng.randrange(4, VOCAB) for _ in range(60)]
    dec = IncrementalDecoder(lm)
    dec.start(prompt)
    for t in more:
        dec.step(t)
    dec.truncate(len(prompt) + 10)  # 50 positions back, past the 32-position window
    after = [dec.step(t).logits for t in more[10:30]]
    fresh = IncrementalDecoder(lm)
    fresh.start(prompt)
    for t in more[:10]:
        fresh.step(t)
    again = [fresh.step(t).logits for t in more[10:30]]
    for a, b in zip(after, again):
        assert (a == b).all()


def test_a_rotary_table_that_changes_with_the_call_keeps_the_eager_runner(tiny_lm):
    """``longrope`` switches its factors with the length of each forward: the static runners,
    which evaluate one table for every position, refuse it; the eager runner keeps it, and its
    tokens are a function of the request (the canonical calls), whatever came before."""
    model = small_model("llama", rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                               "long_factor": [4.0] * 8, "original_max_position_embeddings": 64})
    assert "rope_type 'longrope'" in static_unsupported(model)
    with pytest.raises(ConfigError, match="longrope"):
        backend(model, "static", tiny_lm.tokenizer)
    lm = backend(model, "auto", tiny_lm.tokenizer)
    assert lm.runner.name == "eager"
    rng = random.Random(4)
    mid, long = [rng.randrange(4, VOCAB) for _ in range(100)], [rng.randrange(4, VOCAB) for _ in range(300)]
    first = lm.greedy([mid], NEW_TOKENS, ["a"])[0]
    lm.greedy([long], 4, ["b"])
    assert lm.greedy([mid], NEW_TOKENS, ["c"])[0] == first


def test_dynamic_ntk_scaling_is_refused_for_every_runner(tiny_lm):
    """transformers rescales a ``dynamic`` rotary table in place whenever a forward is longer than
    any before it. Measured before the refusal (eager runner): a 100-token request answered
    differently after a 300-token one. No runner can make that reproducible, so it is refused."""
    model = small_model("llama", max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    for runner in ("eager", "static", "auto"):
        with pytest.raises(ConfigError, match="rope_type 'dynamic'.*earlier requests"):
            backend(model, runner, tiny_lm.tokenizer)
