"""Unit tests of the harness pieces: config validation, variant names, trace breakdown, the
emulated knowledge base, and the loud failure when a speculative output differs from naive."""

from __future__ import annotations

import os

import pytest

from ralmspec.config import SpeculationConfig
from ralmspec.errors import ConfigError
from ralmspec.retrieval.base import Retriever

from experiments.breakdown import breakdown, wasted_lm
from experiments.config import apply_overrides, load_config, parse_config
from experiments.studies import models_note
from experiments.variants import resolve_variant
from tests.identity import SpeculationCheck

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- variants / config

def test_variant_names_resolve():
    base = SpeculationConfig()
    assert resolve_variant("all", base) == SpeculationConfig(prefetch=20, os3=True, async_verify=True)
    assert resolve_variant("prefetch=20", base) == resolve_variant("all", base)
    s4 = resolve_variant("s=4", base)
    assert (s4.os3, s4.fixed_stride, s4.prefetch, s4.async_verify) == (False, 4, 20, True)
    sync = resolve_variant("all-sync", base)
    assert (sync.os3, sync.prefetch, sync.async_verify) == (True, 20, False)
    none = resolve_variant("none", base)
    assert (none.prefetch, none.os3, none.fixed_stride, none.async_verify) == (1, False, 3, False)
    for bad in ("fast", "s=0", "prefetch=0", "s=x"):
        with pytest.raises(ConfigError):
            resolve_variant(bad, base)


def test_models_note_tells_random_models_from_pretrained_ones():
    # the tables used to call every model random, SmolLM2 (in quick.toml and full.toml) included
    assert "pretrained" not in models_note(["tiny", "tiny", "random-small"])
    assert models_note(["tiny"]).startswith("Models: tiny: seeded random")
    note = models_note(["tiny", "smollm2"])
    assert "tiny: seeded random" in note and "smollm2: pretrained" in note and "smollm2: seeded" not in note


def _raw(**extra):
    raw = {"run": {"name": "t"}, "main": {"groups": [{"model": "tiny", "retrievers": ["exact"]}]}}
    raw.update(extra)
    return raw


def test_config_rejects_bad_input():
    parse_config(_raw())
    with pytest.raises(ConfigError, match="unknown table"):
        parse_config(_raw(mian={}))
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(_raw(workload={"nn": 3}))
    with pytest.raises(ConfigError, match="must be a int"):
        parse_config(_raw(workload={"n": "3"}))
    with pytest.raises(ConfigError, match="unknown retriever"):
        parse_config(_raw(main={"groups": [{"model": "tiny", "retrievers": ["faiss"]}]}))
    with pytest.raises(ConfigError, match="only defined for"):
        parse_config(_raw(main={"groups": [{"model": "tiny", "retrievers": ["hnsw"], "kb_pad": [0, 10]}]}))
    with pytest.raises(ConfigError, match="unknown variant"):
        parse_config(_raw(main={"variants": ["turbo"], "groups": [{"model": "tiny", "retrievers": ["exact"]}]}))
    with pytest.raises(ConfigError, match="stride"):
        parse_config(_raw(workload={"stride": 0}))
    with pytest.raises(ConfigError):
        parse_config(_raw(speculation={"prefetch": 0}))


def test_run_command_line_errors_are_one_line(tmp_path, capsys):
    """A config that is not UTF-8 was a UnicodeDecodeError traceback; an --out below a file a
    FileExistsError traceback."""
    from experiments import run as run_mod

    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[run]\nname = "caf\xe9"\n'.encode("latin-1"))
    assert run_mod.main([str(bad)]) == 2
    assert "latin1.toml: not UTF-8 text" in capsys.readouterr().err
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert run_mod.main(["--quick", "--out", str(a_file / "out"), "--no-progress"]) == 2
    assert f"--out {a_file / 'out'}: {a_file} is a file, not a folder" in capsys.readouterr().err


def test_overrides_and_presets_parse():
    raw = apply_overrides({"workload": {"n": 9}}, {"workload.n": 2, "run.name": "x"})
    assert raw == {"workload": {"n": 2}, "run": {"name": "x"}}
    for name in ("smoke", "quick", "full"):
        cfg = load_config(os.path.join(ROOT, "experiments", "configs", f"{name}.toml"))
        assert cfg.bench, name
    full_q = load_config(os.path.join(ROOT, "experiments", "configs", "full.toml"), quick=True)
    full = load_config(os.path.join(ROOT, "experiments", "configs", "full.toml"))
    assert full_q.workload.n < full.workload.n and full_q.run.name.endswith("quick")


# ----------------------------------------------------------------------------- breakdown

def test_wasted_lm_replays_rollbacks():
    trace = [
        {"kind": "retrieve", "t": 0, "dur": 0.01},
        {"kind": "lm", "t": 0.01, "dur": 1.0, "n": 4},   # [0, 4) kept
        {"kind": "lm", "t": 1.0, "dur": 2.0, "n": 4},    # [4, 8) discarded by the rollback at 4
        {"kind": "lm", "t": 3.0, "dur": 4.0, "n": 4},    # [8, 12) discarded too
        {"kind": "rollback", "t": 7.0, "at": 4, "wasted": 8},
        {"kind": "lm", "t": 7.0, "dur": 8.0, "n": 4},    # [4, 8) regenerated, kept
        {"kind": "lm", "t": 15.0, "dur": 16.0, "n": 4},  # [8, 12) discarded at 8
        {"kind": "rollback", "t": 31.0, "at": 8, "wasted": 4},
    ]
    assert wasted_lm(trace) == (22.0, 12)
    res = {"mode": "speculative", "latency_s": 40.0, "trace": trace,
           "stats": {"lm_s": 31.0, "retrieval_s": 0.01, "cache_s": 1.0, "verify_wait_s": 2.0}}
    parts = breakdown(res)
    assert parts["lm"] == pytest.approx(9.0) and parts["rollback waste"] == pytest.approx(22.0)
    assert sum(parts.values()) == pytest.approx(40.0)
    naive = breakdown({"mode": "naive", "latency_s": 3.0, "stats": {"lm_s": 2.0, "retrieval_s": 0.5}})
    assert naive == pytest.approx({"lm": 2.0, "retrieval": 0.5, "other": 0.5})


# ----------------------------------------------------------------------------- emulation

def test_padded_kb_answers_like_the_real_one_and_pays_the_scan(small_indexes, small_corpus):
    from experiments.emulation import PaddedCostRetriever, build_pad_index

    real = small_indexes["exact"]
    pad = build_pad_index(3000, real.encoder.dim, seed=1)
    assert pad.ntotal == 3000
    emu = PaddedCostRetriever(real, pad)
    qs = ["who wrote the national anthem", "largest city in the state", "when was the war over"]
    assert emu.search_sync(qs, 5) == real.search_sync(qs, 5)
    assert emu.search_sync(qs[:1], 20) == real.search_sync(qs[:1], 20)
    assert emu.score(qs[0], [0, 1, 2]) == real.score(qs[0], [0, 1, 2])
    assert emu.pad_searches == 2 and emu.pad_queries == 4 and emu.pad_seconds > 0
    assert emu.corpus is real.corpus and "EMULATED" in emu.label
    with pytest.raises(ConfigError):
        PaddedCostRetriever(small_indexes["bm25"], pad)


# ----------------------------------------------------------------------------- loud failure

class BatchDependentRetriever(Retriever):
    """A real exact index that BREAKS invariant 2 on purpose: searched in a batch of more than one
    query it answers the second-best passage first. Speculative verification batches differ
    from the naive loop's single searches, so outputs diverge and the harness must notice."""

    kind = "broken"

    def __init__(self, inner):
        self.inner = inner
        self.corpus = inner.corpus

    def search_sync(self, queries, k):
        hits = self.inner.search_sync(queries, k + 1)
        if len(queries) > 1:
            return [h[1:k + 1] for h in hits]
        return [h[:k] for h in hits]

    def score(self, query, doc_ids):
        return self.inner.score(query, doc_ids)


class _Res:
    """The three things run_cell needs from Resources, with real components."""

    def __init__(self, retriever, lm, questions):
        self.r, self.l, self.q = retriever, lm, questions

    def knowledge_base(self, kind, pad):
        return self.r, "broken real KB"

    def lm(self, name):
        return self.l

    def questions(self, n):
        return self.q[:n]


def test_identity_violation_fails_loudly(tmp_path, small_indexes, tiny_lm):
    from ralmspec.data.loaders import default_questions

    from experiments.grid import Cell, CellKey, IdentityError, run_cell

    cfg = parse_config({"run": {"name": "t"}, "workload": {"n": 3, "max_new_tokens": 24, "query_len": 16,
                                                           "passage_tokens": 64},
                        "main": {"variants": ["s=4"], "groups": [{"model": "tiny", "retrievers": ["exact"]}]}})
    cell = Cell(CellKey("tiny", "exact", 0, 3))
    cell.add_variant("s=4", resolve_variant("s=4", cfg.speculation))
    res = _Res(BatchDependentRetriever(small_indexes["exact"]), tiny_lm,
               [q.question for q in default_questions()[:3]])
    with pytest.raises(IdentityError, match="TOKEN IDENTITY VIOLATED"):
        run_cell(cell, res, cfg, str(tmp_path))
    assert (tmp_path / "tiny__exact__real__n3.jsonl").stat().st_size > 0  # traces kept for debugging


def test_bench_requests_start_cold(small_indexes, tiny_lm):
    """run_bench empties the cross-request caches before every request: the second of two
    identical requests encodes every query again (nothing carried over from the first)."""
    from ralmspec.bench import run_bench
    from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
    from ralmspec.engine.core import RalmEngine

    retriever = small_indexes["exact"]
    engine = RalmEngine(tiny_lm, retriever, EngineConfig())
    enc = retriever.encoder
    gen = GenerationConfig(stride=4, query_len=16, max_new_tokens=12, passage_tokens=64)
    q = "who sang the song that was number one in the uk"
    before = enc.cache_info()["misses"]
    _, runs = run_bench(engine, [q], gen, {"s": SpeculationConfig(os3=False, async_verify=False)},
                        "exact", warmup=False)
    check = SpeculationCheck()
    check.same(runs["s"][0].token_ids, runs["naive"][0].token_ids, runs["s"][0].stats)
    check.ran(min_speculated=2)  # fixed stride: the 2 steps after the first are guessed
    assert runs["naive"][0].stats["steps"] == 3
    # naive: 3 queries; speculative: the same 3 queries again (1 real + 2 cache lookups)
    assert enc.cache_info()["misses"] - before == 6


def test_oracle_bound_guesses_every_step_right(small_indexes, tiny_lm):
    """The bench's ``oracle`` guesser, taught by each question's naive run, is always right: every
    speculated step accepted, no rollback, tokens identical (what it bounds is the machinery)."""
    from ralmspec.bench import run_bench
    from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
    from ralmspec.data.loaders import default_questions
    from ralmspec.engine.core import RalmEngine

    engine = RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())
    gen = GenerationConfig(stride=2, query_len=16, max_new_tokens=16, passage_tokens=64)
    qs = [q.question for q in default_questions()[:3]]
    variants = {"oracle": SpeculationConfig(guesser="oracle", os3=False, fixed_stride=3, prefetch=1,
                                            naive_fallback=False),
                "exact": SpeculationConfig(os3=False, fixed_stride=3, prefetch=1, naive_fallback=False)}
    summaries, runs = run_bench(engine, qs, gen, variants, "exact", warmup=False)
    oracle, exact = summaries
    assert oracle.identical_fraction == 1.0 and exact.identical_fraction == 1.0
    # both force speculation; the oracle, never wrong, guesses >= 6 of the 7 steps after the first
    for name, at_least in (("oracle", 6 * len(qs)), ("exact", len(qs))):
        check = SpeculationCheck()
        for got, want in zip(runs[name], runs["naive"]):
            check.same(got.token_ids, want.token_ids, got.stats, where=(name, got.prompt))
        check.ran(min_speculated=at_least)
    assert oracle.acceptance_rate == 1.0 and oracle.rollbacks == 0
    assert exact.acceptance_rate < 1.0  # prefetch 1: the cache misses passages the oracle knows


class _SleepyKB:
    """A knowledge base whose search of b queries takes b x 5 ms (no encoder: BM25-like)."""

    corpus = [None] * 10

    def search_sync(self, texts, k):
        import time

        time.sleep(0.005 * len(texts))


class _KBRes:
    def spare_questions(self):
        return [f"q{i}" for i in range(40)]

    def knowledge_base(self, kind, pad):
        return _SleepyKB(), "sleepy"


def test_batch_cost_compares_with_single_searches_only_when_it_measured_one(tmp_path, monkeypatch):
    """'cost vs b single searches' (and the plot's dotted "b single searches" line) took the
    single-query time from the FIRST batch size listed: batch_sizes [4, 2] read 1.00x at 4, as if
    4 searches of one query had been measured. Without a batch of 1 there is no ratio and no line
    now; with one, the ratio is relative to it whatever the order of the sizes."""
    from experiments import plots
    from experiments.config import BatchCostStudy
    from experiments.studies import run_batch_cost

    table, _ = run_batch_cost(BatchCostStudy(retrievers=("bm25",), batch_sizes=(4, 2), repeats=1), _KBRes())
    assert [r["vs_one_by_one"] for r in table.rows] == [None, None]
    dotted: list[int] = []
    monkeypatch.setattr(plots, "_finish", lambda fig, path, footer: dotted.append(
        sum(line.get_linestyle() == ":" for ax in fig.axes for line in ax.get_lines())))
    plots.plot_batch_cost(table.rows, str(tmp_path / "b.png"), "")
    assert dotted == [0]
    table, _ = run_batch_cost(BatchCostStudy(retrievers=("bm25",), batch_sizes=(4, 1), repeats=1), _KBRes())
    ratio = {r["batch"]: r["vs_one_by_one"] for r in table.rows}
    assert ratio[1] == 1.0 and ratio[4] > 0  # 4 x 5 ms against 4 x (1 x 5 ms): ~1 (timing)
    plots.plot_batch_cost(table.rows, str(tmp_path / "b.png"), "")
    assert dotted == [0, 1]
