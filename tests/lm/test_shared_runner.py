"""SharedRunner: decoding threads' one-token steps share batch-invariant forwards, and every step
gives the bits of the same step alone (ralmspec/lm/shared_runner.py)."""

from __future__ import annotations

import random
import time

import pytest
import torch

from ralmspec.errors import ConfigError
from ralmspec.lm.shared_runner import SharedRunner
from ralmspec.lm.static import StaticRunner
from ralmspec.rendezvous import Rendezvous
from tests.concurrent import raised, run_together


def batched_runner(tiny_lm, max_len: int = 256, rows: int = 4) -> StaticRunner:
    return StaticRunner(tiny_lm.model, max_len=max_len, capacity=8, batch_rows=rows)


def session_script(seed: int) -> tuple[list[int], list[tuple[str, int]]]:
    """A prompt and a list of actions: ("step", token) or ("crop", keep), rollbacks included."""
    rng = random.Random(seed)
    prompt = [rng.randrange(5, 1000) for _ in range(rng.randint(3, 70))]
    actions, length = [], len(prompt)
    for _ in range(rng.randint(8, 20)):
        if length > len(prompt) + 2 and rng.random() < 0.15:
            length = rng.randint(len(prompt), length - 1)
            actions.append(("crop", length))
        else:
            actions.append(("step", rng.randrange(5, 1000)))
            length += 1
    return prompt, actions


def play(runner, prompt: list[int], actions: list[tuple[str, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run one session's script on ``runner``: the (logits, hidden) of the prompt and every step."""
    with torch.inference_mode():
        kv = runner.open()
        assert kv is not None
        kv, logits, hidden = runner.prefill_block(kv, prompt, last=True, want_hidden=True)
        out = [(logits.clone(), hidden.clone())]
        for verb, arg in actions:
            if verb == "crop":
                kv = runner.crop(kv, arg)
            else:
                kv, logits, hidden = runner.step_hidden(kv, arg)
                out.append((logits.clone(), hidden.clone()))
        runner.free(kv)
    return out


@pytest.mark.parametrize("gather_s", [None, 0.0, 0.05])
def test_threads_sharing_forwards_get_the_bits_of_each_session_alone(tiny_lm, gather_s):
    scripts = [session_script(seed) for seed in range(6)]
    alone = batched_runner(tiny_lm)
    expected = [play(alone, p, a) for p, a in scripts]
    rv = Rendezvous()
    shared = SharedRunner(batched_runner(tiny_lm), rv, gather_s=gather_s)

    def worker(i: int) -> list:
        with rv.member():
            return play(shared, *scripts[i])

    got = run_together(len(scripts), worker)
    assert not raised(got), raised(got)
    for exp, out in zip(expected, got):
        assert len(exp) == len(out)
        for (el, eh), (ol, oh) in zip(exp, out):
            assert torch.equal(el, ol) and torch.equal(eh, oh)
    stats = shared.stats()
    assert rv.members == rv.blocked == 0
    steps = sum(len([a for a in acts if a[0] == "step"]) for _, acts in scripts)
    assert sum(int(k) * v for k, v in stats["batches_by_size"].items()) == steps
    # steps really met: some forward stepped several sessions (6 threads, 4 rows per forward)
    assert max(int(k) for k in stats["batches_by_size"]) >= 2, stats


def test_a_lone_session_steps_at_once_and_equals_the_runner_alone(tiny_lm):
    prompt, actions = session_script(11)
    expected = play(batched_runner(tiny_lm), prompt, actions)
    rv = Rendezvous()
    shared = SharedRunner(batched_runner(tiny_lm), rv, gather_s=10.0)
    with rv.member():  # the only member: every step is all there is, nothing to wait for
        t0 = time.perf_counter()
        got = play(shared, prompt, actions)
        assert time.perf_counter() - t0 < 10.0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))
    assert set(shared.stats()["batches_by_size"]) == {"1"}


def test_a_step_past_its_slot_fails_alone_and_the_others_go_on(tiny_lm):
    runner = batched_runner(tiny_lm, max_len=64)
    rv = Rendezvous()
    shared = SharedRunner(runner, rv, gather_s=5.0)
    full, fine = shared.open(), shared.open()
    with torch.inference_mode():
        shared.prefill_block(full, list(range(10, 74)), last=True)  # 64 positions: full
        shared.prefill_block(fine, list(range(10, 20)), last=True)

    def step(i: int):
        with rv.member(), torch.inference_mode():
            return shared.step_hidden((full, fine)[i], 7)

    out_full, out_fine = run_together(2, step)
    assert isinstance(out_full, ConfigError) and "slot length 64" in str(out_full)
    assert isinstance(out_fine, tuple) and fine.length == 11
    shared.free(full)
    shared.free(fine)


def test_a_token_outside_the_vocabulary_fails_alone(tiny_lm):
    """It was an IndexError inside the shared forward: every step beside it failed too."""
    rv = Rendezvous()
    shared = SharedRunner(batched_runner(tiny_lm), rv, gather_s=5.0)
    bad, fine = shared.open(), shared.open()
    with torch.inference_mode():
        shared.prefill_block(bad, list(range(10, 20)), last=True)
        shared.prefill_block(fine, list(range(10, 20)), last=True)

    def step(i: int):
        with rv.member(), torch.inference_mode():
            return shared.step_hidden((bad, fine)[i], (tiny_lm.model.get_input_embeddings().num_embeddings, 7)[i])

    out_bad, out_fine = run_together(2, step)
    assert isinstance(out_bad, ConfigError) and "outside the vocabulary" in str(out_bad)
    assert isinstance(out_fine, tuple) and fine.length == 11 and bad.length == 10
    shared.free(bad)
    shared.free(fine)


def test_only_the_batched_runner_can_be_shared(tiny_lm):
    with pytest.raises(ConfigError, match="--lm-runner batched"):
        SharedRunner(StaticRunner(tiny_lm.model, max_len=64, capacity=2), Rendezvous())
    with pytest.raises(ConfigError, match="gather_s"):
        SharedRunner(batched_runner(tiny_lm), Rendezvous(), gather_s=-1.0)
