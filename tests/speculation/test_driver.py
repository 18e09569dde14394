"""The speculation driver runs both modes (document-level RaLM, kNN-LM) through ONE code path:
the same loop, the same rollback, the same figures, with token identity to each naive loop.

Real parts: the small real FAISS index with the MiniLM encoder and the tiny transformer LM
(RaLM), a real kNN-LM datastore built from that LM over the embedded corpus (kNN-LM)."""

from __future__ import annotations

import asyncio
from dataclasses import fields

import pytest

from ralmspec.config import OS3_MODE_DEFAULTS, EngineConfig, GenerationConfig, OS3Config, SpeculationConfig
from ralmspec.engine.core import RalmEngine
from ralmspec.engine.speculative import RalmMode
from ralmspec.knnlm.model import KNNLM, KNNLMConfig
from ralmspec.knnlm.speculative import KNNMode, SpeculativeKNNConfig, SpeculativeKNNLM, SpeculativeStats
from ralmspec.speculation.driver import Driver, Mode, SpeculationStats
from tests.identity import SpeculationCheck

GEN = GenerationConfig(stride=2, query_len=16, max_new_tokens=24, passage_tokens=64)
QUESTIONS = ["who wrote the song hey jude", "when did the roman empire fall",
             "what is the tallest mountain in europe", "how many players are on a cricket team"]
# forced speculation (fixed stride), guesses that are often wrong (RaLM: the previous passage;
# kNN-LM: a 3-entry cache), synchronous and overlapped rounds
RALM_SPECS = [SpeculationConfig(os3=False, fixed_stride=3, async_verify=False, guesser="last"),
              SpeculationConfig(os3=False, fixed_stride=2, async_verify=True, max_inflight=2, guesser="last")]
KNN_SPECS = [SpeculativeKNNConfig(os3=False, fixed_stride=3, cache_capacity=3),
             SpeculativeKNNConfig(os3=False, fixed_stride=4, cache_capacity=3, async_verify=True)]
# the driver's figures: every mode reports each of them under this name
FIGURES = {"rounds", "speculated", "accepted", "rollbacks", "cancelled", "verify_batch_sizes", "strides",
           "acceptance_histogram", "verified_steps", "naive_steps", "paused_steps", "held_steps", "probes",
           "probe_hits", "wasted_tokens", "verify_wait_s"}


@pytest.fixture(scope="module")
def engine(small_indexes, tiny_lm):
    return RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())


@pytest.fixture(scope="module")
def knn(tmp_path_factory, tiny_lm):
    from ralmspec.data.loaders import default_corpus
    from ralmspec.knnlm.datastore import DatastoreBuildConfig, build_datastore

    corpus = default_corpus()
    ds = build_datastore(tiny_lm, corpus, tmp_path_factory.mktemp("driver-knn"),
                         DatastoreBuildConfig(max_tokens=6000, window=128, stride=96, batch_size=16), progress=False)
    prompts = [tiny_lm.tokenizer.encode(corpus[i].text.split(". ")[0])[:24] for i in range(0, 24, 3)]
    return KNNLM(tiny_lm, ds, KNNLMConfig(k=8, max_new_tokens=12)), prompts


@pytest.fixture
def rollbacks(monkeypatch):
    """Every call of the driver's one rollback: (mode class, tokens cut)."""
    seen: list[tuple[str, int]] = []
    real = Driver.rollback

    def spy(self, bad, truth):
        seen.append((type(self.mode).__name__, len(self.tokens) - bad.start))
        return real(self, bad, truth)

    monkeypatch.setattr(Driver, "rollback", spy)
    return seen


def test_both_modes_speculate_and_roll_back_through_the_one_driver(engine, knn, rollbacks):
    ralm_check, knn_check = SpeculationCheck(), SpeculationCheck()
    ralm_wasted = knn_wasted = 0

    async def ralm_runs():
        return [(await engine.generate(q, gen=GEN, speculate=False), await engine.generate(q, gen=GEN, spec=spec))
                for spec in RALM_SPECS for q in QUESTIONS]

    for naive, res in asyncio.run(ralm_runs()):
        ralm_check.same(res.token_ids, naive.token_ids, res.stats)
        assert FIGURES <= set(res.stats)
        ralm_wasted += res.stats["wasted_tokens"]
    model, prompts = knn
    for cfg in KNN_SPECS:
        spec = SpeculativeKNNLM(model, cfg)
        for p in prompts:
            naive, res = model.generate(p), spec.generate(p)
            knn_check.same(res.tokens, naive.tokens, res.stats)
            knn_wasted += res.stats.wasted_tokens
    ralm_check.ran(min_speculated=len(RALM_SPECS) * len(QUESTIONS), min_rollbacks=1)
    knn_check.ran(min_speculated=len(KNN_SPECS) * len(prompts), min_rollbacks=1)
    by_mode = {m: [cut for mode, cut in rollbacks if mode == m] for m in ("RalmMode", "KNNMode")}
    # both modes' rollbacks ran through Driver.rollback, and wasted_tokens has one definition:
    # the tokens cut there, from the rejected step's start to the end of the output
    # a rejected step that had produced nothing yet (a synchronous round's last step) goes through
    # the same rollback and cuts nothing: a correction, not a rollback (RoundStats.verified_ahead)
    assert len([cut for cut in by_mode["RalmMode"] if cut]) == ralm_check.tally.rollbacks
    assert len(by_mode["KNNMode"]) == knn_check.tally.rollbacks
    assert sum(by_mode["RalmMode"]) == ralm_wasted and sum(by_mode["KNNMode"]) == knn_wasted
    assert all(cut >= 1 for cut in by_mode["KNNMode"])  # a kNN-LM step is its token: cut with it


def test_knn_stats_carry_every_figure_of_the_driver():
    names = {f.name for f in fields(SpeculativeStats)}
    assert FIGURES <= names
    assert {f.name for f in fields(SpeculationStats)} - {"steps"} <= FIGURES


def test_strides_are_os3_strides_and_batch_sizes_are_round_sizes(knn):
    """``strides``: the stride chosen when each round was submitted; ``verify_batch_sizes``: the
    steps it held (fewer only where the output completed first)."""
    model, prompts = knn
    res = [SpeculativeKNNLM(model, SpeculativeKNNConfig(os3=False, fixed_stride=5)).generate(p) for p in prompts]
    for r in res:
        s = r.stats
        assert len(s.strides) == len(s.verify_batch_sizes) == s.rounds
        assert all(b <= st <= 5 for b, st in zip(s.verify_batch_sizes, s.strides))
        assert sum(s.verify_batch_sizes) == s.speculated
    assert sum(r.stats.speculated for r in res) > 0


def test_one_os3_config_with_per_mode_defaults():
    ralm, knn = SpeculationConfig(), SpeculativeKNNConfig()
    assert isinstance(ralm, OS3Config) and isinstance(knn, OS3Config)
    for cfg, mode in ((ralm, "ralm"), (knn, "knnlm")):
        for name, value in OS3_MODE_DEFAULTS[mode].items():
            assert getattr(cfg, name) == value
    assert ralm.gamma_max != knn.gamma_max  # the modes do differ (config.py says why)
    assert {f.name for f in fields(OS3Config)} <= {f.name for f in fields(SpeculativeKNNConfig)}


def test_modes_implement_every_method_of_the_driver_interface():
    methods = [n for n, v in vars(Mode).items() if callable(v) and not n.startswith("_")]
    assert {"start", "advance", "verify", "judge", "correct", "settled"} <= set(methods)
    for mode in (RalmMode, KNNMode):
        for name in methods:
            assert getattr(mode, name) is not getattr(Mode, name, None), (mode, name)
            assert callable(getattr(mode, name)), (mode, name)
