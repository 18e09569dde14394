"""The seven studies of issue 5 as tables built from the bench grid (plus the batch-cost measurement).

1. ``main``: speed-up of RaLMSpec (prefetch + OS^3 + async) over naive per retriever x model x
   dataset, beside the limit ``(a + r) / a`` and the identical-output rate.
2. ``ablations``: none / +prefetch / +os3 / +async / all.
3. ``stride``: fixed speculation strides vs OS^3.
4. ``prefetch``: prefetch sizes.
5. ``batch_cost``: latency of one batched search vs batch size, per retriever.
6. ``breakdown``: per request, time in LM, retrieval, cache, verification wait, rollback waste.
7. ``scaling``: speed-up vs knowledge-base size (EMULATED beyond the real corpus).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable

from ralmspec.bench import BenchSummary
from ralmspec.config import SpeculationConfig
from ralmspec.lm.models import builtin_names

from experiments.breakdown import ALL_PARTS, breakdown
from experiments.config import BatchCostStudy, BenchStudy, ExperimentConfig
from experiments.grid import Cell, CellKey
from experiments.resources import Resources
from experiments.tables import Column, Table, f1, f2, f3, fx, pct

IDENTITY_NOTE = ("identical = share of speculative requests whose tokens equal the naive loop's; "
                 "the harness aborts if it is ever below 100%. spec steps = speculated steps the identity "
                 "covered (0: speculation never ran, naive against naive).")
LIMIT_NOTE = ("limit = (a + r) / a from the naive runs of the same cell: total naive latency over naive "
              "latency minus its retrieval time, the speed-up of a perfect speculator.")
EMULATION_NOTE = ("EMULATED knowledge bases answer with the real passages and add the real cost of a "
                  "FAISS flat scan over synthetic vectors (experiments/emulation.py); they show the "
                  "expensive-retrieval regime, not a real large corpus.")


def _opt(v: Any, f: Callable[[Any], str]) -> str:
    return "-" if v is None else f(v)


def _cells_of(study: BenchStudy, cells: dict[CellKey, Cell], cfg: ExperimentConfig) -> list[Cell]:
    out = []
    for g in study.groups:
        n = g.n or cfg.workload.n
        for kind in g.retrievers:
            for pad in g.kb_pad:
                c = cells.get(CellKey(g.model, kind, pad, n))
                if c is not None and c.summaries:
                    out.append(c)
    return out


def _row(cell: Cell, s: BenchSummary, variant: str, cfg: ExperimentConfig) -> dict[str, Any]:
    naive = cell.runs["naive"]
    steps = sum(r.stats["steps"] for r in naive)
    return {
        "model": cell.key.model, "retriever": cell.key.retriever, "kb": cell.kb_label, "kb_size": cell.kb_size,
        "dataset": cfg.workload.dataset, "n": s.n, "variant": variant,
        "naive_s": s.naive_latency_s, "spec_s": s.speculative_latency_s, "speedup": s.speedup,
        "limit": s.limit, "identical": s.identical_fraction, "acceptance": s.acceptance_rate,
        "speculated_steps": s.speculated_steps, "verified_steps": s.verified_steps,
        "rollbacks": s.rollbacks_per_request, "mean_stride": s.mean_stride, "retrieval_share": s.naive_retrieval_share,
        "naive_retrieval_ms": 1e3 * sum(r.stats["retrieval_s"] for r in naive) / max(1, steps),
        "naive_lm_ms": 1e3 * sum(r.stats["lm_s"] for r in naive) / max(1, steps),
        "share_of_limit": (s.speedup - 1) / (s.limit - 1) if s.limit > 1.0001 else None,
    }


COMMON_COLS = [
    Column("naive_s", "naive s/req", f3), Column("spec_s", "spec s/req", f3),
    Column("speedup", "speed-up", fx), Column("limit", "limit (a+r)/a", fx),
    Column("identical", "identical", pct),
    Column("acceptance", "accept", lambda v: _opt(v, f2)), Column("speculated_steps", "spec steps"),
    Column("rollbacks", "rollbacks/req", f2),
    Column("mean_stride", "mean stride", lambda v: _opt(v, f2)),
]


def models_note(models: Iterable[str]) -> str:
    """What the models of a run are: the built-ins have seeded random weights (their text is
    meaningless, their compute real); any other (``smollm2``, a folder) is a pretrained LM."""
    names = sorted(set(models))
    random = [m for m in names if m in builtin_names()]
    real = [m for m in names if m not in random]
    parts = ([f"{', '.join(random)}: seeded random GPT-2-shaped transformers (text meaningless; the compute is "
              f"real)"] if random else []) + ([f"{', '.join(real)}: pretrained (real text)"] if real else [])
    return "Models: " + "; ".join(parts) + "."


def main_table(cfg: ExperimentConfig, cells: dict[CellKey, Cell]) -> Table:
    st = cfg.bench["main"]
    rows = [_row(c, c.summary(v, cfg.speculation), v, cfg) for c in _cells_of(st, cells, cfg) for v in st.variants]
    cols = [Column("model", "model"), Column("retriever", "retriever"), Column("kb", "knowledge base"),
            Column("dataset", "dataset"), Column("n", "n"), Column("variant", "variant"),
            Column("retrieval_share", "naive retrieval share", pct), *COMMON_COLS]
    notes = ["variant 'all' = RaLMSpec with prefetch 20 + OS^3 + asynchronous verification.",
             LIMIT_NOTE, IDENTITY_NOTE,
             models_note(r["model"] for r in rows)]
    if any(r["kb"].startswith("EMULATED") for r in rows):
        notes.append(EMULATION_NOTE)
    return Table("main", "Main table: RaLMSpec vs naive iterative RaLM", cols, rows, notes)


def variant_table(name: str, title: str, cfg: ExperimentConfig, cells: dict[CellKey, Cell],
                  notes: list[str]) -> Table:
    st = cfg.bench[name]
    rows = [_row(c, c.summary(v, cfg.speculation), v, cfg) for c in _cells_of(st, cells, cfg) for v in st.variants]
    cols = [Column("model", "model"), Column("retriever", "retriever"), Column("kb", "knowledge base"),
            Column("n", "n"), Column("variant", "variant"), *COMMON_COLS]
    if any(r["kb"].startswith("EMULATED") for r in rows):
        notes = [*notes, EMULATION_NOTE]
    return Table(name, title, cols, rows, [*notes, LIMIT_NOTE, IDENTITY_NOTE])


def ablation_table(cfg, cells) -> Table:
    return variant_table("ablations", "Ablations (paper Table 2 ladder)", cfg, cells, [
        "none = speculation with a fixed stride of 3, no prefetch (top-1 cached), synchronous verification;",
        "+prefetch = none + top-20 prefetch; +os3 = none + OS^3 stride; +async = none + asynchronous "
        "verification; all = prefetch 20 + OS^3 + async."])


def stride_table(cfg, cells) -> Table:
    return variant_table("stride", "Speculation stride: fixed vs OS^3", cfg, cells, [
        "s=K = RaLMSpec (prefetch 20, async) with OS^3 off and a fixed stride of K speculative steps per "
        "verification; all = the same with OS^3 choosing the stride."])


def prefetch_table(cfg, cells) -> Table:
    return variant_table("prefetch", "Prefetch size", cfg, cells, [
        "prefetch=K = RaLMSpec (OS^3, async) caching the top-K of every verification; all = prefetch 20."])


def scaling_table(cfg: ExperimentConfig, cells: dict[CellKey, Cell]) -> Table:
    st = cfg.bench["scaling"]
    rows = [_row(c, c.summary(v, cfg.speculation), v, cfg) for c in _cells_of(st, cells, cfg) for v in st.variants]
    rows.sort(key=lambda r: (r["model"], r["retriever"], r["variant"], r["kb_size"]))
    cols = [Column("model", "model"), Column("retriever", "retriever"), Column("kb_size", "KB vectors", lambda v: f"{v:,}"),
            Column("kb", "knowledge base"), Column("n", "n"), Column("variant", "variant"),
            Column("naive_retrieval_ms", "naive retrieval ms/step", f1), Column("naive_lm_ms", "naive LM ms/step", f1),
            *COMMON_COLS, Column("share_of_limit", "(speed-up-1)/(limit-1)", lambda v: _opt(v, f2))]
    return Table("scaling", "Scaling: speed-up vs knowledge-base size", cols, rows,
                 [EMULATION_NOTE, LIMIT_NOTE, IDENTITY_NOTE])


def breakdown_cells(cfg: ExperimentConfig, cells: dict[CellKey, Cell]) -> list[Cell]:
    out: list[Cell] = []
    for name in cfg.breakdown.studies if cfg.breakdown else ():
        if name in cfg.bench:
            for c in _cells_of(cfg.bench[name], cells, cfg):
                if c not in out:
                    out.append(c)
    return out


def breakdown_variant(cell: Cell, cfg: ExperimentConfig) -> str:
    """The variant a breakdown shows: 'all' if the cell ran it, else its first variant."""
    try:
        cell.summary("all", cfg.speculation)
        return "all"
    except KeyError:
        return next(iter(cell.variants))


def breakdown_table(cfg: ExperimentConfig, cells: dict[CellKey, Cell]) -> Table:
    rows = []
    for c in breakdown_cells(cfg, cells):
        v = breakdown_variant(c, cfg)
        for label, results in (("naive", c.runs["naive"]), (v, c.runs_of(v, cfg.speculation))):
            parts = [breakdown(r.to_dict(with_trace=True)) for r in results]
            row = {"model": c.key.model, "retriever": c.key.retriever, "kb": c.kb_label, "mode": label,
                   "n": len(results), "latency": statistics.fmean(r.latency_s for r in results)}
            for p in ALL_PARTS:
                row[p] = statistics.fmean(x.get(p, 0.0) for x in parts)
            if label != "naive":
                row["verify_total"] = statistics.fmean(r.stats["verify_s"] for r in results)
                row["wasted_tokens"] = statistics.fmean(r.stats["wasted_tokens"] for r in results)
            rows.append(row)
    cols = [Column("model", "model"), Column("retriever", "retriever"), Column("kb", "knowledge base"),
            Column("mode", "mode"), Column("n", "n"), Column("latency", "latency s", f3),
            *[Column(p, f"{p} s", f3) for p in ALL_PARTS],
            Column("verify_total", "verification s (incl. overlapped)", lambda v: _opt(v, f3)),
            Column("wasted_tokens", "wasted tokens", lambda v: _opt(v, f1))]
    return Table("breakdown", "Latency breakdown per request (mean seconds)", cols, rows, [
        "Critical-path seconds per request; the parts sum to the latency. 'rollback waste' = LM time of "
        "chunks discarded by rollbacks (replayed from the trace); 'verify wait' = time blocked on a "
        "verification; the rest of an asynchronous verification overlaps LM work (its total is in the "
        "'verification s' column). 'cache' includes encoding the query of each speculative step.",
        "Per-request bars are in breakdown_*.png."])


# ----------------------------------------------------------------------------- batch cost


def _fresh_texts(pool: list[str], start: int, m: int) -> list[str]:
    """``m`` distinct query texts starting at ``start`` (suffixed once the pool is exhausted)."""
    out = []
    for i in range(start, start + m):
        base = pool[i % len(pool)]
        rnd = i // len(pool)
        out.append(base if rnd == 0 else f"{base} #{rnd}")
    return out


def run_batch_cost(study: BatchCostStudy, res: Resources,
                   progress: Callable[[int], None] | None = None) -> tuple[Table, list[dict[str, Any]]]:
    """Latency of one ``search_sync`` of a batch vs batch size, per knowledge base.

    Dense: the query encoding (MiniLM, one text at a time by contract) is timed separately
    (``encode``) from the search with warm encodings (``search``); BM25 has no encoding step.
    Every measurement uses query texts not seen before (fresh for the encoder's LRU cache).
    """
    pool = res.spare_questions() or res.all_questions()
    entries = [(k, 0) for k in study.retrievers] + [("exact", p) for p in study.kb_pad]
    raw: list[dict[str, Any]] = []
    cursor = 0
    for kind, pad in entries:
        r, label = res.knowledge_base(kind, pad)
        enc = getattr(r, "encoder", None)
        warm = _fresh_texts(pool, cursor, 2)
        cursor += 2
        r.search_sync(warm, study.k)  # warm-up (threads, caches)
        for b in study.batch_sizes:
            for rep in range(study.repeats):
                texts = _fresh_texts(pool, cursor, b)
                cursor += b
                t_enc = 0.0
                if enc is not None:
                    t = time.perf_counter()
                    enc.encode_queries(texts)
                    t_enc = time.perf_counter() - t
                t = time.perf_counter()
                r.search_sync(texts, study.k)
                t_search = time.perf_counter() - t
                raw.append({"retriever": kind, "pad": pad, "kb": label, "kb_size": len(r.corpus) + pad,
                            "batch": b, "repeat": rep, "k": study.k, "encode_s": t_enc, "search_s": t_search})
                if progress:
                    progress(1)
    rows = []
    for kind, pad in entries:
        # the single-query time is that of batches of 1 (none measured: no ratio, "-"); it was the
        # per-query time of the first size listed, so [4, 8] read 1.00x at 4 as if 4 single searches
        singles = [x["search_s"] for x in raw if x["retriever"] == kind and x["pad"] == pad and x["batch"] == 1]
        one = statistics.median(singles) if singles else None
        for b in study.batch_sizes:
            pts = [x for x in raw if x["retriever"] == kind and x["pad"] == pad and x["batch"] == b]
            search = statistics.median(x["search_s"] for x in pts)
            enc_s = statistics.median(x["encode_s"] for x in pts)
            rows.append({"retriever": kind, "kb": pts[0]["kb"], "kb_size": pts[0]["kb_size"], "batch": b,
                         "search_ms": 1e3 * search, "per_query_ms": 1e3 * search / b,
                         "encode_ms_per_query": 1e3 * enc_s / b,
                         "vs_one_by_one": search / (one * b) if one else None})
    cols = [Column("retriever", "retriever"), Column("kb", "knowledge base"), Column("batch", "batch"),
            Column("search_ms", "batched search ms", f2), Column("per_query_ms", "ms / query", f3),
            Column("vs_one_by_one", "cost vs b single searches", lambda v: _opt(v, f2)),
            Column("encode_ms_per_query", "+ encode ms / query", f2)]
    table = Table("batch_cost", "Batched retrieval cost vs batch size", cols, rows, [
        f"median of {study.repeats} runs of one search_sync(k={study.k}) with warm query encodings; "
        "'cost vs b single searches' = batched time / (b x the single-query time; '-' without "
        "batch size 1 in batch_sizes).",
        "Query encoding is timed separately: the MiniLM encoder encodes each query alone (the "
        "batch-invariance contract), so it does not amortise; in RaLMSpec it is paid on the "
        "speculative step (cache lookup), not in the verification.", EMULATION_NOTE])
    return table, raw


def all_bench_rows(cells: Iterable[Cell], cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Every (cell, variant) summary as one flat row (for summary.csv)."""
    out = []
    for c in cells:
        for name, s in c.summaries.items():
            row = _row(c, s, name, cfg)
            row["cell_wall_s"] = c.wall_s
            row["studies"] = ",".join(sorted(c.studies))
            out.append(row)
    return out


def spec_of(cell: Cell, name: str) -> SpeculationConfig:
    return cell.variants[name]
