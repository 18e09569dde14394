"""Loads what the studies share, once: LMs, the MiniLM encoder, the corpus, indexes, questions.

Everything is lazy and cached on the ``Resources`` object (no module-level state). Indexes are
built on first use into the ralmspec index cache (``[run] cache_dir`` or ``~/.cache/ralmspec/indexes``)
keyed by corpus hash and build parameters, so a second run reuses them. At most one emulated
padding index (``experiments.emulation``) is kept at a time, since they are large.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from ralmspec.data.corpus import Corpus, Passage
from ralmspec.errors import ConfigError
from ralmspec.retrieval.base import Retriever

from experiments.config import ExperimentConfig
from experiments.emulation import PaddedCostRetriever, build_pad_index, real_label


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Resources:
    def __init__(self, cfg: ExperimentConfig, show_progress: bool = True):
        self.cfg = cfg
        self.show_progress = show_progress
        self._lms: dict[str, Any] = {}
        self._encoder = None
        self._corpus: Corpus | None = None
        self._questions: list[str] | None = None
        self._retrievers: dict[str, Retriever] = {}
        self._pad: tuple[int, Any] | None = None
        self.load_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ data
    def corpus(self) -> Corpus:
        if self._corpus is None:
            from ralmspec.data.loaders import default_corpus, load_corpus

            wl = self.cfg.workload
            full = default_corpus() if wl.corpus == "default" else load_corpus(wl.corpus)
            if wl.corpus_size and wl.corpus_size < len(full):
                full = Corpus([Passage(i, p.title, p.text, p.source_id) for i, p in enumerate(list(full)[:wl.corpus_size])])
            self._corpus = full
        return self._corpus

    def all_questions(self) -> list[str]:
        if self._questions is None:
            from ralmspec.data.loaders import default_questions, load_questions

            wl = self.cfg.workload
            qs = default_questions() if wl.questions == "default" else load_questions(wl.questions)
            self._questions = [q.question for q in qs]
        return self._questions

    def questions(self, n: int) -> list[str]:
        """The ``n`` benchmark questions (after ``question_offset``); ConfigError if too few."""
        qs = self.all_questions()
        off = self.cfg.workload.question_offset
        if off + n > len(qs):
            raise ConfigError(f"the question set has {len(qs)} questions; offset {off} + n {n} is too many")
        return qs[off: off + n]

    def spare_questions(self) -> list[str]:
        """Questions not used by any bench cell (for measurements that need fresh query texts)."""
        qs = self.all_questions()
        off = self.cfg.workload.question_offset
        return qs[:off] + qs[off + self.max_n():]

    def max_n(self) -> int:
        ns = [self.cfg.workload.n]
        for st in self.cfg.bench.values():
            ns += [g.n for g in st.groups if g.n]
        return max(ns)

    # ------------------------------------------------------------------ models
    def lm(self, name: str):
        if name not in self._lms:
            from ralmspec.lm.models import load_lm

            t = time.perf_counter()
            self._lms[name] = load_lm(name)
            self.load_seconds[f"lm:{name}"] = time.perf_counter() - t
            _log(f"loaded LM {name!r} in {time.perf_counter() - t:.1f}s")
        return self._lms[name]

    def encoder(self):
        if self._encoder is None:
            from ralmspec.retrieval.encoder import QueryEncoder

            t = time.perf_counter()
            self._encoder = QueryEncoder()
            self.load_seconds["encoder"] = time.perf_counter() - t
        return self._encoder

    # ------------------------------------------------------------------ knowledge bases
    def index_root(self) -> str:
        from ralmspec.retrieval.index import default_index_root

        return self.cfg.run.cache_dir or default_index_root()

    def retriever(self, kind: str) -> Retriever:
        """The real ``kind`` retriever over the workload corpus (index built on first use)."""
        if kind not in self._retrievers:
            from ralmspec.retrieval.index import ensure_index, load_retriever

            rcfg = self.cfg.retrieval_config(kind)
            enc = None if kind == "bm25" else self.encoder()
            t = time.perf_counter()
            wl = self.cfg.workload
            source = "embedded" if wl.corpus == "default" and not wl.corpus_size else os.path.abspath(wl.corpus)
            d = ensure_index(self.corpus(), kind, rcfg, enc, show_progress=self.show_progress,
                             root=self.index_root(), corpus_source=source)
            self._retrievers[kind] = load_retriever(d, rcfg, encoder=enc)
            self.load_seconds[f"index:{kind}"] = time.perf_counter() - t
        return self._retrievers[kind]

    def knowledge_base(self, kind: str, pad: int) -> tuple[Retriever, str]:
        """(retriever, label): the real one for ``pad == 0``, else the EMULATED padded exact one."""
        real = self.retriever(kind)
        if pad == 0:
            return real, real_label(len(real.corpus))
        if kind != "exact":
            raise ConfigError("kb_pad > 0 is only defined for the exact retriever")
        if self._pad is None or self._pad[0] != pad:
            self._pad = None  # free the previous one first
            t = time.perf_counter()
            bar = None
            if self.show_progress:
                from tqdm import tqdm

                bar = tqdm(total=pad, desc=f"synthetic pad vectors ({pad:,})", unit="vec", leave=False,
                           unit_scale=True)
            idx = build_pad_index(pad, self.encoder().dim, seed=self.cfg.run.seed,
                                  progress=bar.update if bar else None)
            if bar:
                bar.close()
            self._pad = (pad, idx)
            self.load_seconds[f"pad:{pad}"] = time.perf_counter() - t
        r = PaddedCostRetriever(real, self._pad[1])
        return r, r.label

    def close(self) -> None:
        for r in self._retrievers.values():
            r.close()
        for lm in self._lms.values():
            lm.close()
        self._pad = None
