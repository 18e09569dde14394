"""Fixtures of the HF backend tests: one tiny random GPT-2 shared by all, viewed with several
block sizes (an ``HFLanguageModel`` is a thin stateful wrapper around the shared torch module)."""

from __future__ import annotations

import random

import pytest
import torch

from ralmspec.lm.hf import CallStats, HFLanguageModel
from ralmspec.lm.sampling import SeededPick
from ralmspec.lm.static import StaticRunner


def small_model(family: str, *, vocab: int = 512, hidden: int = 64, heads: int = 4, scale: float = 8.0,
                **config) -> torch.nn.Module:
    """A small random-weight causal LM of the real transformers class of ``family`` (a
    ``model_type``: "llama", "qwen2", "mistral", "granite", ...; "gpt2" in GPT-2's field names),
    2 layers (GPT-2: 3) with 2 KV heads, its matrices scaled by ``scale`` so that greedy tokens
    vary (a near-uniform model answers one token and proves nothing); ``config`` overrides the
    config's fields. A user's own checkpoint, as far as the runners can tell."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        base = dict(vocab_size=vocab, n_embd=hidden, n_layer=3, n_head=heads, n_positions=512,
                    bos_token_id=0, eos_token_id=0)
    else:
        base = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                    num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **(base | config)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return model.eval()


def make_view(lm: HFLanguageModel, **overrides) -> HFLanguageModel:
    """A fresh backend (own sessions and counters) around the same weights as ``lm``."""
    kw = dict(eos_token_id=lm.eos_token_id, max_context=lm.max_context, device=lm.device,
              block_size=lm.block_size, name=lm.name)
    kw.update(overrides)
    return HFLanguageModel(lm.model, lm.tokenizer, **kw)


def with_layout(lm: HFLanguageModel, **layout) -> HFLanguageModel:
    """``lm`` (a static-runner backend) with its runner rebuilt over the same model, slot length,
    slots and step rows, and CUDA's layout choices (``StaticRunner`` keywords: ``prefill_rows``,
    ``cuda_attention``) forced here on the CPU."""
    r = lm.runner
    lm.runner = StaticRunner(r.decoder.model, max_len=r.max_len, capacity=r.capacity, batch_rows=r.batch_rows,
                             **layout)
    return lm


class HostDrawForbidden(SeededPick):
    """A seeded pick whose host draw fails the test: a runner that draws on the device never calls it."""

    def __call__(self, logits, i):
        raise AssertionError("a seeded token was drawn on the host")


def logits_each_and_one_by_one(lm: HFLanguageModel, prompt: list[int],
                               toks: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """After ``prompt``'s canonical prefill (twice, each into a fresh handle): the rows of
    ``runner.step_logits_each(toks)`` and those of ``step_logits`` fed ``toks`` one by one."""
    with torch.inference_mode():
        _, _, kv = lm._prefill(prompt, None, CallStats())
        kv, each = lm.runner.step_logits_each(kv, toks)
        lm.runner.free(kv)
        _, _, kv = lm._prefill(prompt, None, CallStats())
        one = []
        for t in toks:
            kv, row = lm.runner.step_logits(kv, t)
            one.append(row)
        lm.runner.free(kv)
    return each, one


def prefill_waves(runner: StaticRunner, group: list[list[int]],
                  heads: list[int]) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Prefill each prompt of ``group`` into a fresh slot: its first ``heads[i]`` blocks alone, one
    ``prefill_block`` each (a session's history), then the rest in waves of ``prefill_blocks``
    (the next block of every prompt that still needs one, as ``HFLanguageModel`` does for a
    runner that ``prefills_together``). Returns each prompt's last logits and its KV (keys then
    values per layer, ``[kv_heads, length, hd]``); the slots are freed."""
    B = runner.prefill_rows
    assert B is not None
    slots = [runner.open() for _ in group]
    for slot, p, h in zip(slots, group, heads):
        for j in range(h):
            runner.prefill_block(slot, p[j * B:(j + 1) * B], last=False, want_hidden=False)
    starts = [h * B for h in heads]
    last: list = [None] * len(group)
    while any(st < len(p) for st, p in zip(starts, group)):
        todo = [i for i, p in enumerate(group) if starts[i] < len(p)]
        ends = [min(starts[i] + B, len(group[i])) for i in todo]
        outs = runner.prefill_blocks([slots[i] for i in todo], [group[i][starts[i]:e] for i, e in zip(todo, ends)],
                                     [e == len(group[i]) for i, e in zip(todo, ends)], want_hidden=False)
        for i, e, (_, logits, _) in zip(todo, ends, outs):
            starts[i], last[i] = e, logits if logits is not None else last[i]
    got = [(last[i], [k[0, :, :len(p)].clone() for k in slots[i].keys + slots[i].values]) for i, p in enumerate(group)]
    for slot in slots:
        runner.free(slot)
    return got


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


def speculative_equals_naive(lm: HFLanguageModel, retriever, n_questions: int) -> dict[str, int]:
    """The RaLM loop on ``lm``: for each of the first ``n_questions`` default questions, the
    speculative answer (fixed stride 3, no OS^3, async on every other question, prefetch 1 / 20)
    must be the naive answer token for token; returns the speculated steps and rollbacks seen."""
    import asyncio

    from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
    from ralmspec.data.loaders import default_questions
    from ralmspec.engine.core import RalmEngine

    engine = RalmEngine(lm, retriever, EngineConfig())
    gen = GenerationConfig(stride=2, query_len=16, max_new_tokens=16, passage_tokens=64)
    seen = {"speculated": 0, "rollbacks": 0}

    async def go():
        for i, q in enumerate(q.question for q in default_questions()[:n_questions]):
            naive = await engine.generate(q, gen=gen, speculate=False)
            spec = SpeculationConfig(os3=False, fixed_stride=3, naive_fallback=False, cache_capacity=4,
                                     async_verify=bool(i % 2), prefetch=(1, 20)[i % 2])
            res = await engine.generate(q, gen=gen, spec=spec, speculate=True)
            assert res.token_ids == naive.token_ids, q
            seen["speculated"] += res.stats["speculated"]
            seen["rollbacks"] += res.stats["rollbacks"]

    asyncio.run(go())
    return seen


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
