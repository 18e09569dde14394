"""Naive vs speculative on the same questions in one process: latency, speed-up, limit, identity.

Used by ``ralmspec bench`` and by the studies in ``experiments/``. Requests run one at a time,
naive and speculative alternating per question, after one warm-up question that is not counted.

Cold start: before every request the engine's cross-request caches (the query encoder's LRU,
the tokenized passages, the LM's shared prefix blocks, vLLM's included, the cheap guessers'
passage memos) are emptied (``RalmEngine.reset_caches``). Otherwise the speculative run of a
question would find every query the naive run just encoded (the queries are the same when the
tokens are) and look faster for a reason that has nothing to do with speculation. OS^3's cost memory
(``RalmEngine.costs``: measured LM step, search and encoding latencies and, as a prior until a
request's first round, the previous request's acceptance; no answers) starts empty for every
variant in every ``run_bench`` call and is then carried from request to request of that variant
alone, as in a server running that configuration: the variants would otherwise share it (it is
keyed by guesser only), so a variant's first request was seeded by the variant run just before it
(its costs and its acceptance: ``+os3``'s at prefetch 1 seeded ``all``'s), not by its own runs.
The caller's ``engine.costs`` is put back afterwards.

One-off work of the LM runner: the ``compiled`` runner compiles its step once per attention span
on first use (seconds; ~25 s on a CPU) and the static runner captures a CUDA graph per slot and
span. Whichever mode first reaches a new span pays it, and the naive loop runs first: one naive
request of a later question took 5.7 s against its speculative twin's 0.73 s (tiny, compiled,
64 tokens). A request during which the runner built something new (``runner_built`` changed) is
run again, from the same cold caches, and only that measurement counts (at most
``REMEASURE_LIMIT`` times; counted in ``BenchSummary.remeasured``).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Awaitable, Callable, Sequence

from ralmspec.answers import answer_match
from ralmspec.config import GenerationConfig, SpeculationConfig, check_type
from ralmspec.engine.core import RalmEngine
from ralmspec.engine.result import GenerationResult
from ralmspec.errors import ConfigError
from ralmspec.report import identity_phrase

REMEASURE_LIMIT = 2  # re-runs of one request after the LM runner built something during it

# The paper's ablation ladder (Table 2): speculation with fixed stride 3 and no prefetch, then
# one technique at a time, then all of them.
ABLATIONS: dict[str, dict[str, Any]] = {
    "none": dict(prefetch=1, os3=False, fixed_stride=3, async_verify=False),
    "+prefetch": dict(prefetch=20, os3=False, fixed_stride=3, async_verify=False),
    "+os3": dict(prefetch=1, os3=True, async_verify=False),
    "+async": dict(prefetch=1, os3=False, fixed_stride=3, async_verify=True),
    "all": dict(prefetch=20, os3=True, async_verify=True),
}


@dataclass
class BenchSummary:
    n: int
    retriever: str
    variant: str
    identical_fraction: float
    naive_latency_s: float
    speculative_latency_s: float
    speedup: float
    limit: float
    acceptance_rate: float | None
    # counts over the variant's requests: what the identity check covered. speculated_steps =
    # steps generated from a guessed passage and verified in a round (kept or rolled back);
    # verified_steps = steps whose passage was retrieved for real before their chunk (each
    # request's first step, OS^3 fallback steps, governor-paused steps); with speculated_steps
    # 0, identical_fraction compared the naive loop with itself
    speculated_steps: int
    verified_steps: int
    # among verified_steps: OS^3's fallback steps (stride 0), and those of them taken while the
    # realized guard held speculation off (speculation/stride.py); the rest of the fallback steps
    # are the cost model's own choice
    fallback_steps: int
    held_steps: int
    accepted: int
    rollbacks: int
    rollbacks_per_request: float
    naive_retrieval_share: float
    mean_stride: float | None
    generation: dict[str, Any]
    speculation: dict[str, Any]
    mismatched_questions: list[int]
    # fraction of requests whose text contains a gold answer (questions with answers only);
    # speculative and naive tokens are identical, so this is both modes' figure
    answer_match: float | None = None
    # the cache's top-1 right on the verified (naive-fallback) steps, where OS^3 did not speculate
    probe_hit_rate: float | None = None
    # mean over requests of (LM busy + verification busy + worker busy) / (2 x wall): <= 0.5
    # when nothing runs beside the LM, 1.0 = two threads busy all the time (more than 1 only when
    # verification rounds also overlap each other, max_inflight > 1)
    overlap: float | None = None
    # mean critical-path cost of one guess (query + the guesser's pick), milliseconds
    guess_ms: float | None = None
    # requests measured again (by mode: "naive" and this variant) because the LM runner compiled
    # or captured a graph during them (``runner_built``); only the last measurement counts
    remeasured: dict[str, int] = field(default_factory=dict)
    # per-request latency quantiles, seconds, by mode ("naive" and this variant): p50, p90, max
    # (``latency_quantiles``); the means above hide a slow tail
    latency_quantiles: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def runner_built(engine: RalmEngine) -> tuple[tuple[int, ...], int]:
    """What the engine's LM runner has built for later requests to reuse: the spans its compiled
    step was compiled for and the CUDA graphs it captured so far (``KVRunner.state``: the count of
    captures, which keeps growing once the held graphs reach their cap and the oldest are
    dropped; the graphs held, where a runner does not count captures); ``((), 0)`` for a runner
    that builds nothing (eager) or an LM without one."""
    runner = getattr(engine.lm, "runner", None)
    state = runner.state() if runner is not None else {}
    return tuple(state.get("compiled_spans", ())), int(state.get("graph_captures", state.get("cuda_graphs", 0)))


async def measured(engine: RalmEngine, once: Callable[[], Awaitable[GenerationResult]], label: str,
                   progress: Callable[[str], None] | None = None,
                   discard: Callable[[], None] | None = None) -> tuple[GenerationResult, int]:
    """``once()`` (one request), run again while the engine's LM runner built something during it
    (module doc, "One-off work"), at most ``REMEASURE_LIMIT`` times; ``discard`` undoes what a run
    that does not count left behind. The run that counts, and how many runs were discarded."""
    for attempt in range(REMEASURE_LIMIT + 1):
        built = runner_built(engine)
        res = await once()
        if runner_built(engine) == built or attempt == REMEASURE_LIMIT:
            return res, attempt
        if discard is not None:
            discard()
        if progress:
            progress(f"{label}: the LM runner compiled or captured a graph during this request "
                     f"({res.latency_s:.2f}s); measuring it again")
    raise AssertionError("unreachable")


def latency_quantiles(results: Sequence[GenerationResult]) -> dict[str, float]:
    """p50, p90 (nearest rank: the smallest latency with at least that share of requests at or
    below it, so every figure is a measured request's) and max of the requests' latencies, seconds;
    ``{}`` for none."""
    lat = sorted(r.latency_s for r in results)
    if not lat:
        return {}

    def rank(q: float) -> float:
        return lat[max(0, -(-len(lat) * q // 100) - 1)]  # ceil(n q / 100), 1-based

    return {"p50": rank(50), "p90": rank(90), "max": lat[-1]}


def summarize(naive: Sequence[GenerationResult], specs: Sequence[GenerationResult], retriever: str, variant: str,
              gen: GenerationConfig, spec: SpeculationConfig,
              answers: Sequence[Sequence[str]] | None = None,
              remeasured: dict[str, int] | None = None) -> BenchSummary:
    same = [a.token_ids == b.token_ids for a, b in zip(naive, specs)]
    t_naive = sum(r.latency_s for r in naive)
    t_ret = sum(r.stats["retrieval_s"] for r in naive)
    t_spec = sum(r.latency_s for r in specs)
    speculated = sum(r.stats["speculated"] for r in specs)
    accepted = sum(r.stats["accepted"] for r in specs)
    rollbacks = sum(r.stats["rollbacks"] for r in specs)
    strides = [s for r in specs for s in r.stats["strides"]]
    probes = sum(r.stats.get("naive_steps", 0) for r in specs)
    guesses = sum(r.stats.get("guesses", 0) for r in specs)
    return BenchSummary(
        n=len(naive), retriever=retriever, variant=variant,
        identical_fraction=sum(same) / max(1, len(same)),
        naive_latency_s=t_naive / max(1, len(naive)),
        speculative_latency_s=t_spec / max(1, len(specs)),
        speedup=t_naive / t_spec if t_spec > 0 else float("nan"),
        limit=t_naive / max(1e-12, t_naive - t_ret),
        acceptance_rate=accepted / speculated if speculated else None,
        speculated_steps=speculated, verified_steps=sum(r.stats["verified_steps"] for r in specs),
        fallback_steps=probes, held_steps=sum(r.stats.get("held_steps", 0) for r in specs),
        accepted=accepted, rollbacks=rollbacks, rollbacks_per_request=rollbacks / len(specs) if specs else 0.0,
        naive_retrieval_share=t_ret / t_naive if t_naive else 0.0,
        mean_stride=statistics.fmean(strides) if strides else None,
        generation=asdict(gen), speculation=asdict(spec),
        mismatched_questions=[i for i, ok in enumerate(same) if not ok],
        answer_match=answer_match([r.text for r in specs], answers) if answers is not None else None,
        probe_hit_rate=sum(r.stats.get("probe_hits", 0) for r in specs) / probes if probes else None,
        overlap=statistics.fmean(r.stats["overlap"] for r in specs) if specs else None,
        guess_ms=1000 * sum(r.stats.get("guess_s", 0.0) for r in specs) / guesses if guesses else None,
        remeasured=dict(remeasured or {}),
        latency_quantiles={"naive": latency_quantiles(naive), variant: latency_quantiles(specs)},
    )


def check_bench_args(questions: object, gen: object, variants: object) -> None:
    """``ConfigError`` before any request for ``run_bench`` arguments of the wrong kind: one string
    of questions (its characters became the questions), a ``gen`` that is not a
    ``GenerationConfig`` (None ran every request, then failed as a TypeError summarizing), a
    variant that is not a ``SpeculationConfig`` (an AttributeError) or is named "naive" (the
    naive runs' name: the variant's results were mixed into them, a wrong summary)."""
    if isinstance(questions, str):
        raise ConfigError("questions must be a sequence of questions, got one string: pass [question]")
    check_type(gen, GenerationConfig, "gen", hint=" (the engine's: engine.config.generation)")
    if not isinstance(variants, dict):
        raise ConfigError(f"variants must be a dict of name -> SpeculationConfig, got {type(variants).__name__}")
    for name, spec in variants.items():
        check_type(spec, SpeculationConfig, f"variant {name!r}")
        if name == "naive":
            raise ConfigError("'naive' names the naive runs in run_bench's results: give the variant another name")


def run_bench(engine: RalmEngine, questions: Sequence[str], gen: GenerationConfig,
              variants: dict[str, SpeculationConfig], retriever: str,
              progress: Callable[[str], None] | None = None, warmup: bool = True,
              cold_start: bool = True, answers: Sequence[Sequence[str]] | None = None,
              ) -> tuple[list[BenchSummary], dict[str, list[GenerationResult]]]:
    """Run naive once per question and every speculative variant, interleaved per question.
    ``answers[i]`` (gold answers of question i) adds ``answer_match`` to the summaries."""
    check_bench_args(questions, gen, variants)
    oracle = engine.rankers.get("oracle") if any(s.guesser == "oracle" for s in variants.values()) else None

    # OS^3's cost memory per variant, each starting from nothing (module doc)
    costs: dict[str, dict] = {name: {} for name in variants}
    remeasured = {"naive": 0, **{name: 0 for name in variants}}

    async def run_once(q: str, spec: SpeculationConfig | None, name: str) -> GenerationResult:
        if cold_start:
            engine.reset_caches()
        if spec is None:
            res = await engine.generate(q, gen=gen, speculate=False)
            if oracle is not None:
                teach_oracle(engine, gen, res, oracle)
            return res
        engine.costs = costs[name]
        return await engine.generate(q, gen=gen, spec=spec, speculate=True)

    async def run(q: str, spec: SpeculationConfig | None, name: str = "naive") -> GenerationResult:
        """One measured request (``measured``): a discarded run's OS^3 costs, measured with the
        runner's one-off work inside, are forgotten too."""
        seed = copy.deepcopy(costs.get(name))

        def forget_costs() -> None:
            if seed is not None:
                costs[name] = copy.deepcopy(seed)

        res, discarded = await measured(engine, lambda: run_once(q, spec, name), name, progress, forget_costs)
        remeasured[name] += discarded
        return res

    async def go():
        if warmup and questions:
            await run_once(questions[0], None, "naive")
            for name, spec in variants.items():
                await run_once(questions[0], spec, name)
        runs: dict[str, list[GenerationResult]] = {"naive": [], **{v: [] for v in variants}}
        t0 = time.perf_counter()
        for i, q in enumerate(questions):
            runs["naive"].append(await run(q, None))
            for name, spec in variants.items():
                runs[name].append(await run(q, spec, name))
            if progress:
                same = all(runs[v][-1].token_ids == runs["naive"][-1].token_ids for v in variants)
                progress(f"[{i + 1}/{len(questions)}] {time.perf_counter() - t0:6.1f}s "
                         f"naive {runs['naive'][-1].latency_s:.2f}s "
                         + " ".join(f"{v} {runs[v][-1].latency_s:.2f}s" for v in variants)
                         + ("" if same else "  TOKENS DIFFER"))
        return runs

    engine_costs = engine.costs
    try:
        runs = engine.run_sync(go)
    finally:
        engine.costs = engine_costs
    summaries = [summarize(runs["naive"], runs[v], retriever, v, gen, spec, answers,
                           {"naive": remeasured["naive"], v: remeasured[v]})
                 for v, spec in variants.items()]
    return summaries, runs


def teach_oracle(engine: RalmEngine, gen: GenerationConfig, naive: GenerationResult, oracle) -> None:
    """Tell the ``oracle`` bound guesser (speculation/guess.py) the passage of every step of a
    naive run, keyed by that step's query (the speculative run rebuilds the same queries)."""
    ctx = engine.context(gen)
    tokens = list(naive.prompt_ids) + list(naive.token_ids)
    n0 = len(naive.prompt_ids)
    for rec in naive.steps:
        oracle.learn(ctx.query(tokens[:n0 + rec.start]), rec.doc_id)


def run_closed_book(engine: RalmEngine, questions: Sequence[str], gen: GenerationConfig,
                    answers: Sequence[Sequence[str]] | None = None,
                    progress: Callable[[str], None] | None = None, warmup: bool = True,
                    cold_start: bool = True) -> tuple[dict[str, Any], list[GenerationResult]]:
    """The same questions with no retrieval (no passage): the closed-book baseline of answer_match,
    measured as ``run_bench`` measures (an uncounted warm-up request on question 0, every request
    from cold caches: the first request paid the warm-up that the others did not; a request during
    which the LM runner compiled or captured a graph measured again, ``remeasured``)."""
    remeasured = 0

    async def one(q: str) -> GenerationResult:
        if cold_start:
            engine.reset_caches()
        return await engine.generate(q, gen=gen, retrieval=False)

    async def go() -> list[GenerationResult]:
        nonlocal remeasured
        if warmup and questions:
            await one(questions[0])
        out = []
        t0 = time.perf_counter()
        for i, q in enumerate(questions):
            res, discarded = await measured(engine, lambda: one(q), "closed-book", progress)
            remeasured += discarded
            out.append(res)
            if progress:
                progress(f"[{i + 1}/{len(questions)}] {time.perf_counter() - t0:6.1f}s closed-book "
                         f"{out[-1].latency_s:.2f}s")
        return out

    runs = engine.run_sync(go)
    summary = {
        "mode": "no-retrieval", "n": len(runs),
        "latency_s": statistics.fmean(r.latency_s for r in runs) if runs else 0.0,
        "latency_quantiles": latency_quantiles(runs), "remeasured": remeasured,
        "answer_match": answer_match([r.text for r in runs], answers) if answers is not None else None,
        "generation": asdict(gen),
    }
    return summary, runs


def ablation_variants(base: SpeculationConfig) -> dict[str, SpeculationConfig]:
    return {name: replace(base, enabled=True, **kw) for name, kw in ABLATIONS.items()}


def format_table(summaries: Sequence[BenchSummary]) -> str:
    head = ("| retriever | variant | n | identical | answer match | naive s | spec s | speed-up | limit | accept "
            "| speculated steps | verified steps | fallback (held) | accepted | rollbacks | mean stride |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for s in summaries:
        acc = "-" if s.acceptance_rate is None else f"{s.acceptance_rate:.2f}"
        stride = "-" if s.mean_stride is None else f"{s.mean_stride:.2f}"
        match = "-" if s.answer_match is None else f"{100 * s.answer_match:.0f}%"
        rows.append(f"| {s.retriever} | {s.variant} | {s.n} | {100 * s.identical_fraction:.0f}% | {match} | "
                    f"{s.naive_latency_s:.3f} | {s.speculative_latency_s:.3f} | {s.speedup:.2f}x | "
                    f"{s.limit:.2f}x | {acc} | {s.speculated_steps} | {s.verified_steps} | "
                    f"{s.fallback_steps} ({s.held_steps}) | {s.accepted} | "
                    f"{s.rollbacks} | {stride} |")
    return "\n".join([head, *rows])


def identity_line(s: BenchSummary) -> str:
    """What the identity check of one variant covered: "identical over K speculated steps", and
    plainly when K is 0 (speculation never ran, so the check was the naive loop against itself)."""
    return f"{s.variant}: " + identity_phrase(s.n - len(s.mismatched_questions), s.n, "requests", s.speculated_steps,
                                              s.verified_steps, s.accepted, s.rollbacks)
