"""Token-level perplexity of the base LM and of the kNN-LM on a text (``ralmspec knnlm eval``).

What is scored
--------------
A text is a list of documents (``ralmspec.knnlm.texts``). Each document is tokenised on its own
(``lm.tokenizer.encode``: no special tokens, no truncation) and scored on its own: documents are
not concatenated, so no document is context for another, and the first token of a document is
not predicted (nothing precedes it; no BOS is added, as the datastore build adds none). Every
other token is predicted exactly once, so ``tokens`` = Σ (document length - 1) with nothing
skipped; a document of fewer than 2 tokens contributes none and is counted in
``empty_documents``. WikiText's ``<unk>`` marker is text like any other (SmolLM2's tokenizer makes
``<``, ``unk``, ``>`` of it) and is scored.

Sliding windows (the datastore's own, :func:`~ralmspec.knnlm.datastore.window_plan`): the
targets of a document are taken in blocks of ``stride`` positions, and the block ``[b0, b1)`` is
scored from ONE forward over tokens ``[max(0, b1 - context), b1)`` (``lm.forward_scores``). So
every token is predicted from at least ``context - stride`` earlier tokens (all of them near the
start of its document). With ``context`` / ``stride`` equal to the datastore's key window /
stride (the CLI's default), a text inside the datastore produces queries equal to its keys up
to float rounding (batched vs single forwards).

At a position with target ``y``: the query is the final hidden state (the input of the LM head,
the datastore's key layer); ``log p_lm(y) = log_softmax(logits)[y]`` in float64, the model's own logits (``lm.forward_scores``);
``p_knn(y) = Σ_{i: v_i = y} softmax(-d/T)_i`` over the ``k`` neighbours (``d`` = squared L2, the
decoder's :func:`~ralmspec.knnlm.model.knn_distribution`); ``log p(y) = log(λ p_knn(y) + (1-λ)
p_lm(y))`` (with λ = 0 this IS ``log p_lm(y)``). Perplexity = ``exp(-Σ log p / tokens)``.

Sweeps in one pass
------------------
The LM runs once per window for every (λ, k, T). Neighbours are searched once per batch of
``search_batch`` queries and per k: with an exact (flat) index, one search with the largest k,
whose first k neighbours ARE the canonical top-k for every smaller k (same ids, same float64
distances: the ranking is total and each distance is a function of the query and one key); with
an approximate index, one search per k, as separate runs would do. T and λ are arithmetic on the
neighbours. Sums are accumulated per batch in the same order whatever the sweep, so a sweep
reports the numbers separate runs report.

Overlap with the datastore (leakage)
------------------------------------
A text inside the datastore gets a trivially low kNN-LM perplexity (its queries find their own
keys, whose values are its targets). So every evaluation measures how much of the scored text
the datastore holds verbatim: a scored token is *covered* when it lies in a span of
``OVERLAP_NGRAM`` (= 32) consecutive scored tokens of its document that also occurs as
consecutive values (next tokens) of one datastore document. The datastore's values are its
source text's tokens (all but each document's first), so this needs nothing but the datastore:
it works on every datastore, old ones included, whatever built it. Spans are compared by a
64-bit rolling hash (a collision, ~N / 2^64 per span, could only over-count). ``overlap_tokens``
is reported beside the perplexities; the CLI prints a warning when it is at least
``OVERLAP_WARN`` (= 5%) of the scored tokens. Natural repetition counts too: the second halves
of the first 4 WikiText-103 test articles vs their first halves, 155 of 6,000 SmolLM2 tokens
(2.6%: the first article's body repeats sentences of its lead; in the tiny model's first 300
tokens of it, 14%); vs the valid articles, 0.

Search recall (approximate indexes)
-----------------------------------
The same queries are also searched exactly (:func:`~ralmspec.knnlm.datastore.exact_twin`, a flat
index over the same stored keys): ``recall@k`` = Σ |approximate top-k ∩ exact top-k| / Σ k.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ralmspec.config import is_int
from ralmspec.errors import ConfigError
from ralmspec.knnlm.datastore import exact_twin, window_plan
from ralmspec.knnlm.model import check_compatible

MAX_K = 4096
OVERLAP_NGRAM = 32  # tokens of a span that counts as held verbatim by the datastore (module doc)
OVERLAP_WARN = 0.05  # share of covered scored tokens from which the CLI warns of a leak
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)


def _unique(values: Sequence[Any], name: str) -> tuple[Any, ...]:
    out = tuple(dict.fromkeys(values))
    if not out:
        raise ConfigError(f"give at least one {name}")
    return out


@dataclass(frozen=True)
class PerplexityConfig:
    """What ``evaluate_perplexity`` computes (module doc); every list is a sweep axis."""

    context: int = 512  # tokens per forward window
    stride: int = 256  # targets scored per window (each sees >= context - stride tokens)
    lams: tuple[float, ...] = (0.25,)  # λ in [0, 1)
    ks: tuple[int, ...] = (16,)
    temperatures: tuple[float, ...] = (1.0,)
    max_tokens: int | None = None  # score at most this many tokens (documents in order, the last one cut)
    search_batch: int = 256  # queries per datastore search
    recall: bool = True  # approximate index: also search exactly and report recall@k

    def __post_init__(self) -> None:
        object.__setattr__(self, "lams", _unique([float(x) for x in self.lams], "λ"))
        object.__setattr__(self, "ks", _unique(list(self.ks), "k"))
        object.__setattr__(self, "temperatures", _unique([float(x) for x in self.temperatures], "temperature"))
        if not isinstance(self.context, int) or self.context < 2:
            raise ConfigError(f"context must be an integer >= 2, got {self.context!r}")
        if not isinstance(self.stride, int) or not 1 <= self.stride <= self.context - 1:
            raise ConfigError(f"stride must be an integer in [1, context - 1 = {self.context - 1}] (each "
                              f"target needs >= 1 token of context), got {self.stride!r}")
        for lam in self.lams:
            if not 0.0 <= lam < 1.0:
                raise ConfigError(f"λ must be in [0, 1), got {lam!r} (with λ = 1 a target no neighbour has "
                                  "gets probability 0: infinite perplexity)")
        for k in self.ks:
            if not is_int(k, 1, MAX_K, numpy=True):
                raise ConfigError(f"k must be an integer in [1, {MAX_K}], got {k!r}")
        for t in self.temperatures:
            if not (t > 0.0 and math.isfinite(t)):
                raise ConfigError(f"temperature must be finite and > 0, got {t!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ConfigError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        if not isinstance(self.search_batch, int) or self.search_batch < 1:
            raise ConfigError(f"search_batch must be a positive integer, got {self.search_batch!r}")


@dataclass(frozen=True)
class PerplexityRun:
    """One point of the sweep."""

    lam: float
    k: int
    temperature: float
    ppl: float


@dataclass
class PerplexityResult:
    tokens: int  # targets scored
    ppl_base: float
    runs: list[PerplexityRun]
    documents: int  # documents with >= 2 tokens (scored)
    empty_documents: int  # documents with < 2 tokens (nothing to predict)
    context: int
    stride: int
    datastore: dict = field(default_factory=dict)  # Datastore.describe()
    recall: dict[int, float] | None = None  # k -> recall@k of an approximate index (None: exact)
    overlap_tokens: int = 0  # scored tokens inside an OVERLAP_NGRAM-token span the datastore holds
    lm: str | None = None  # the evaluated LM's name
    lm_s: float = 0.0
    search_s: float = 0.0
    wall_s: float = 0.0

    def best(self) -> PerplexityRun:
        return min(self.runs, key=lambda r: r.ppl)

    @property
    def overlap_fraction(self) -> float:
        """Share of the scored tokens the datastore holds verbatim (module doc, "Overlap")."""
        return self.overlap_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        """``{"tokens", "ppl_base", "runs": [{"lam", "k", "temperature", "ppl"}, ...]}`` (the
        shape ``--json`` promises) followed by the settings and timings."""
        return {"tokens": self.tokens, "ppl_base": self.ppl_base,
                "runs": [{"lam": r.lam, "k": r.k, "temperature": r.temperature, "ppl": r.ppl} for r in self.runs],
                "documents": self.documents, "empty_documents": self.empty_documents, "context": self.context,
                "stride": self.stride, "lm": self.lm, "datastore": self.datastore,
                "recall": None if self.recall is None else {str(k): v for k, v in self.recall.items()},
                "overlap": {"ngram": OVERLAP_NGRAM, "tokens": self.overlap_tokens,
                            "fraction": self.overlap_fraction},
                "lm_s": self.lm_s, "search_s": self.search_s, "wall_s": self.wall_s}


class _Sums:
    """Running sums of -log p: the base LM's and one per (λ, k, T), plus recall counts."""

    def __init__(self, cfg: PerplexityConfig):
        self.cfg = cfg
        self.base = 0.0
        self.knn = {(lam, k, t): 0.0 for k in cfg.ks for t in cfg.temperatures for lam in cfg.lams}
        self.hits = {k: 0 for k in cfg.ks}
        self.slots = {k: 0 for k in cfg.ks}

    def add(self, logp_lm: np.ndarray, targets: np.ndarray, neighbours: dict[int, tuple[np.ndarray, np.ndarray]],
            values: np.ndarray) -> None:
        """One batch: ``neighbours[k] = (ids [b, k], squared distances [b, k])`` (canonical order)."""
        self.base -= float(logp_lm.sum())
        with np.errstate(divide="ignore"):
            for k, (ids, dists) in neighbours.items():
                hit = values[ids] == targets[:, None]
                for t in self.cfg.temperatures:
                    w = np.exp(-(dists - dists[:, :1]) / t)  # row minimum first: the canonical order
                    p_knn = (w * hit).sum(axis=1) / w.sum(axis=1)
                    log_knn = np.log(p_knn)
                    for lam in self.cfg.lams:
                        logp = np.logaddexp(np.log(lam) + log_knn, np.log1p(-lam) + logp_lm)
                        self.knn[(lam, k, t)] -= float(logp.sum())

    def add_recall(self, approx: dict[int, np.ndarray], exact_ids: np.ndarray) -> None:
        for k, ids in approx.items():
            ex = exact_ids[:, :ids.shape[1]]
            self.hits[k] += sum(np.intersect1d(a, e).size for a, e in zip(ids, ex))
            self.slots[k] += ids.size


def _span_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """uint64 rolling hash of every span ``tokens[s:s + n]`` (``len(tokens) - n + 1`` of them;
    none when shorter). A function of the span's tokens alone."""
    t = np.asarray(tokens, dtype=np.uint64) + np.uint64(1)
    m = t.size - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):
        h *= _HASH_MUL  # wraps modulo 2^64
        h += t[j:j + m]
    return h


def datastore_span_hashes(datastore: Any, n: int = OVERLAP_NGRAM, block: int = 1 << 22) -> np.ndarray:
    """Sorted hashes (repeats kept: a sort is ~15x faster than ``np.unique`` here) of every
    ``n``-token span of consecutive values inside one document of ``datastore`` (its source
    text's tokens), read in blocks of ``block`` start positions (10M entries: 1.6 s, 2-core VM)."""
    values, offsets = datastore.values, np.asarray(datastore.doc_offsets, dtype=np.int64)
    total = int(values.shape[0])
    parts: list[np.ndarray] = []
    for s in range(0, max(0, total - n + 1), block):
        e = min(s + block, total - n + 1)  # span starts [s, e)
        h = _span_hashes(np.asarray(values[s:e + n - 1]), n)
        starts = np.arange(s, e, dtype=np.int64)
        ends = offsets[np.searchsorted(offsets, starts, side="right")]  # each start's document end
        parts.append(h[starts + n <= ends])
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def overlap_tokens(docs: Sequence[Sequence[int]], stored: np.ndarray, n: int = OVERLAP_NGRAM) -> int:
    """Scored tokens of ``docs`` (token ids; each document's targets are ``ids[1:]``) that lie in
    an ``n``-token span of targets whose hash is in ``stored`` (sorted, ``datastore_span_hashes``)."""
    covered = 0
    for ids in docs:
        targets = np.asarray(ids[1:], dtype=np.int64)
        h = _span_hashes(targets, n)
        if not h.size or not stored.size:
            continue
        pos = np.minimum(np.searchsorted(stored, h), stored.size - 1)
        hit = np.flatnonzero(stored[pos] == h)
        mark = np.zeros(targets.size + 1, dtype=np.int64)
        np.add.at(mark, hit, 1)
        np.add.at(mark, hit + n, -1)
        covered += int(np.count_nonzero(np.cumsum(mark)[:-1]))
    return covered


def _scored_documents(lm: Any, documents: Sequence[str], max_tokens: int | None) -> tuple[list[list[int]], int]:
    """Token ids of the documents to score (cut at ``max_tokens`` targets) and the number of
    documents with nothing to predict."""
    out: list[list[int]] = []
    empty = 0
    budget = max_tokens if max_tokens is not None else math.inf
    total = 0
    for doc in documents:
        if total >= budget:
            break
        if not isinstance(doc, str):
            raise ConfigError(f"documents must be strings, got {type(doc).__name__}")
        ids = lm.tokenizer.encode(doc)
        if len(ids) < 2:
            empty += 1
            continue
        take = int(min(len(ids) - 1, budget - total))
        out.append(ids[:take + 1])
        total += take
    return out, empty


def evaluate_perplexity(lm: Any, datastore: Any, documents: Sequence[str], config: PerplexityConfig | None = None,
                        *, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``lm`` and of the kNN-LM (``lm`` + ``datastore``) on ``documents`` for every
    (λ, k, T) of ``config`` (module doc). ``lm``: an ``HFLanguageModel`` (``forward_scores``,
    ``model``, ``tokenizer``, ``max_context``); ``datastore``: a loaded (possibly sharded)
    datastore built with the same model. ConfigError if they do not match, if ``context``
    exceeds the model's, if a ``k`` exceeds the datastore's entries, or if the text has no token
    to score."""
    import torch
    from tqdm.auto import tqdm

    cfg = config or PerplexityConfig()
    check_compatible(lm, datastore)
    entries = int(datastore.n)
    if max(cfg.ks) > entries:  # the search clamps k: a row labelled k would hold fewer neighbours
        raise ConfigError(f"k = {max(cfg.ks)} exceeds the datastore's {entries:,} entries (a search returns at most "
                          f"all of them, so that row would not be k-NN); give k <= {entries}")
    max_ctx = int(getattr(lm, "max_context", cfg.context))
    if cfg.context > max_ctx:
        raise ConfigError(f"context {cfg.context} exceeds the model's context length {max_ctx}")
    t_start = time.perf_counter()
    docs, empty = _scored_documents(lm, documents, cfg.max_tokens)
    total = sum(len(ids) - 1 for ids in docs)
    if total == 0:
        raise ConfigError("the text has no token to score: every document has fewer than 2 tokens")
    overlap = overlap_tokens(docs, datastore_span_hashes(datastore))
    exact = datastore.index_kind == "flat"
    twin = None
    if not exact and cfg.recall:
        if not hasattr(datastore, "keys"):
            raise ConfigError("the search recall of a sharded approximate datastore is not measured; "
                              "pass recall=False (--no-recall) or evaluate the whole datastore")
        twin = exact_twin(datastore)
    sums = _Sums(cfg)
    kmax = max(cfg.ks)
    timing = {"lm": 0.0, "search": 0.0}
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        queries = np.concatenate([p[0] for p in pending])
        targets = np.concatenate([p[1] for p in pending])
        logp_lm = np.concatenate([p[2] for p in pending])
        pending.clear()
        t0 = time.perf_counter()
        if exact:
            ids, dists = datastore.search(queries, kmax)
            neighbours = {k: (ids[:, :k], dists[:, :k]) for k in cfg.ks}
        else:
            neighbours = {k: datastore.search(queries, k) for k in cfg.ks}
        timing["search"] += time.perf_counter() - t0
        if twin is not None:
            sums.add_recall({k: nb[0] for k, nb in neighbours.items()}, twin.search(queries, kmax)[0])
        sums.add(logp_lm, targets, neighbours, datastore.values)

    bar = tqdm(total=total, desc="knnlm eval", unit="tok", disable=not progress)
    queued = 0
    for ids in docs:
        for w0, b0, b1 in window_plan(len(ids) - 1, cfg.context, cfg.stride):
            t0 = time.perf_counter()
            # the scored positions [b0, b1) are the window's last ones: the model's own logits
            # there (not lm_head(hidden): Granite, Cohere, Gemma 2 transform them after the head)
            hidden, logits = lm.forward_scores(ids[w0:b1], b1 - b0)
            targets = np.asarray(ids[b0 + 1:b1 + 1], dtype=np.int64)
            with torch.inference_mode():
                logp = torch.log_softmax(logits.double(), dim=-1)[torch.arange(len(targets)), torch.from_numpy(targets)]
            timing["lm"] += time.perf_counter() - t0
            pending.append((hidden.numpy().astype(np.float32, copy=False), targets, logp.cpu().numpy()))
            queued += len(targets)
            if queued >= cfg.search_batch:
                flush()
                queued = 0
            bar.update(len(targets))
    flush()
    bar.close()

    def ppl(nll: float) -> float:
        return math.exp(nll / total)

    runs = [PerplexityRun(lam=lam, k=k, temperature=t, ppl=ppl(nll)) for (lam, k, t), nll in sums.knn.items()]
    recall = None if twin is None else {k: sums.hits[k] / sums.slots[k] for k in cfg.ks}
    return PerplexityResult(tokens=total, ppl_base=ppl(sums.base), runs=runs, documents=len(docs),
                            empty_documents=empty, context=cfg.context, stride=cfg.stride,
                            datastore=datastore.describe(), recall=recall, overlap_tokens=overlap,
                            lm=getattr(lm, "name", None), lm_s=timing["lm"],
                            search_s=timing["search"], wall_s=time.perf_counter() - t_start)


__all__ = ["PerplexityConfig", "PerplexityResult", "PerplexityRun", "evaluate_perplexity", "datastore_span_hashes",
           "overlap_tokens", "OVERLAP_NGRAM", "OVERLAP_WARN"]
