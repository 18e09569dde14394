"""The experiment configuration: a TOML file parsed into frozen dataclasses, validated up front.

Layout (every table optional except ``[run]``; a study runs iff its table is present and its
``enabled`` is not false). See ``experiments/configs/*.toml`` for complete examples.

```toml
[run]         name, cache_dir ("" = ralmspec's index cache), torch_threads / faiss_threads
              (0 = library default), seed (synthetic padding vectors)
[workload]    dataset (label), questions ("default" = embedded NQ-open dev, or a path),
              corpus ("default" = embedded WikiText-103 passages, or a path), corpus_size
              (0 = all, else the first N passages), n, question_offset, max_new_tokens,
              stride, query_len, passage_tokens
[retrieval]   hnsw_m, hnsw_ef_construction, hnsw_ef_search, ivf_nlist, ivf_nprobe, rescore_margin
[speculation] base SpeculationConfig fields (max_inflight, cache_capacity, s_max, window, gamma_max)
[main] [ablations] [stride] [prefetch] [scaling]
              variants = [...names, see experiments.variants]
              [[<study>.groups]] model, retrievers, kb_pad = [0, ...], n (optional override)
[batch_cost]  retrievers, kb_pad, batch_sizes, repeats, k
[breakdown]   studies = ["main", "scaling"]  (whose cells get a per-request time breakdown)
[quick]       dotted-key overrides applied by ``--quick`` (e.g. "workload.n" = 2)
```

``kb_pad`` > 0 is the *emulated* large knowledge base of ``experiments.emulation`` (exact
retriever only).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ralmspec.config import RETRIEVER_KINDS, GenerationConfig, RetrievalConfig, SpeculationConfig
from ralmspec.errors import ConfigError

from experiments.variants import ladder_names, resolve_variant

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BENCH_STUDIES = ("main", "ablations", "stride", "prefetch", "scaling")
ALL_STUDIES = (*BENCH_STUDIES, "batch_cost", "breakdown")
DEFAULT_VARIANTS: dict[str, list[str]] = {
    "main": ["all"],
    "ablations": ladder_names(),
    "stride": ["s=1", "s=2", "s=4", "s=8", "all"],
    "prefetch": ["prefetch=1", "all", "prefetch=256"],
    "scaling": ["all"],
}
# What --quick does to a config that has no [quick] table of its own.
GENERIC_QUICK = {"workload.n": 2, "workload.max_new_tokens": 32}


@dataclass(frozen=True)
class RunSettings:
    name: str = "experiment"
    cache_dir: str = ""
    torch_threads: int = 0
    faiss_threads: int = 0
    seed: int = 0


@dataclass(frozen=True)
class Workload:
    dataset: str = "NQ-open dev"
    questions: str = "default"
    corpus: str = "default"
    corpus_size: int = 0
    n: int = 4
    question_offset: int = 0
    max_new_tokens: int = 64
    stride: int = 4
    query_len: int = 32
    passage_tokens: int = 256

    def generation(self) -> GenerationConfig:
        return GenerationConfig(stride=self.stride, query_len=self.query_len,
                                max_new_tokens=self.max_new_tokens, passage_tokens=self.passage_tokens)


@dataclass(frozen=True)
class Group:
    """One model over some retrievers (and emulated KB paddings) with ``n`` questions."""

    model: str
    retrievers: tuple[str, ...]
    kb_pad: tuple[int, ...] = (0,)
    n: int | None = None


@dataclass(frozen=True)
class BenchStudy:
    name: str
    variants: tuple[str, ...]
    groups: tuple[Group, ...]


@dataclass(frozen=True)
class BatchCostStudy:
    retrievers: tuple[str, ...] = RETRIEVER_KINDS
    kb_pad: tuple[int, ...] = ()
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    repeats: int = 3
    k: int = 20


@dataclass(frozen=True)
class BreakdownStudy:
    studies: tuple[str, ...] = ("main", "scaling")


@dataclass(frozen=True)
class ExperimentConfig:
    run: RunSettings
    workload: Workload
    retrieval: dict[str, Any]
    speculation: SpeculationConfig
    bench: dict[str, BenchStudy]
    batch_cost: BatchCostStudy | None
    breakdown: BreakdownStudy | None
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def retrieval_config(self, kind: str) -> RetrievalConfig:
        return RetrievalConfig(kind=kind, **self.retrieval)

    def generation(self) -> GenerationConfig:
        return self.workload.generation()

    def studies(self) -> list[str]:
        out = list(self.bench)
        if self.batch_cost is not None:
            out.append("batch_cost")
        if self.breakdown is not None:
            out.append("breakdown")
        return out


# ----------------------------------------------------------------------------- parsing helpers

def _take(table: dict[str, Any], cls: type, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword arguments for dataclass ``cls`` from ``table``; unknown keys are an error."""
    names = {f.name for f in fields(cls)} - set(skip)
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"[{where}]: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    out = {}
    for f in fields(cls):
        if f.name in table:
            out[f.name] = table[f.name]
    return out


def _check_types(obj: Any, where: str) -> None:
    """Every field of a dataclass instance must have the type of its default (int/str/bool/float)."""
    defaults = type(obj)()
    for f in fields(obj):
        want, got = getattr(defaults, f.name), getattr(obj, f.name)
        if isinstance(want, bool):
            ok = isinstance(got, bool)
        elif isinstance(want, int):
            ok = isinstance(got, int) and not isinstance(got, bool)
        elif isinstance(want, float):
            ok = isinstance(got, (int, float)) and not isinstance(got, bool)
        elif isinstance(want, str):
            ok = isinstance(got, str)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"[{where}] {f.name} must be a {type(want).__name__}, got {got!r}")


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a non-empty list of strings, got {value!r}")
    return tuple(value)


def _int_list(value: Any, where: str, lo: int = 0) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= lo for v in value)):
        raise ConfigError(f"{where} must be a non-empty list of integers >= {lo}, got {value!r}")
    return tuple(value)


def _retrievers(value: Any, where: str) -> tuple[str, ...]:
    kinds = _str_list(value, where)
    for k in kinds:
        if k not in RETRIEVER_KINDS:
            raise ConfigError(f"{where}: unknown retriever {k!r}; choose from {', '.join(RETRIEVER_KINDS)}")
    return kinds


def _parse_group(g: Any, where: str) -> Group:
    if not isinstance(g, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(g) - {"model", "retrievers", "kb_pad", "n"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: model, retrievers, kb_pad, n")
    model = g.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}.model must be a model name ('smollm2', 'tiny', 'random-small', 'random-medium') or a folder")
    retrievers = _retrievers(g.get("retrievers"), f"{where}.retrievers")
    pads = _int_list(g.get("kb_pad", [0]), f"{where}.kb_pad")
    if any(p > 0 for p in pads) and set(retrievers) != {"exact"}:
        raise ConfigError(f"{where}: kb_pad > 0 emulates the cost of a larger FLAT index and is only "
                          "defined for retrievers = [\"exact\"]")
    n = g.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ConfigError(f"{where}.n must be an integer >= 1")
    return Group(model, retrievers, pads, n)


def _parse_bench(name: str, table: dict[str, Any], base: SpeculationConfig) -> BenchStudy:
    unknown = sorted(set(table) - {"enabled", "variants", "groups"})
    if unknown:
        raise ConfigError(f"[{name}]: unknown key(s) {', '.join(unknown)}; allowed: enabled, variants, groups")
    variants = _str_list(table.get("variants", DEFAULT_VARIANTS[name]), f"[{name}] variants")
    for v in variants:
        resolve_variant(v, base)  # raises on a bad name
    groups = table.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ConfigError(f"[{name}] needs at least one [[{name}.groups]] table (model, retrievers)")
    return BenchStudy(name, variants, tuple(_parse_group(g, f"[[{name}.groups]] #{i + 1}")
                                            for i, g in enumerate(groups)))


def _enabled(table: Any, name: str) -> bool:
    if table is None:
        return False
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    en = table.get("enabled", True)
    if not isinstance(en, bool):
        raise ConfigError(f"[{name}] enabled must be true or false")
    return en


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with dotted keys set (``{"workload.n": 2}``). Lists replace lists."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"override keys must be dotted strings, got {key!r}")
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a table")
            node = nxt
        node[parts[-1]] = copy.deepcopy(value)
    return out


def parse_config(raw: dict[str, Any], source: str = "") -> ExperimentConfig:
    """Validate a TOML document (already loaded) into an ExperimentConfig. ConfigError if bad."""
    known = {"run", "workload", "retrieval", "speculation", "quick", *ALL_STUDIES}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    run = RunSettings(**_take(raw.get("run", {}), RunSettings, "run"))
    _check_types(run, "run")
    if run.torch_threads < 0 or run.faiss_threads < 0:
        raise ConfigError("[run] torch_threads / faiss_threads must be >= 0 (0 = library default)")
    wl = Workload(**_take(raw.get("workload", {}), Workload, "workload"))
    _check_types(wl, "workload")
    if wl.n < 1 or wl.question_offset < 0 or wl.corpus_size < 0:
        raise ConfigError("[workload] n must be >= 1, question_offset and corpus_size >= 0")
    wl.generation()  # validates stride / query_len / max_new_tokens / passage_tokens
    retrieval = dict(raw.get("retrieval", {}))
    bad = sorted(set(retrieval) & {"kind", "index_dir"})
    if bad:
        raise ConfigError("[retrieval] must not set kind / index_dir (the studies choose the retriever)")
    _take(retrieval, RetrievalConfig, "retrieval")
    RetrievalConfig(**retrieval)  # validates values
    spec_table = dict(raw.get("speculation", {}))
    spec = SpeculationConfig(**_take(spec_table, SpeculationConfig, "speculation"))
    bench = {}
    for name in BENCH_STUDIES:
        if _enabled(raw.get(name), name):
            bench[name] = _parse_bench(name, raw[name], spec)
    bc = None
    if _enabled(raw.get("batch_cost"), "batch_cost"):
        t = {k: v for k, v in raw["batch_cost"].items() if k != "enabled"}
        kw = _take(t, BatchCostStudy, "batch_cost")
        if "retrievers" in kw:
            kw["retrievers"] = _retrievers(kw["retrievers"], "[batch_cost] retrievers")
        if "kb_pad" in kw:
            kw["kb_pad"] = _int_list(kw["kb_pad"], "[batch_cost] kb_pad", lo=1)
        if "batch_sizes" in kw:
            kw["batch_sizes"] = _int_list(kw["batch_sizes"], "[batch_cost] batch_sizes", lo=1)
        bc = BatchCostStudy(**kw)
        if not isinstance(bc.repeats, int) or bc.repeats < 1 or not isinstance(bc.k, int) or bc.k < 1:
            raise ConfigError("[batch_cost] repeats and k must be integers >= 1")
    bd = None
    if _enabled(raw.get("breakdown"), "breakdown"):
        t = {k: v for k, v in raw["breakdown"].items() if k != "enabled"}
        kw = _take(t, BreakdownStudy, "breakdown")
        if "studies" in kw:
            kw["studies"] = _str_list(kw["studies"], "[breakdown] studies")
            for s in kw["studies"]:
                if s not in BENCH_STUDIES:
                    raise ConfigError(f"[breakdown] studies: {s!r} is not a bench study ({', '.join(BENCH_STUDIES)})")
        bd = BreakdownStudy(**kw)
    if "quick" in raw and not isinstance(raw["quick"], dict):
        raise ConfigError("[quick] must be a table of dotted-key overrides")
    return ExperimentConfig(run, wl, retrieval, spec, bench, bc, bd, source, raw)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"workload": {"n": 2}}`` and ``{"workload.n": 2}`` both become ``{"workload.n": 2}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config(path: str, quick: bool = False) -> ExperimentConfig:
    """Read and validate a TOML config; ``quick`` applies its ``[quick]`` overrides (or a generic shrink)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    except UnicodeDecodeError as e:  # TOML is UTF-8
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from e
    if quick:
        overrides = raw.get("quick", GENERIC_QUICK)
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: [quick] must be a table of dotted-key overrides")
        raw = apply_overrides(raw, _flatten(overrides))
        run = dict(raw.get("run", {}))
        run["name"] = f"{run.get('name', 'experiment')}-quick" if "quick" not in str(run.get("name", "")) else run["name"]
        raw["run"] = run
    return parse_config(raw, source=path)


def with_cache_dir(cfg: ExperimentConfig, cache_dir: str) -> ExperimentConfig:
    return replace(cfg, run=replace(cfg.run, cache_dir=cache_dir))
