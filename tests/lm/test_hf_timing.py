"""Prefix reuse is measurably cheaper, in counted work and in wall time on the GPT-2-small shape.

The realistic case of the RaLM loop: a 300-token prompt (passage + question + context), then the
same prompt grown by ``stride`` = 4 tokens. With reuse, only the rows after the last full
block of the 300 tokens are recomputed (48 rows with the default B = 64: one forward instead of
five). Output equality is asserted too.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.lm.conftest import random_tokens


@pytest.fixture(scope="module")
def default_lm():
    from ralmspec.lm.models import load_lm

    return load_lm("random-small")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def test_grown_prompt_reuse_is_much_faster_on_default_model(default_lm):
    lm = default_lm
    rng = random.Random(0)
    prompt = random_tokens(rng, 300)
    grown = prompt + random_tokens(rng, 4)
    reuse_times, fresh_times = [], []
    for _ in range(2):  # min of 2: robust to a noisy, shared CPU
        lm.release("s")
        lm.greedy([prompt], 4, sessions=["s"])
        t, reused = _timed(lambda: lm.greedy([grown], 4, sessions=["s"]))
        st = lm.last_call_stats
        kept = 300 // lm.block_size * lm.block_size
        assert (st.reused_tokens, st.prefill_tokens_computed, st.prefill_forwards) == (kept, 304 - kept, 1)
        reuse_times.append(t)
        lm.clear_prefix_cache()  # a fresh prefill: nothing from the shared prefix blocks either
        t, fresh = _timed(lambda: lm.greedy([grown], 4))
        assert lm.last_call_stats.prefill_tokens_computed == 304
        fresh_times.append(t)
        assert reused == fresh
    t_reuse, t_fresh = min(reuse_times), min(fresh_times)
    print(f"\n[default, B={lm.block_size}] 300+4 tokens, n=4: reuse {1000 * t_reuse:.0f} ms "
          f"vs fresh {1000 * t_fresh:.0f} ms")
    assert t_reuse < 0.5 * t_fresh, (t_reuse, t_fresh)
