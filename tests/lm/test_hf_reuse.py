"""Canonical block prefill: session reuse never changes a bit of the output.

The prompt sequences mimic the engine (docs/design.md §1): passage + context growing by ``stride``
tokens, passage switches, rollbacks to a shorter context, and two requests interleaved on one
backend. Every reused call is compared with a call without reuse (``sessions=None``), token for
token, and (through ``next_token_states``) logit for logit, bit for bit. The counters prove that
reuse actually happened, so the equalities are not trivially true.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.concurrent import raised, run_together
from tests.lm.conftest import random_tokens

STRIDE = 4


def engine_like_steps(rng: random.Random, n_steps: int, max_passage: int = 120):
    """Yield prompts shaped like the RaLM loop: passage + question + generated context.

    The generated context is fed back by the caller through ``send``.
    """
    passage = random_tokens(rng, rng.randrange(20, max_passage))
    ctx = random_tokens(rng, rng.randrange(5, 30))
    marks = [len(ctx)]
    for _ in range(n_steps):
        r = rng.random()
        if r < 0.25:  # the knowledge base returned another passage
            passage = random_tokens(rng, rng.randrange(20, max_passage))
        elif r < 0.40 and len(marks) > 1:  # a speculation mismatch: roll back, other passage
            ctx = ctx[: rng.choice(marks)]
            passage = random_tokens(rng, rng.randrange(20, max_passage))
        elif r < 0.50 and len(marks) > 1:  # roll back, same passage (discarded async work)
            ctx = ctx[: rng.choice(marks)]
        new = yield passage + ctx
        ctx = ctx + new
        marks.append(len(ctx))


def run_sequence(lm, rng: random.Random, session, n_steps: int, max_passage: int = 120) -> int:
    """Drive one engine-like request, checking each reused call against a fresh one."""
    gen = engine_like_steps(rng, n_steps, max_passage)
    prompt = next(gen)
    reused = 0
    try:
        while True:
            got = lm.greedy([prompt], STRIDE, sessions=[session])[0]
            reused += lm.last_call_stats.reused_tokens
            want = lm.greedy([prompt], STRIDE)[0]
            assert got == want, f"reuse changed the output for a prompt of {len(prompt)} tokens"
            assert lm.last_call_stats.reused_tokens == 0
            prompt = gen.send(got)
    except StopIteration:
        pass
    return reused


@pytest.mark.parametrize("block_size, max_passage, seeds", [(3, 30, 1), (5, 60, 1), (16, 250, 2)])
def test_engine_like_sequence_reuse_equals_no_reuse(fresh, block_size, max_passage, seeds):
    lm = fresh(block_size=block_size)
    total_reused = sum(run_sequence(lm, random.Random(seed), f"req{seed}", n_steps=10, max_passage=max_passage)
                       for seed in range(seeds))
    assert total_reused > 0  # reuse really happened
    assert lm.reused_tokens == total_reused


def test_two_sessions_randomly_interleaved(fresh):
    lm = fresh(block_size=8)
    rng = random.Random(7)
    gens = {s: engine_like_steps(random.Random(100 + i), 10) for i, s in enumerate(("a", "b"))}
    prompts = {s: next(g) for s, g in gens.items()}
    reused = 0
    while gens:
        s = rng.choice(sorted(gens))
        got = lm.greedy([prompts[s]], STRIDE, sessions=[s])[0]
        reused += lm.last_call_stats.reused_tokens
        assert got == lm.greedy([prompts[s]], STRIDE)[0]
        try:
            prompts[s] = gens[s].send(got)
        except StopIteration:
            del gens[s]
    assert reused > 0


def test_one_session_shared_by_unrelated_prompts(fresh):
    """A session id reused for another request only costs reuse, never correctness."""
    lm = fresh(block_size=16)
    rng = random.Random(3)
    for _ in range(6):
        p = random_tokens(rng, rng.randrange(10, 200))
        assert lm.greedy([p], 6, sessions=["x"]) == lm.greedy([p], 6)


@pytest.mark.parametrize("block_size", [16, 64])
def test_logits_and_hidden_bitwise_equal_after_different_histories(fresh, block_size):
    lm = fresh(block_size=block_size)
    rng = random.Random(11)
    passage = random_tokens(rng, 150)
    ctx = random_tokens(rng, 37)
    target = passage + ctx
    ref = lm.next_token_states([target])[0]
    other_passage = random_tokens(rng, 140)
    histories = {
        "grown by 4": [passage + ctx[:-4]],
        "grown step by step": [passage + ctx[:k] for k in range(5, len(ctx), 4)],
        "rolled back from longer": [target + random_tokens(rng, 30)],
        "same prompt twice": [target],
        "other passage": [other_passage + ctx],
        "prefix shares a partial block": [target[:-1]],
    }
    for name, history in histories.items():
        session = f"h-{name}"
        for h in history:
            lm.greedy([h], 4, sessions=[session])
        got = lm.next_token_states([target], sessions=[session])[0]
        if name != "other passage":
            assert lm.last_call_stats.reused_tokens > 0, name
        assert torch.equal(got.logits, ref.logits), f"logits differ after history {name!r}"
        assert torch.equal(got.hidden, ref.hidden), f"hidden state differs after history {name!r}"


def test_first_greedy_token_is_argmax_of_next_token_logits(tiny):
    rng = random.Random(5)
    for _ in range(3):
        p = random_tokens(rng, rng.randrange(3, 90))
        state = tiny.next_token_states([p], hidden=False)[0]
        assert state.hidden is None
        assert tiny.greedy([p], 1)[0] == [int(torch.argmax(state.logits))]


def test_reuse_counters_follow_block_rule(fresh):
    """Reuse = longest common prefix rounded down to a block, never the last position's block."""
    B = 16
    lm = fresh(block_size=B)
    rng = random.Random(2)
    p = random_tokens(rng, 300)
    lm.greedy([p], 4, sessions=["s"])
    st = lm.last_call_stats
    assert (st.reused_tokens, st.prefill_tokens_computed, st.prefill_forwards, st.decode_steps) == (0, 300, 19, 3)
    assert lm.cached_length("s") == 288  # 18 full blocks; the partial block is not kept

    p2 = p + random_tokens(rng, 4)  # the engine's usual next call
    lm.greedy([p2], 4, sessions=["s"])
    st = lm.last_call_stats
    assert (st.reused_tokens, st.prefill_tokens_computed, st.prefill_forwards) == (288, 16, 1)
    assert lm.cached_length("s") == 304

    lm.greedy([p2], 4, sessions=["s"])  # same prompt again: the last block is recomputed
    assert (lm.last_call_stats.reused_tokens, lm.last_call_stats.prefill_tokens_computed) == (288, 16)

    lm.greedy([p[:250]], 4, sessions=["s"])  # rollback
    assert (lm.last_call_stats.reused_tokens, lm.last_call_stats.prefill_tokens_computed) == (240, 10)

    q = [p[0] + 1] + p[1:]  # passage switch: first token differs
    lm.greedy([q], 4, sessions=["s"])
    assert lm.last_call_stats.reused_tokens == 0
    assert lm.last_call_stats.prefill_tokens_computed == 300


def test_batch_invariance_and_duplicate_sessions(fresh):
    lm = fresh(block_size=8)
    rng = random.Random(9)
    ps = [random_tokens(rng, n) for n in (7, 64, 131)]
    alone = [lm.greedy([p], 5)[0] for p in ps]
    assert lm.greedy(ps, 5) == alone
    assert lm.greedy(ps, 5, sessions=["a", "b", "c"]) == alone
    assert lm.greedy(ps[::-1], 5, sessions=["c", "b", "a"]) == alone[::-1]
    grown = ps[2] + alone[2]
    got = lm.greedy([ps[2], grown], 5, sessions=["d", "d"])
    assert lm.last_call_stats.reused_tokens == 128  # the 2nd prompt reused the 1st's blocks
    assert got == [alone[2], lm.greedy([grown], 5)[0]]


def test_session_table_lru_release_and_byte_budget(fresh):
    lm = fresh(block_size=4, max_sessions=2)
    rng = random.Random(4)
    ps = {s: random_tokens(rng, 40) for s in "abc"}
    for s in "abc":
        lm.greedy([ps[s]], 2, sessions=[s])
    assert lm.cached_sessions == 2 and lm.cached_length("a") == 0 and lm.cached_length("c") == 40
    lm.greedy([ps["b"]], 2, sessions=["b"])  # touch b: c is now the oldest
    lm.greedy([ps["a"]], 2, sessions=["a"])
    assert lm.cached_length("c") == 0 and lm.cached_length("b") == 40
    before = lm.cached_bytes
    lm.release("b")
    assert lm.cached_length("b") == 0 and 0 < lm.cached_bytes < before
    lm.release("never-seen")  # no-op
    lm.close()
    assert lm.cached_sessions == 0 and lm.cached_bytes == 0

    tight = fresh(block_size=4, max_cache_bytes=1)  # nothing fits: no reuse, same output
    p = ps["a"]
    assert tight.greedy([p], 3, sessions=["a"]) == tight.greedy([p], 3, sessions=["a"]) == tight.greedy([p], 3)
    assert tight.cached_sessions == 0 and tight.reused_tokens == 0


def test_concurrent_threads_get_deterministic_outputs(fresh):
    lm = fresh(block_size=8)
    rng = random.Random(12)
    prompts = [random_tokens(rng, rng.randrange(20, 120)) for _ in range(4)]
    want = [lm.greedy([p], 6)[0] for p in prompts]

    def worker(i: int) -> list[list[int]]:
        p = prompts[i]
        return [lm.greedy([p[:k]], 6, sessions=[i])[0] for k in (len(p) // 2, len(p))]

    got = run_together(4, worker)
    assert not raised(got)
    for i, p in enumerate(prompts):
        assert got[i][1] == want[i]
        assert got[i][0] == lm.greedy([p[: len(p) // 2]], 6)[0]


def test_bfloat16_reuse_equals_no_reuse():
    from ralmspec.lm.models import load_lm

    lm = load_lm("tiny", dtype="bfloat16", block_size=8)
    assert lm.dtype == torch.bfloat16
    reused = sum(run_sequence(lm, random.Random(seed), seed, n_steps=6) for seed in range(2))
    assert reused > 0


def test_kv_computed_under_another_thread_count_is_not_reused(fresh):
    lm = fresh(block_size=8)
    p = random_tokens(random.Random(13), 40)
    lm.greedy([p], 2, sessions=["t"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        lm.greedy([p], 2, sessions=["t"])
        assert lm.last_call_stats.reused_tokens == 0
    finally:
        torch.set_num_threads(threads)
    lm.greedy([p], 2, sessions=["t"])  # computed again under the original count
    assert lm.last_call_stats.reused_tokens == 0
    lm.greedy([p], 2, sessions=["t"])
    assert lm.last_call_stats.reused_tokens == 32
