"""The static LM runner (ralmspec/lm/static.py) against the eager one, and its own invariants.

Static == eager token for token (greedy and seeded sampling, tiny GPT-2 and the real SmolLM2
Llama), with sessions that are rolled back at random points and prefixes reused; reuse ==
no reuse bit for bit inside the static runner; the slot pool evicts without changing outputs;
and the engine's speculative loop on the static runner equals its naive loop, with speculation
and rollbacks asserted to have happened.
"""

from __future__ import annotations

import random

import pytest
import torch

from ralmspec.errors import ConfigError
from ralmspec.lm.hf import CallStats, HFLanguageModel, make_runner
from ralmspec.lm.sampling import Sampling, SeededPick
from ralmspec.lm.slot_decoder import attention_span
from ralmspec.lm.static import StaticRunner
from tests.lm.conftest import (HostDrawForbidden, logits_each_and_one_by_one, make_view, random_tokens,
                               speculative_equals_naive, with_layout)


def padded(lm: HFLanguageModel) -> HFLanguageModel:
    """``lm`` (a static-runner backend) with every aligned prompt block padded to ``block_size``
    rows, as on CUDA (where each block is then a captured graph): forced here on the CPU."""
    return with_layout(lm, prefill_rows=lm.block_size)


@pytest.fixture(scope="module", params=["static", "static, padded prompt blocks", "static, draws on the device"])
def pair(tiny_lm, request):
    """(eager, static) backends over the same tiny weights, block size 16; the static one also
    with its prompt blocks padded (``prefill_rows``, CUDA's layout), and with its seeded draws
    on the device (``device_sampling``, CUDA's default), both forced here on the CPU."""
    static = make_view(tiny_lm, block_size=16, runner="static")
    static.runner.device_sampling = "device" in request.param
    return make_view(tiny_lm, block_size=16, runner="eager"), padded(static) if "padded" in request.param else static


def test_static_equals_eager_greedy_with_rollbacks_and_reuse(pair):
    """An engine-like session: the prompt grows by the generated chunk, is cut back at random
    points (rollbacks) and its passage is swapped (prefix changes); every call's tokens are the
    same on both runners, and the static runner did reuse its slot."""
    eager, static = pair
    rng = random.Random(7)
    reused = 0
    for trial in range(6):
        passage, question = random_tokens(rng, rng.randrange(20, 120)), random_tokens(rng, 12)
        answer: list[int] = []
        for step in range(10):
            if answer and rng.random() < 0.3:  # roll back to a random point
                answer = answer[:rng.randrange(len(answer))]
            if rng.random() < 0.15:  # a passage switch: the prefix changes
                passage = random_tokens(rng, rng.randrange(20, 120))
            prompt = passage + question + answer
            n = rng.choice((1, 2, 4, 7))
            a = eager.greedy([prompt], n, [f"e{trial}"])[0]
            b = static.greedy([prompt], n, [f"s{trial}"])[0]
            assert a == b, (trial, step, len(prompt))
            reused += static.last_call_stats.reused_tokens
            answer += b
    assert reused > 0, "the static runner never reused a slot: the reuse path is untested"
    assert static.runner.prefill_rows is None or static.runner.padded_blocks > 0


@pytest.mark.parametrize("pad", [False, True])
def test_static_reuse_equals_no_reuse_bitwise(tiny_lm, pad):
    """Logits and hidden state at a prompt's last position are the same bits whatever the
    slot held before (the canonical-block argument, ralmspec/lm/hf.py); prompt blocks padded too."""
    lm = make_view(tiny_lm, block_size=16, runner="static")
    lm = padded(lm) if pad else lm
    rng = random.Random(3)
    base = random_tokens(rng, 90)
    target = base + random_tokens(rng, 9)
    cold = lm.next_token_states([target])[0]  # no session: computed from scratch
    histories = {"longer": base + random_tokens(rng, 40), "shorter": base[:33], "other": random_tokens(rng, 70)}
    for name, hist in histories.items():
        lm.greedy([hist], 5, [name])
        warm = lm.next_token_states([target], [name])[0]
        assert torch.equal(warm.logits, cold.logits), name
        assert torch.equal(warm.hidden, cold.hidden), name
        if name != "other":
            assert lm.last_call_stats.reused_tokens > 0, name


def test_static_equals_eager_seeded_sampling(pair):
    eager, static = pair
    rng = random.Random(11)
    for i in range(4):
        prompt = random_tokens(rng, rng.randrange(10, 80))
        s = Sampling(temperature=0.9, top_p=0.95, seed=1000 + i, start=rng.randrange(5))
        a = eager.generate([prompt], 12, [f"e{i}"], [s])[0]
        b = static.generate([prompt], 12, [f"s{i}"], [s])[0]
        assert a == b
        # and the draw is reproducible from a reused slot
        assert static.generate([prompt], 12, [f"s{i}"], [s])[0] == b


@pytest.mark.parametrize("runner", ["static", "batched"])
def test_device_sampling_never_draws_on_the_host(tiny_lm, runner):
    """With ``device_sampling`` a sampled chunk is chosen like a greedy one (tokens fed back on
    the device, read once per ``decode_sync_every`` steps): the pick's host draw is never called,
    and the tokens are the host draw's (the eager runner's), a stop token included."""
    lm = make_view(tiny_lm, block_size=16, runner=runner)
    lm.runner.device_sampling = True
    eager = make_view(tiny_lm, block_size=16, runner="eager")
    rng = random.Random(13)
    for i in range(3):
        prompt = random_tokens(rng, rng.randrange(10, 60))
        s = Sampling(temperature=1.0, top_p=(1.0, 0.9, 0.5)[i], seed=77 + i, start=i)
        want = eager.generate([prompt], 20, None, [s])[0]
        stop = frozenset({want[7]})
        with torch.inference_mode():
            first, _, kv = lm._prefill(prompt, None, CallStats())  # the backend's aligned blocks
            got = lm.runner.decode(kv, first, 20, HostDrawForbidden(s), stop)
        lm.runner.free(kv)
        assert got.tokens == want[:want.index(want[7]) + 1], i


@pytest.mark.parametrize("runner", ["eager", "static", "batched"])
def test_step_logits_each_is_step_logits_token_by_token(tiny_lm, runner):
    """Logprobs replay decoding with ``step_logits_each`` (the static runners keep its tokens and
    rows on the device): its rows are, bit for bit, ``step_logits`` fed the tokens one by one."""
    lm = make_view(tiny_lm, block_size=16, runner=runner)
    rng = random.Random(17)
    toks = random_tokens(rng, 9)
    each, one = logits_each_and_one_by_one(lm, random_tokens(rng, 40), toks)
    assert each.shape == (len(toks), one[0].shape[0])
    assert all(torch.equal(each[i], one[i]) for i in range(len(toks)))


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("runner", ["eager", "static", "batched"])
def test_decode_keeps_the_logits_it_chose_from(tiny_lm, runner, sampled):
    """``keep_logits``: a chunk returns, per token, the logits it was chosen from (the first from
    the prefill), up to and including a stop token: bit for bit what ``step_logits`` replays."""
    lm = make_view(tiny_lm, block_size=16, runner=runner)
    rng = random.Random(29)
    prompt = random_tokens(rng, 50)
    s = Sampling(0.9, 0.9, 3, logprobs=1) if sampled else Sampling(logprobs=1)
    free = lm.generate([prompt], 12, None, [s])[0]
    with torch.inference_mode():
        first, _, kv = lm._prefill(prompt, None, CallStats())
        chunk = lm.runner.decode(kv, first, 12, SeededPick(s) if sampled else None, frozenset({free[6]}),
                                 keep_logits=True)
        lm.runner.free(kv)
    assert chunk.tokens == free[:free.index(free[6]) + 1]
    _, one = logits_each_and_one_by_one(lm, prompt, chunk.tokens[:-1])
    assert chunk.logits is not None and chunk.logits.shape[0] == len(chunk.tokens)
    assert torch.equal(chunk.logits[0], first)
    assert all(torch.equal(chunk.logits[i + 1], row) for i, row in enumerate(one))


def test_slot_pool_evicts_least_recently_used_without_changing_outputs(tiny_lm):
    lm = make_view(tiny_lm, block_size=8, runner="static")
    lm.runner = StaticRunner(tiny_lm.model, max_len=256, capacity=2)  # two slots only
    ref = make_view(tiny_lm, block_size=8, runner="eager")
    rng = random.Random(5)
    prompts = {name: random_tokens(rng, 40) for name in "abc"}
    for name in "abcab":
        assert lm.greedy([prompts[name]], 3, [name]) == ref.greedy([prompts[name]], 3)
    assert lm.cached_sessions == 2 and lm.cached_length("c") == 0  # "c" was the oldest
    d = lm.runner.decoder  # /v1/stats memory: both slots allocated once, K and V of every layer
    slot_bytes = 2 * len(d.layers) * d.n_kv * 256 * d.head_dim * torch.empty(0, dtype=d.dtype).element_size()
    mem = lm.memory()
    assert mem["runner_kv_bytes"] == 2 * slot_bytes and mem["sessions"] == 2
    assert mem["prefix_bytes"] <= mem["prefix_capacity_bytes"] and mem["scored_chunks"] == 0
    assert make_view(tiny_lm, runner="eager").memory()["runner_kv_bytes"] == 0  # eager: in the sessions
    lm.release("a")
    assert lm.cached_sessions == 1 and len(lm.runner._free) == 1
    lm.close()
    assert lm.cached_sessions == 0 and len(lm.runner._free) == 2


@pytest.mark.parametrize("batch_rows", [1, 2], ids=["own buffers", "pooled"])
def test_a_slot_is_freed_once_by_its_holder(tiny_lm, batch_rows):
    """A second free of a slot, or a free through an earlier holder's handle or one from before
    ``close``, leaves the pool as it is. A double free put the slot in the pool twice, so the
    next two sessions were handed one slot and wrote each other's KV (wrong tokens, no error)."""
    runner = StaticRunner(tiny_lm.model, max_len=64, capacity=3, batch_rows=batch_rows)
    a = runner.open()
    runner.free(a)
    runner.free(a)  # twice
    b, c = runner.open(), runner.open()
    assert b.index != c.index
    runner.free(a)  # an earlier holder's handle on the slot ``b`` or ``c`` holds now
    assert {b.index, c.index}.isdisjoint(runner._free)
    d = runner.open()
    assert len({b.index, c.index, d.index}) == 3 and runner.open() is None  # three slots, three holders
    b.length = 5
    runner.close()
    runner.free(b)  # from before ``close``
    assert sorted(runner._free) == [0, 1, 2]
    e = runner.open()
    assert e.length == 0 and e is not b


def test_batch_of_prompts_equals_each_alone(pair):
    _, static = pair
    rng = random.Random(9)
    prompts = [random_tokens(rng, rng.randrange(5, 70)) for _ in range(5)]
    together = static.greedy(prompts, 6, [f"b{i}" for i in range(5)])
    assert together == [static.greedy([p], 6)[0] for p in prompts]


def test_max_context_is_capped_by_the_slot_length(tiny_lm):
    lm = make_view(tiny_lm, runner="static")
    assert lm.max_context == min(tiny_lm.max_context, lm.runner.max_len)
    with pytest.raises(ConfigError, match="max_context"):
        lm.greedy([[1000] * lm.max_context], 1)


def test_runner_names_are_checked(tiny_lm):
    with pytest.raises(ConfigError, match="runner"):
        make_runner(tiny_lm.model, "fast", max_len=64, device=torch.device("cpu"))
    assert make_runner(tiny_lm.model, "auto", max_len=64, device=torch.device("cpu")).name == "eager"
    # a server's LM (concurrent requests): the batched runner on the CPU
    served = make_runner(tiny_lm.model, "auto", max_len=64, device=torch.device("cpu"), concurrent=True)
    assert served.name == "batched" and served.batch_rows > 1


def test_unsupported_family_is_refused_with_the_way_out(tiny_lm):
    class Other(torch.nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="--lm-runner eager"):
        StaticRunner(Other(), max_len=64, capacity=1)
    # "auto" keeps such a model on the eager runner
    assert make_runner(Other(), "auto", max_len=64, device=torch.device("cuda")).name == "eager"
    assert make_runner(Other(), "auto", max_len=64, device=torch.device("cpu"), concurrent=True).name == "eager"


class AttentionLayouts:
    """Counts the query shapes SDPA is called with (``monkeypatch``: the packed single row of a
    SmolLM2 step is ``[1, 3, 3, 64]``, its repeated-KV prompt block ``[1, 9, t, 64]`` with 9 K heads)."""

    def __init__(self, monkeypatch):
        import torch.nn.functional as F

        self.packed = self.repeated = self.grouped = 0
        real = F.scaled_dot_product_attention

        def spy(q, k, v, *args, enable_gqa=False, **kw):
            self.packed += q.shape[1] == k.shape[1] == 3 and q.shape[2] == 3
            self.repeated += q.shape[1] == k.shape[1] == 9
            self.grouped += bool(enable_gqa)
            return real(q, k, v, *args, enable_gqa=enable_gqa, **kw)
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)


@pytest.mark.parametrize("layout", ["cpu", "cuda attention"])
def test_smollm2_static_equals_eager(smollm2_lm, layout, monkeypatch):
    """The real default model (a Llama, grouped-query attention): the static runner gives the
    eager runner's tokens; also with the attention laid out as on CUDA (packed heads for a
    decode row, repeated K and V for a prompt block), asserted to have run."""
    static = HFLanguageModel(smollm2_lm.model, smollm2_lm.tokenizer, eos_token_id=smollm2_lm.eos_token_id,
                             stop_token_ids=smollm2_lm.stop_token_ids, max_context=smollm2_lm.max_context,
                             runner="static")
    if layout == "cuda attention":
        static = with_layout(static, cuda_attention=True)  # packed heads, repeated K and V
    calls = AttentionLayouts(monkeypatch)
    tok = smollm2_lm.tokenizer
    texts = ["The capital of France is", "Hed PE is an American rock band from",
             "Photosynthesis converts light energy into"]
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        a = smollm2_lm.greedy([ids], 12)[0]
        b = static.greedy([ids], 12, [f"s{i}"])[0]
        assert a == b, text
        cont = ids + b[:5]  # a rollback into the generated part, on the same slot
        assert smollm2_lm.greedy([cont], 6)[0] == static.greedy([cont], 6, [f"s{i}"])[0]
    if layout == "cuda attention":
        assert calls.packed > 0 and calls.repeated > 0, vars(calls)
    else:
        assert calls.packed == calls.repeated == 0 and calls.grouped > 0


def test_engine_speculative_equals_naive_with_cuda_attention(smollm2_lm, small_indexes, monkeypatch):
    """The RaLM loop on SmolLM2's static runner with the attention laid out as on CUDA:
    speculative == naive, speculation, rollbacks and the packed layout ran."""
    lm = with_layout(make_view(smollm2_lm, runner="static"), cuda_attention=True)
    calls = AttentionLayouts(monkeypatch)
    seen = speculative_equals_naive(lm, small_indexes["exact"], 3)
    assert seen["speculated"] > 0 and seen["rollbacks"] > 0, seen
    assert calls.packed > 0 and calls.grouped == 0


@pytest.mark.parametrize("pad", [False, True])
def test_engine_speculative_equals_naive_on_the_static_runner(tiny_lm, small_indexes, pad):
    """The RaLM loop on the static runner (prompt blocks padded too): speculative == naive,
    speculation and rollbacks ran."""
    lm = make_view(tiny_lm, runner="static")
    lm = padded(lm) if pad else lm
    seen = speculative_equals_naive(lm, small_indexes["exact"], 8)
    assert seen["speculated"] > 0 and seen["rollbacks"] > 0, seen
    assert (lm.runner.padded_blocks > 0) == pad


def test_step_hidden_is_a_one_token_prefill_bit_for_bit(tiny_lm):
    """kNN-LM's step (``step_hidden``): on the static runner it runs the 1-row decode step (a
    CUDA graph on CUDA) and gives, bit for bit, the logits and final hidden state of a one-token
    ``prefill_block``, the base contract, at every span; and the slot ends where it would."""
    a = StaticRunner(tiny_lm.model, max_len=256, capacity=1)
    b = StaticRunner(tiny_lm.model, max_len=256, capacity=1)
    rng = random.Random(12)
    prompt = random_tokens(rng, 60)
    with torch.inference_mode():
        sa, sb = a.open(), b.open()
        a.prefill_block(sa, prompt, last=True, want_hidden=True)
        b.prefill_block(sb, prompt, last=True, want_hidden=True)
        for tok in random_tokens(rng, 80):  # positions 60..139: spans 64, 128, 256
            _, la, ha = a.step_hidden(sa, tok)
            _, lb, hb = b.prefill_block(sb, [tok], last=True, want_hidden=True)
            assert torch.equal(la, lb) and torch.equal(ha, hb)
        assert sa.length == sb.length == 140


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_a_padded_blocks_rows_are_the_full_blocks_rows(model, tiny_lm, smollm2_lm):
    """Why padding a prompt block is sound (and capturable): a block of t < B tokens run as a
    B-row forward (padding rows after it) gives its t rows exactly the KV and final hidden
    states they get when the whole block is run, bit for bit; so a block's bits do not depend
    on how many of its tokens a call holds."""
    lm = {"tiny": tiny_lm, "smollm2": smollm2_lm}[model]
    B = 64
    runner = StaticRunner(lm.model, max_len=256, capacity=2, prefill_rows=B)
    d, rng = runner.decoder, random.Random(4)
    prefix, block = random_tokens(rng, B), random_tokens(rng, B)
    with torch.inference_mode():
        for t in (1, 7, 33, 63):
            full, part = runner.open(), runner.open()
            for slot in (full, part):
                runner.prefill_block(slot, prefix, last=False, want_hidden=False)
            whole = d.forward([full], torch.tensor([block]), torch.arange(B, 2 * B)[None], [attention_span(2 * B, 256)])
            _, _, hidden = runner.prefill_block(part, block[:t], last=True, want_hidden=True)
            assert torch.equal(hidden, whole[0, t - 1]), t
            for layer in range(len(full.keys)):
                assert torch.equal(full.keys[layer][:, :, B:B + t], part.keys[layer][:, :, B:B + t]), (t, layer)
                assert torch.equal(full.values[layer][:, :, B:B + t], part.values[layer][:, :, B:B + t]), (t, layer)
            runner.free(full)
            runner.free(part)
    assert runner.padded_blocks == 2 * 4 + 4  # the prefixes (full blocks) and the tails, all padded
