"""Shared prefix blocks (ralmspec/lm/prefix_cache.py): the KV of canonical prompt blocks reused
across sessions. The contract: outputs with the table == outputs without it, bit for bit (greedy
tokens and the logits themselves), on the eager and the static runner, the tiny LM and SmolLM2;
blocks are really reused (a passage another session prefilled, a passage switched back to);
the table is bounded, keyed by the thread count, cleared by the engine's cold start."""

from __future__ import annotations

import random

import pytest
import torch

from ralmspec.errors import ConfigError
from ralmspec.lm.models import load_lm
from ralmspec.lm.prefix_cache import PrefixBlocks


def test_table_is_an_lru_bounded_by_bytes():
    t = PrefixBlocks(100)
    t.put(1, [1, 2], "a", 40)
    t.put(1, [1, 3], "b", 40)
    assert t.get(1, [1, 2]) == "a" and t.get(2, [1, 2]) is None  # another thread count: not the same block
    t.put(1, [1, 4], "c", 40)  # over 100 bytes: the least recently used ([1, 3]) goes
    assert t.get(1, [1, 3]) is None and t.get(1, [1, 2]) == "a" and t.get(1, [1, 4]) == "c"
    assert t.nbytes == 80 and len(t) == 2 and t.hits == 3
    t.put(1, [9], "huge", 101)  # larger than the whole table: not kept, nothing evicted
    assert t.get(1, [9]) is None and len(t) == 2
    t.clear()
    assert len(t) == 0 and t.nbytes == 0
    assert not PrefixBlocks(0).enabled
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="prefix cache"):
            PrefixBlocks(bad)


def prompts(seed: int, passages: int = 2, per_passage: int = 4) -> list[list[int]]:
    """Prompts shaped like the RaLM layout: a shared passage first, then a question + answer."""
    rng = random.Random(seed)
    out = []
    for _ in range(passages):
        passage = [rng.randrange(5, 1000) for _ in range(rng.randrange(130, 260))]
        out += [passage + [rng.randrange(5, 1000) for _ in range(rng.randrange(1, 100))] for _ in range(per_passage)]
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("runner", ["eager", "static"])
def test_shared_blocks_give_the_same_tokens_and_logits_bit_for_bit(runner):
    on, off = load_lm("tiny", runner=runner), load_lm("tiny", runner=runner, prefix_cache_bytes=0)
    for i, p in enumerate(prompts(seed=7)):
        session = f"s{i % 3}"  # sessions change prompts: their own reuse is partial at best
        assert on.generate([p], 6, sessions=[session]) == off.generate([p], 6, sessions=[session])
        assert torch.equal(on.next_token_states([p])[0].logits, off.next_token_states([p])[0].logits)
    # a prompt that ends on a block boundary computes its last block with the LM head on (the
    # logits): that block, exported, must serve a longer prompt exactly as a computed one
    whole = prompts(seed=8, passages=1, per_passage=1)[0][:128]
    for p in (whole, whole + [17, 18, 19]):
        assert torch.equal(on.next_token_states([p])[0].logits, off.next_token_states([p])[0].logits)
    assert on.last_call_stats.shared_tokens == 128  # both blocks imported, the 2nd computed as a last block
    assert on.shared_tokens > 0 and off.shared_tokens == 0
    assert on.prefill_tokens_computed < off.prefill_tokens_computed  # the table saved forwards
    assert len(off.prefix_blocks) == 0 and len(on.prefix_blocks) > 0


def test_a_passage_switched_back_to_is_not_prefilled_again():
    lm = load_lm("tiny", runner="eager")
    rng = random.Random(3)
    p1, p2 = ([rng.randrange(5, 1000) for _ in range(200)] for _ in range(2))
    question = [rng.randrange(5, 1000) for _ in range(20)]
    for passage in (p1, p2):
        lm.generate([passage + question], 4, sessions=["req"])
    before = lm.shared_tokens
    lm.generate([p1 + question], 4, sessions=["req"])  # the session holds p2's blocks; the table p1's
    assert lm.last_call_stats.shared_tokens == lm.shared_tokens - before == 192  # 3 full blocks of 64
    assert lm.last_call_stats.prefill_tokens_computed == len(p1) + len(question) - 192


def test_blocks_of_another_thread_count_are_not_reused():
    lm = load_lm("tiny", runner="eager")
    p = prompts(seed=11, passages=1, per_passage=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        lm.generate([p[0]], 2, sessions=["a"])
        torch.set_num_threads(2 if before == 1 else before)
        if torch.get_num_threads() == 1:
            pytest.skip("this machine runs torch on one thread only")
        lm.generate([p[1]], 2, sessions=["b"])
        assert lm.last_call_stats.shared_tokens == 0
    finally:
        torch.set_num_threads(before)


def test_smollm2_shared_blocks_equal_no_sharing(smollm2_lm):
    """The real model and real chat-shaped prompts: the table on == off, logits bit for bit."""
    lm = smollm2_lm
    tok = lm.tokenizer
    passage = tok.encode("Hed PE is an American rock band from Huntington Beach, California, formed in 1994. "
                         "Their music mixes punk, hip hop and reggae; they call their style G-punk. " * 6)
    questions = [tok.encode(q) for q in ("Where is Hed PE from?", "When was the band formed?")]
    saved = lm.prefix_blocks.capacity_bytes
    try:
        lm.clear_prefix_cache()
        want = [lm.next_token_states([passage + q])[0].logits for q in questions]  # the 2nd reuses the 1st's blocks
        assert lm.last_call_stats.shared_tokens > 0
        lm.clear_prefix_cache()
        lm.prefix_blocks.capacity_bytes = 0
        got = [lm.next_token_states([passage + q])[0].logits for q in questions]
        assert lm.last_call_stats.shared_tokens == 0
    finally:
        lm.prefix_blocks.capacity_bytes = saved
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_engine_cold_start_clears_the_table(small_indexes, tiny_lm):
    from ralmspec.config import EngineConfig, GenerationConfig
    from ralmspec.engine.core import RalmEngine

    engine = RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())
    engine.generate_sync("who wrote hamlet", gen=GenerationConfig(max_new_tokens=4, passage_tokens=200),
                         speculate=False)
    assert len(tiny_lm.prefix_blocks) > 0
    engine.reset_caches()
    assert len(tiny_lm.prefix_blocks) == 0
