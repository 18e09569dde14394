"""The exact draw rule (ralmspec/lm/sampling.py) and the HF backend's sampled decoding.

A sampled token must be a function of (seed, its position, its logits) alone: the same in any
process, batch or chunking, replayed identically after a rollback, and temperature 0 must stay
the greedy argmax bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from ralmspec.config import GenerationConfig
from ralmspec.errors import ConfigError
from ralmspec.lm.base import LanguageModel
from ralmspec.lm.sampling import Sampling, SeededPick, draw, draw_on_device, gumbel_noise, nucleus


def reference_nucleus(z: np.ndarray, top_p: float) -> np.ndarray:
    """Rule step 3 written plainly: sort the whole vocabulary by (-z, id)."""
    if top_p >= 1.0:
        return np.arange(len(z))
    w = np.exp(z - z.max())
    order = np.lexsort((np.arange(len(z)), -z))
    cum = np.cumsum(w[order])
    k = int(np.searchsorted(cum, top_p * w.sum(), side="left"))
    return np.sort(order[:k + 1])


# ------------------------------------------------------------------ the noise


def test_noise_is_pinned_counter_based_philox():
    """The noise stream is a fixed function of (seed, position): pinned values guard against a
    numpy change of Philox (which would silently change every sampled answer)."""
    got = gumbel_noise(7, 3, 4)
    np.testing.assert_allclose(got, [0.31533506, 1.13079468, -1.09549555, -0.1411624], atol=1e-7)
    assert np.array_equal(gumbel_noise(7, 3, 4), got)
    # counter-based: a longer vocabulary extends the stream, the shared ids keep their noise
    assert np.array_equal(gumbel_noise(7, 3, 1000)[:4], got)


def test_noise_is_keyed_by_seed_and_position():
    base = gumbel_noise(7, 3, 64)
    for other in (gumbel_noise(7, 4, 64), gumbel_noise(8, 3, 64), gumbel_noise(3, 7, 64),
                  gumbel_noise(7, 3 + (1 << 32), 64)):
        assert not np.allclose(base, other)
    assert np.isfinite(gumbel_noise(2 ** 63 - 1, 10 ** 6, 4096)).all()


def test_noise_is_standard_gumbel():
    g = gumbel_noise(11, 0, 200_000)
    assert abs(g.mean() - 0.5772) < 0.02 and abs(g.var() - np.pi ** 2 / 6) < 0.05


# ------------------------------------------------------------------ the draw


def test_temperature_zero_is_argmax_with_lowest_id_tie_break():
    z = np.array([0.5, 2.0, -1.0, 2.0, 1.9])
    for pos in range(5):
        assert draw(z, Sampling(0.0, 0.3, 99, 0), pos) == 1


def test_draw_is_deterministic_and_position_keyed():
    rng = np.random.default_rng(0)
    z = rng.normal(size=500)
    s = Sampling(1.0, 1.0, 7)
    first = [draw(z, s, p) for p in range(40)]
    assert first == [draw(z, s, p) for p in range(40)]  # replay: same draws
    assert len(set(first)) > 10  # the position changes the noise
    assert first != [draw(z, Sampling(1.0, 1.0, 8), p) for p in range(40)]  # the seed too
    # the start position of a chunk does not matter, only the absolute position
    assert draw(z, s.at(5), 12) == draw(z, s, 12)


def test_draw_accepts_torch_logits_of_any_dtype():
    torch = pytest.importorskip("torch")
    z = np.random.default_rng(1).normal(size=300).astype(np.float32)
    s = Sampling(0.7, 0.95, 3)
    for p in range(10):
        assert draw(torch.from_numpy(z), s, p) == draw(z, s, p)


@pytest.mark.parametrize("top_p", [1e-9, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_nucleus_equals_full_sort_with_ties(top_p):
    rng = np.random.default_rng(2)
    for size, scale in ((7, 1.0), (300, 3.0), (5000, 0.5), (20_000, 8.0)):
        z = np.round(rng.normal(size=size) * scale, 1)  # many exact ties
        assert np.array_equal(nucleus(z, top_p), reference_nucleus(z, top_p)), (size, top_p)


def test_the_device_evaluation_draws_the_host_rules_tokens():
    """``draw_on_device`` (torch, run here on CPU tensors) == ``draw`` (numpy) over random
    vocabularies with many exact ties, temperatures, nucleus sizes, seeds and positions; and
    ``SeededPick`` keeps CPU logits on the host rule."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    cases = 0
    for _ in range(120):
        size = int(rng.choice([5, 300, 5000, 49152]))
        z = np.round(rng.normal(size=size) * rng.choice([0.5, 3.0, 8.0]), int(rng.choice([1, 3]))).astype(np.float32)
        s = Sampling(float(rng.choice([0.3, 0.7, 1.0, 1.9])), float(rng.choice([1e-9, 0.1, 0.5, 0.9, 1.0])),
                     int(rng.integers(0, 2 ** 62)), int(rng.integers(0, 9)))
        for i in range(2):
            got = draw_on_device(torch.from_numpy(z), s, s.start + i)
            assert got.dim() == 0 and int(got) == draw(z, s, s.start + i) == SeededPick(s)(torch.from_numpy(z), i)
            assert int(SeededPick(s).on_device(torch.from_numpy(z), i)) == int(got)
            cases += 1
    assert cases == 240
    z = torch.tensor([0.5, 2.0, -1.0, 2.0, 1.9])
    assert int(draw_on_device(z, Sampling(0.0, 0.3, 99, 0), 4)) == 1  # temperature 0: argmax, lowest id


def test_tiny_top_p_is_greedy():
    z = np.random.default_rng(3).normal(size=1000)
    assert all(draw(z, Sampling(1.5, 1e-6, 1), p) == int(np.argmax(z)) for p in range(20))


def test_draws_never_leave_the_nucleus():
    z = np.random.default_rng(4).normal(size=200) * 2
    keep = set(nucleus(z / 0.9, 0.6).tolist())
    drawn = {draw(z, Sampling(0.9, 0.6, 5), p) for p in range(400)}
    assert drawn <= keep and len(drawn) > 1


def test_draw_frequencies_follow_the_renormalised_nucleus():
    """Gumbel-max samples softmax(z / T) restricted to the nucleus."""
    z = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))
    T, top_p, n = 0.8, 0.9, 6000
    zt = z / T
    ids = reference_nucleus(zt, top_p)
    q = np.exp(zt[ids] - zt[ids].max())
    q /= q.sum()
    counts = np.bincount([draw(z, Sampling(T, top_p, 123), p) for p in range(n)], minlength=5)
    assert counts[np.setdiff1d(np.arange(5), ids)].sum() == 0
    assert np.abs(counts[ids] / n - q).max() < 0.025, (counts, q)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kw", [
    {"temperature": -0.1}, {"temperature": 2.01}, {"temperature": float("nan")}, {"temperature": "1"},
    {"temperature": True}, {"temperature": 1e-307}, {"temperature": 5e-324}, {"temperature": 9.9e-7}, {"top_p": 0}, {"top_p": 1.01}, {"top_p": None}, {"seed": -1},
    {"seed": 2 ** 63}, {"seed": 1.0}, {"seed": True}, {"seed": "7"},
])
def test_generation_config_rejects_bad_sampling(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        GenerationConfig(**kw)


def test_the_smallest_temperature_draws_the_argmax():
    """Below MIN_TEMPERATURE the division overflowed (1e-307: every positive logit inf, the
    lowest id drawn); at it, logits a hundredth apart are far past the noise: the argmax."""
    torch = pytest.importorskip("torch")
    from ralmspec.config import MIN_TEMPERATURE

    rng = np.random.default_rng(0)
    for seed in range(20):
        z = rng.normal(0, 5, 5000)
        z[rng.integers(5000)] = z.max() + 0.01
        assert draw(z, Sampling(MIN_TEMPERATURE, 1.0, seed, 0), seed) == int(np.argmax(z))
        assert int(draw_on_device(torch.tensor(z), Sampling(MIN_TEMPERATURE, 0.9, seed, 0), seed)) == int(np.argmax(z))


def test_generation_config_sampling_at():
    assert GenerationConfig().sampling_at(3) is None  # default: greedy
    assert GenerationConfig(seed=5).sampling_at(3) is None  # temperature 0: seed irrelevant
    assert GenerationConfig(temperature=0.8, top_p=0.9, seed=7).sampling_at(3) == Sampling(0.8, 0.9, 7, 3)
    assert GenerationConfig(temperature=2, top_p=1, seed=2 ** 63 - 1).sampling_at(0).seed == 2 ** 63 - 1
    with pytest.raises(ConfigError, match="needs a seed"):
        GenerationConfig(temperature=0.5).sampling_at(0)
    with pytest.raises(ConfigError, match="start"):
        Sampling(0.5, 1.0, 1, -1)


def test_greedy_only_backend_refuses_sampling():
    class GreedyOnly(LanguageModel):
        tokenizer, eos_token_id, max_context = None, None, 8
        no_sampling_reason = "it cannot"

        def greedy(self, prompts, n, sessions=None):
            return [[1] * n for _ in prompts]

    lm = GreedyOnly()
    assert lm.generate([[1]], 2, None, [None]) == [[1, 1]]
    assert lm.generate([[1]], 2, None, [Sampling(0.0, 1.0, 4)]) == [[1, 1]]
    with pytest.raises(ConfigError, match="temperature > 0.*it cannot"):
        lm.generate([[1], [2]], 2, None, [None, Sampling(0.5, 1.0, 4)])


# ------------------------------------------------------------------ the HF backend


@pytest.fixture(scope="module")
def prompts(tiny):
    return [tiny.tokenizer.encode(t) for t in ("who wrote the song hey jude", "the capital of australia is",
                                               "a long question about the roman empire and its fall " * 3)]


def test_hf_temperature_zero_is_greedy_bit_for_bit(tiny, prompts):
    want = tiny.greedy(prompts, 6)
    assert tiny.generate(prompts, 6) == want
    assert tiny.generate(prompts, 6, None, [Sampling(0.0, 0.5, 9, 4)] * len(prompts)) == want


def test_hf_sampled_chunks_equal_one_call_and_batches_are_invariant(tiny, prompts):
    """Token i of a call is drawn at start + i: four 2-token chunks (with a session, so KV is
    reused) give the 8-token call's tokens; a sampled prompt beside greedy ones is unchanged."""
    s = Sampling(0.8, 0.9, 7)
    for p in prompts:
        whole = tiny.generate([p], 8, None, [s])[0]
        ctx, pieces = list(p), []
        for start in range(0, 8, 2):
            c = tiny.generate([ctx], 2, ["chunks"], [s.at(start)])[0]
            ctx += c
            pieces += c
        tiny.release("chunks")
        assert pieces == whole
    alone = [tiny.generate([p], 5, None, [s.at(3)])[0] for p in prompts]
    mixed = tiny.generate(prompts + prompts, 5, None, [s.at(3)] * len(prompts) + [None] * len(prompts))
    assert mixed[:len(prompts)] == alone
    assert mixed[len(prompts):] == tiny.greedy(prompts, 5)
    assert alone != mixed[len(prompts):], "sampling at T=0.8 gave the greedy tokens: nothing is tested"
    assert tiny.generate(prompts, 5, None, [Sampling(0.8, 0.9, 8, 3)] * len(prompts)) != alone


def test_hf_sampling_settings_must_match_prompts(tiny, prompts):
    with pytest.raises(ConfigError, match="sampling settings"):
        tiny.generate(prompts, 2, None, [None])


def test_vllm_backend_refuses_sampling_without_starting_vllm():
    from ralmspec.lm.vllm import VLLMLanguageModel

    lm = object.__new__(VLLMLanguageModel)  # no engine: the refusal comes before any vLLM call
    assert not lm.supports_sampling
    with pytest.raises(ConfigError, match="temperature > 0.*vLLM's sampler"):
        lm.generate([[1, 2]], 2, None, [Sampling(0.8, 1.0, 7)])
