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
    lm_s: float = 0.0
    search_s: float = 0.0
    wall_s: float = 0.0

    def best(self) -> PerplexityRun:
        return min(self.runs, key=lambda r: r.ppl)

    def to_dict(self) -> dict:
        """``{"tokens", "ppl_base", "runs": [{"lam", "k", "temperature", "ppl"}, ...]}`` (the
        shape ``--json`` promises) followed by the settings and timings."""
        return {"tokens": self.tokens, "ppl_base": self.ppl_base,
                "runs": [{"lam": r.lam, "k": r.k, "temperature": r.temperature, "ppl": r.ppl} for r in self.runs],
                "documents": self.documents, "empty_documents": self.empty_documents, "context": self.context,
                "stride": self.stride, "datastore": self.datastore,
                "recall": None if self.recall is None else {str(k): v for k, v in self.recall.items()},
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
    exceeds the model's, or if the text has no token to score."""
    import torch
    from tqdm.auto import tqdm

    cfg = config or PerplexityConfig()
    check_compatible(lm, datastore)
    max_ctx = int(getattr(lm, "max_context", cfg.context))
    if cfg.context > max_ctx:
        raise ConfigError(f"context {cfg.context} exceeds the model's context length {max_ctx}")
    t_start = time.perf_counter()
    docs, empty = _scored_documents(lm, documents, cfg.max_tokens)
    total = sum(len(ids) - 1 for ids in docs)
    if total == 0:
        raise ConfigError("the text has no token to score: every document has fewer than 2 tokens")
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
                            datastore=datastore.describe(), recall=recall, lm_s=timing["lm"],
                            search_s=timing["search"], wall_s=time.perf_counter() - t_start)


__all__ = ["PerplexityConfig", "PerplexityResult", "PerplexityRun", "evaluate_perplexity"]
