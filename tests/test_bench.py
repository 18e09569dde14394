"""ralmspec/bench.py: run_bench refuses arguments of the wrong kind before any request."""

from __future__ import annotations

import pytest

from ralmspec.bench import run_bench
from ralmspec.config import GenerationConfig, SpeculationConfig
from ralmspec.errors import ConfigError

GEN = GenerationConfig(max_new_tokens=4)
SPEC = SpeculationConfig()


@pytest.mark.parametrize("questions, gen, variants, message", [
    # its characters became the questions: a ConfigError 'prompt must be a non-empty string' at the first space
    ("Who is Robert Boulter?", GEN, {"s": SPEC}, "got one string: pass \\[question\\]"),
    # every request ran, then summarize failed: TypeError: asdict() should be called on dataclass instances
    (["q"], None, {"s": SPEC}, "gen must be a GenerationConfig"),
    (["q"], GEN, {"s": {"prefetch": 1}}, "variant 's' must be a SpeculationConfig, got dict"),  # AttributeError
    (["q"], GEN, [SPEC], "variants must be a dict"),
    # its results were appended to the naive runs' list: a summary of the naive loop against itself
    (["q"], GEN, {"naive": SPEC}, "'naive' names the naive runs"),
])
def test_run_bench_refuses_wrong_arguments_before_any_request(questions, gen, variants, message):
    with pytest.raises(ConfigError, match=message):
        run_bench(None, questions, gen, variants, "exact")  # no engine: nothing may run


def _engine(tiny_lm, small_indexes):
    from ralmspec.config import EngineConfig
    from ralmspec.engine.core import RalmEngine

    return RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())


QUESTION = ["Who wrote the play Herons in which Robert Boulter had a starring role in 2001?"]


def test_every_variant_starts_with_its_own_empty_os3_cost_memory(tiny_lm, small_indexes, monkeypatch):
    """OS^3's cost memory (engine.costs) is keyed by guesser, so two variants with the same
    guesser shared it: the second variant's first request was seeded with the costs and the
    acceptance the first variant had just measured (an identical config then speculated at once
    where the first took verified steps to measure). Each variant starts empty now, and carries
    only its own requests' costs; the caller's engine.costs is put back."""
    from ralmspec.speculation.stride import StrideScheduler

    seeds: list[bool] = []
    seed_costs = StrideScheduler.seed_costs
    monkeypatch.setattr(StrideScheduler, "seed_costs", lambda self, c: (seeds.append(bool(c)), seed_costs(self, c))[1])
    engine = _engine(tiny_lm, small_indexes)
    mine = engine.costs
    spec = SpeculationConfig(os3=True, async_verify=False)
    run_bench(engine, QUESTION * 2, GenerationConfig(max_new_tokens=12), {"a": spec, "b": spec}, "exact",
              warmup=False)
    # requests in order: naive, a, b (question 0), naive, a, b (question 1)
    assert seeds == [False, False, True, True], seeds
    assert engine.costs is mine and engine.costs == {}


def test_cold_start_forgets_the_cheap_guessers_passage_memos(tiny_lm, small_indexes):
    """The bm25 / static guessers memoise each cached passage's words / static vector in the
    engine's shared rankers: reset_caches kept them, so of two identical variants the second
    ranked every passage the first had prepared for free (43 against 0 passages prepared,
    tiny, 16 tokens). Now every request prepares the same."""
    from dataclasses import replace

    engine = _engine(tiny_lm, small_indexes)
    spec = SpeculationConfig(os3=False, fixed_stride=3, async_verify=False, prefetch=20)
    for guesser in ("bm25", "static"):
        memo = engine.rankers.get(guesser)._passages
        made: list[int] = []
        make = memo.make
        memo.make = lambda d, make=make: (made.append(d), make(d))[1]
        per_request: list[int] = []
        generate = engine.generate

        async def counted(*args, **kwargs):
            before = len(made)
            res = await generate(*args, **kwargs)
            per_request.append(len(made) - before)
            return res

        engine.generate = counted
        try:
            sp = replace(spec, guesser=guesser)
            _, runs = run_bench(engine, QUESTION, GenerationConfig(max_new_tokens=16), {"a": sp, "b": sp}, "exact",
                                warmup=True)
        finally:
            engine.generate = generate
        assert runs["a"][0].stats["speculated"] > 0
        naive_w, a_w, b_w, naive, a, b = per_request
        assert a_w > 0 and a_w == b_w == a == b, (guesser, per_request)


def test_a_request_during_which_the_lm_runner_built_a_graph_is_measured_again(tiny_lm, small_indexes, monkeypatch):
    """The compiled runner compiles its step per attention span on first use (seconds; a naive
    request of a later question took 5.7 s against its speculative twin's 0.73 s) and the static
    runner captures CUDA graphs: whichever mode reaches a new span first paid it, the naive loop
    (it runs first). A request during which the runner built something is run again now, and
    only that measurement counts (``remeasured``). The runner's state is faked: a new span
    appears during the naive request of the second question."""
    engine = _engine(tiny_lm, small_indexes)
    spans = {64}
    monkeypatch.setattr(tiny_lm.runner, "state", lambda: {"name": "fake", "compiled_spans": sorted(spans),
                                                          "cuda_graphs": 0})
    questions = [QUESTION[0], "Where is Huntington Beach?"]
    calls: list[tuple[str, bool, object]] = []
    generate = engine.generate

    async def watched(q, **kwargs):
        res = await generate(q, **kwargs)
        calls.append((q, kwargs["speculate"], res))
        if q == questions[1] and not kwargs["speculate"]:
            spans.add(128)  # the first time: a span compiled during this request
        return res

    monkeypatch.setattr(engine, "generate", watched)
    spec = SpeculationConfig(os3=False, fixed_stride=3, async_verify=False)
    (summary,), runs = run_bench(engine, questions, GenerationConfig(max_new_tokens=8), {"s": spec}, "exact")
    naive_q1 = [res for q, speculate, res in calls if q == questions[1] and not speculate]
    assert len(naive_q1) == 2 and runs["naive"][1] is naive_q1[1]
    assert summary.remeasured == {"naive": 1, "s": 0} and summary.identical_fraction == 1.0
    assert len(calls) == 2 + 2 * 2 + 1  # warm-up (never measured again), 2 questions x 2 modes, the re-run


def test_latency_quantiles_are_measured_requests_latencies():
    """Nearest rank: every quantile is one request's latency (no interpolation between two)."""
    from types import SimpleNamespace

    from ralmspec.bench import latency_quantiles

    runs = [SimpleNamespace(latency_s=float(s)) for s in (7, 1, 10, 3, 5, 2, 9, 4, 8, 6)]
    assert latency_quantiles(runs) == {"p50": 5.0, "p90": 9.0, "max": 10.0}
    assert latency_quantiles(runs[:1]) == {"p50": 7.0, "p90": 7.0, "max": 7.0}
    assert latency_quantiles([]) == {}


def test_the_closed_book_baseline_is_measured_as_the_bench_measures(tiny_lm, small_indexes):
    """run_closed_book had no warm-up and no cold start: its first request paid the warm-up
    (SmolLM2: 0.60 s against 0.53 s for the rest) and later ones found the caches warm."""
    from ralmspec.bench import run_closed_book

    engine = _engine(tiny_lm, small_indexes)
    calls: list[str] = []
    generate, reset = engine.generate, engine.reset_caches

    async def counted(q, **kwargs):
        calls.append("generate")
        return await generate(q, **kwargs)

    engine.generate = counted
    engine.reset_caches = lambda: (calls.append("reset"), reset())[1]
    summary, runs = run_closed_book(engine, QUESTION * 2, GenerationConfig(max_new_tokens=4))
    assert calls == ["reset", "generate"] * 3  # the warm-up, then the 2 counted requests
    assert len(runs) == summary["n"] == 2 and summary["latency_quantiles"]["max"] == max(r.latency_s for r in runs)


def test_a_closed_book_request_during_which_the_lm_runner_built_a_graph_is_measured_again(tiny_lm, small_indexes,
                                                                                          monkeypatch):
    """``run_closed_book`` is documented as measured the way ``run_bench`` measures, but a
    request during which the compiled runner compiled a new span (seconds) or the static runner
    captured a graph counted with that one-off cost inside; run_bench measures such a request
    again. The runner's state is faked: a new span appears during question 1's request."""
    from ralmspec.bench import run_closed_book

    engine = _engine(tiny_lm, small_indexes)
    spans = {64}
    monkeypatch.setattr(tiny_lm.runner, "state", lambda: {"name": "fake", "compiled_spans": sorted(spans),
                                                          "cuda_graphs": 0})
    questions = [QUESTION[0], "Where is Huntington Beach?"]
    calls: list[tuple[str, object]] = []
    generate = engine.generate

    async def watched(q, **kwargs):
        res = await generate(q, **kwargs)
        calls.append((q, res))
        if q == questions[1]:
            spans.add(128)  # the first time: a span compiled during this request
        return res

    monkeypatch.setattr(engine, "generate", watched)
    summary, runs = run_closed_book(engine, questions, GenerationConfig(max_new_tokens=4))
    q1 = [res for q, res in calls if q == questions[1]]
    assert len(calls) == 1 + 2 + 1 and len(q1) == 2  # warm-up, 2 questions, the re-run
    assert runs[1] is q1[1] and summary["remeasured"] == 1


def test_graph_captures_past_the_held_cap_still_count_as_built(tiny_lm, small_indexes):
    """The bench compared the CUDA graphs a runner HOLDS: once they reach ``max_graphs`` each new
    capture drops the oldest, the number stays put, and a request that captured went unmeasured
    again. The runner counts its captures now. (A CPU stand-in for a capture: no CUDA here.)"""
    from ralmspec.bench import runner_built
    from ralmspec.config import EngineConfig
    from ralmspec.engine.core import RalmEngine
    from tests.lm.conftest import make_view

    lm = make_view(tiny_lm, block_size=16, runner="static")
    runner = lm.runner
    runner.max_graphs = 1

    class Graph:
        def replay(self) -> None:
            pass

    runner._capture = lambda step: (Graph(), None)
    engine = RalmEngine(lm, small_indexes["bm25"], EngineConfig())
    before = runner_built(engine)
    runner._replayed(runner._graphs, (0, 64), lambda: None)
    first = runner_built(engine)
    runner._replayed(runner._graphs, (1, 64), lambda: None)  # the cap drops (0, 64): 1 held, as before
    assert runner.captured_graphs == 1 and runner.graph_captures == 2
    assert before != first != runner_built(engine)
    lm.close()
