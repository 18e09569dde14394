"""Bad input to the transformers backend is a ConfigError, never a crash or a silently different
answer, and a failure between taking a session's KV slot out of the table and putting it back
leaks no slot (ralmspec/lm/hf.py, ralmspec/lm/base.py)."""

from __future__ import annotations

import pytest

import ralmspec.lm.hf as hf
from ralmspec.errors import ConfigError
from ralmspec.lm.sampling import Sampling
from ralmspec.lm.static import StaticRunner
from tests.lm.conftest import make_view

PROMPT = list(range(1000, 1070))


def slots_accounted(lm) -> bool:
    """Every slot of a static runner is either free (once) or held by exactly one cached session."""
    r = lm.runner
    held = [e.kv.index for e in lm._sessions.values()]
    return (len(set(r._free)) == len(r._free) and len(set(held)) == len(held)
            and not set(held) & set(r._free) and len(r._free) + len(held) == r.capacity)


BAD = {
    "a float token id": lambda lm: lm.generate([[1000.5, 1001]], 2),  # was truncated to token 1000
    "a sampling setting that is no Sampling": lambda lm: lm.generate([PROMPT], 2, ["s"], [{"temperature": 1.0}]),
    "sampling settings that are no list": lambda lm: lm.generate([PROMPT], 2, ["s"], 5),
    "prompts that are no list": lambda lm: lm.generate(None, 2),
    "a negative top_k": lambda lm: lm.token_logprobs(PROMPT, [5, 6], -1),  # was top=() silently
    "a fractional top_k": lambda lm: lm.token_logprobs(PROMPT, [5, 6], 1.5),
    "no top_k": lambda lm: lm.token_logprobs(PROMPT, [5, 6], None),
    "a float token to score": lambda lm: lm.token_logprobs(PROMPT, [5.5], 1),
    "a string token to score": lambda lm: lm.token_logprobs(PROMPT, ["x"], 1),
    "no tokens to score": lambda lm: lm.token_logprobs(PROMPT, None, 1),
    "a negative top_k of kept scores": lambda lm: lm.decoded_logprobs(PROMPT, [5], -1),  # was top[:-1]
    "an unhashable session to release": lambda lm: lm.release(["s"]),
    "an unhashable session to measure": lambda lm: lm.cached_length(["s"]),
}


@pytest.mark.parametrize("runner", ["eager", "batched"])
def test_bad_input_is_a_config_error_and_changes_nothing(tiny_lm, runner):
    lm = make_view(tiny_lm, runner=runner)
    want = lm.generate([PROMPT], 3, ["s"])
    for name, call in BAD.items():
        with pytest.raises(ConfigError):
            call(lm)
            pytest.fail(f"no ConfigError for {name}")
    if runner != "eager":
        assert slots_accounted(lm)
    assert lm.cached_length("s") == 64  # the session was not touched by the refused calls
    assert lm.generate([PROMPT], 3, ["s"]) == want


def small_static(tiny_lm, capacity: int, rows: int = 1):
    lm = make_view(tiny_lm, runner="static" if rows == 1 else "batched", block_size=16)
    lm.runner = StaticRunner(lm.model, max_len=lm.runner.max_len, capacity=capacity, batch_rows=rows)
    return lm


def test_a_failure_while_reusing_a_session_gives_its_slot_back(tiny_lm, monkeypatch):
    lm = small_static(tiny_lm, capacity=2)
    want = lm.generate([PROMPT], 3, ["s"])
    lm.generate([PROMPT + [7]], 3, ["t"])
    crop = lm.runner.crop

    def failing_crop(kv, keep):
        raise RuntimeError("injected")

    monkeypatch.setattr(lm.runner, "crop", failing_crop)
    with pytest.raises(RuntimeError, match="injected"):
        lm.generate([PROMPT], 3, ["s"])  # takes s's slot out of the table, then fails cropping it
    assert slots_accounted(lm)
    monkeypatch.setattr(lm.runner, "crop", crop)
    for _ in range(3):  # every slot is usable: sessions keep opening and evicting
        assert lm.generate([PROMPT], 3, ["s"]) == want
        lm.generate([PROMPT + [8]], 3, ["u"])
    assert slots_accounted(lm)


def test_a_failure_scoring_a_batch_leaks_no_slot(tiny_lm, monkeypatch):
    lm = small_static(tiny_lm, capacity=8, rows=8)
    prompts = [PROMPT + [7] * i for i in range(3)]
    modes = [Sampling(logprobs=2)] * 3
    want = lm.generate(prompts, 3, ["a", "b", "c"], modes)

    def failing_scored(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(hf, "_scored", failing_scored)
    with pytest.raises(RuntimeError, match="injected"):
        lm.generate(prompts, 3, ["a", "b", "c"], modes)
    assert slots_accounted(lm) and lm.cached_sessions == 3
    monkeypatch.undo()
    assert lm.generate(prompts, 3, ["a", "b", "c"], modes) == want
    assert slots_accounted(lm)
