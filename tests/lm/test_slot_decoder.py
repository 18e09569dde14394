"""The model's forward over KV slots (ralmspec/lm/slot_decoder.py): its pieces against the HF
modules they replace. The forward as a whole is tested through the runners that drive it
(tests/lm/test_static_runner.py, test_batched_runner.py: static == eager token for token)."""

from __future__ import annotations

import copy

import pytest
import torch

from ralmspec.lm.slot_decoder import MIN_SPAN, SlotDecoder, _rms_norm, _rotate, attention_span, supports_static


def test_attention_span_is_a_function_of_the_position():
    assert attention_span(1, 1024) == MIN_SPAN
    assert attention_span(MIN_SPAN, 1024) == MIN_SPAN
    assert attention_span(MIN_SPAN + 1, 1024) == 2 * MIN_SPAN
    assert attention_span(1000, 1024) == 1024
    assert attention_span(700, 800) == 800  # capped at the slot length


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_steps_norm_and_rotation_are_the_models_bit_for_bit(smollm2_lm, dtype):
    """The static forward's RMSNorm (``F.rms_norm`` for the statistics: one kernel on CUDA) and
    its rotation (a roll by a sign-folded sine table) give the HF modules' and the textbook
    rotation's bits on the CPU, with SmolLM2's own norm weights and rotary table."""
    model = copy.deepcopy(smollm2_lm.model).to(dtype)
    dec = SlotDecoder(model, max_len=256)
    gen = torch.Generator().manual_seed(0)
    norms = [model.model.norm] + [n for blk in model.model.layers[:4]
                                  for n in (blk.input_layernorm, blk.post_attention_layernorm)]
    for norm in norms:
        for scale in (0.01, 1.0, 30.0):
            x = (torch.randn(3, 5, dec.embed.embedding_dim, generator=gen) * scale).to(dtype)
            assert torch.equal(_rms_norm(norm)(x), norm(x))
    plain = torch.nn.Linear(4, 4)
    assert _rms_norm(plain) is plain  # not an HF RMSNorm: run as is
    half = dec.head_dim // 2
    pos = torch.tensor([[0, 1, 63, 200]])
    cos, sin = dec.cos[pos][:, None], dec.sin[pos][:, None]
    plain_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # the model's own sine
    x = torch.randn(1, dec.n_heads, 4, dec.head_dim, generator=gen).to(dtype)
    textbook = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * plain_sin
    assert torch.equal(_rotate(x, cos, sin), textbook)
    _, ref_sin = model.model.rotary_emb(torch.zeros(1, dtype=dtype), pos)
    assert torch.equal(plain_sin[0, 0], ref_sin[0])


def test_supported_families(tiny_lm, smollm2_lm):
    assert supports_static(tiny_lm.model) and supports_static(smollm2_lm.model)  # gpt2, llama
    assert not supports_static(torch.nn.Linear(2, 2))  # no config: the eager runner
