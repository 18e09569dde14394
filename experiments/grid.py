"""The bench grid: every (model, retriever, knowledge base, n) cell any study needs, run once.

A cell runs the naive loop and the UNION of the speculative variants the studies ask of it in one
``ralmspec.bench.run_bench`` call: requests alternate per question (naive, variant 1, variant
2, ...), so every speed-up compares runs measured side by side, against one naive baseline.
Variants that resolve to the same SpeculationConfig run once and are shared.

Every request starts with empty cross-request caches (``run_bench``'s cold start).

Invariant enforced here: every speculative request must return exactly the naive tokens. After
each cell its raw per-request traces are written (JSONL) and, if any variant differs, the grid
raises ``IdentityError`` naming the cell, the variant and the questions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ralmspec.bench import BenchSummary, run_bench
from ralmspec.config import SpeculationConfig
from ralmspec.engine.core import RalmEngine
from ralmspec.engine.result import GenerationResult
from ralmspec.errors import RalmSpecError

from experiments.config import ExperimentConfig
from experiments.resources import Resources
from experiments.variants import resolve_variant


class IdentityError(RalmSpecError):
    """A speculative variant produced tokens different from the naive loop: a correctness bug."""


@dataclass(frozen=True)
class CellKey:
    model: str
    retriever: str
    pad: int
    n: int

    @property
    def slug(self) -> str:
        kb = "real" if self.pad == 0 else f"pad{self.pad}"
        return f"{self.model}__{self.retriever}__{kb}__n{self.n}".replace("/", "_")


@dataclass
class Cell:
    key: CellKey
    variants: dict[str, SpeculationConfig] = field(default_factory=dict)  # canonical name -> config
    studies: set[str] = field(default_factory=set)
    # filled by run_cell
    kb_label: str = ""
    kb_size: int = 0
    summaries: dict[str, BenchSummary] = field(default_factory=dict)
    runs: dict[str, list[GenerationResult]] = field(default_factory=dict)
    wall_s: float = 0.0
    pad_stats: dict[str, Any] = field(default_factory=dict)

    def add_variant(self, name: str, spec: SpeculationConfig) -> str:
        """Register ``name``; returns the canonical name (an earlier name with the same config)."""
        for existing, s in self.variants.items():
            if s == spec:
                return existing
        self.variants[name] = spec
        return name

    def summary(self, name: str, base: SpeculationConfig) -> BenchSummary:
        """The summary of variant ``name`` (any alias of a registered config)."""
        spec = resolve_variant(name, base)
        for existing, s in self.variants.items():
            if s == spec:
                return self.summaries[existing]
        raise KeyError(f"variant {name!r} was not run in cell {self.key.slug}")

    def runs_of(self, name: str, base: SpeculationConfig) -> list[GenerationResult]:
        spec = resolve_variant(name, base)
        for existing, s in self.variants.items():
            if s == spec:
                return self.runs[existing]
        raise KeyError(f"variant {name!r} was not run in cell {self.key.slug}")


def plan_cells(cfg: ExperimentConfig) -> dict[CellKey, Cell]:
    """Every cell the enabled bench studies need, with the union of their variants."""
    cells: dict[CellKey, Cell] = {}
    for study in cfg.bench.values():
        for g in study.groups:
            n = g.n or cfg.workload.n
            for kind in g.retrievers:
                for pad in g.kb_pad:
                    key = CellKey(g.model, kind, pad, n)
                    cell = cells.setdefault(key, Cell(key))
                    cell.studies.add(study.name)
                    for v in study.variants:
                        cell.add_variant(v, resolve_variant(v, cfg.speculation))
    return dict(sorted(cells.items(), key=lambda kv: (kv[0].pad, kv[0].model, kv[0].retriever, kv[0].n)))


def write_traces(path: str, cell: Cell) -> None:
    """One JSON line per request: the cell, the variant, its config and the full GenerationResult."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for name, results in cell.runs.items():
            spec = cell.variants.get(name)
            for i, r in enumerate(results):
                row = {"cell": asdict(cell.key), "kb": cell.kb_label, "kb_size": cell.kb_size,
                       "variant": name, "speculation": asdict(spec) if spec else None,
                       "question_index": i, "result": r.to_dict(with_trace=True)}
                f.write(json.dumps(row, separators=(",", ":")) + "\n")


def run_cell(cell: Cell, res: Resources, cfg: ExperimentConfig, trace_dir: str,
             progress: Callable[[str], None] | None = None) -> Cell:
    """Run one cell, write its traces, then check token identity (IdentityError if violated)."""
    from ralmspec.config import EngineConfig

    k = cell.key
    retriever, label = res.knowledge_base(k.retriever, k.pad)
    lm = res.lm(k.model)
    engine = RalmEngine(lm, retriever, EngineConfig(model=k.model, generation=cfg.generation(),
                                                     speculation=cfg.speculation))
    questions = res.questions(k.n)
    t = time.perf_counter()
    summaries, runs = run_bench(engine, questions, cfg.generation(), dict(cell.variants),
                                k.retriever if k.pad == 0 else f"{k.retriever} (emulated)",
                                progress=progress, warmup=True)
    cell.wall_s = time.perf_counter() - t
    cell.kb_label = label
    cell.kb_size = len(retriever.corpus) + k.pad
    cell.summaries = {s.variant: s for s in summaries}
    cell.runs = runs
    if k.pad:
        cell.pad_stats = {"searches": retriever.pad_searches, "queries": retriever.pad_queries,
                          "seconds": retriever.pad_seconds}
    write_traces(os.path.join(trace_dir, f"{k.slug}.jsonl"), cell)
    bad = [s for s in summaries if s.identical_fraction < 1.0]
    if bad:
        detail = "; ".join(f"variant {s.variant!r} differs on questions {s.mismatched_questions}" for s in bad)
        raise IdentityError(f"TOKEN IDENTITY VIOLATED in cell {k.slug}: {detail}. Speculative output must equal "
                            f"the naive loop; traces are in {os.path.join(trace_dir, k.slug + '.jsonl')}")
    return cell
