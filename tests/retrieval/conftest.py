"""Session fixtures for the retrieval tests: one small real index of every kind.

The corpus (``kb_corpus``) is 160 passages spread over the embedded WikiText-103 knowledge base,
each cut to its first 40 words: real text, short so that encoding takes seconds on 2 CPU cores.
All four indexes are built once per session into a temporary directory; the dense ones share
one embeddings file (encoded once). The MiniLM ``encoder`` fixture is the session-wide one of
``tests/conftest.py`` (one model load for the whole test run).
"""

from __future__ import annotations

import os

import pytest

from ralmspec.config import RetrievalConfig
from ralmspec.data.corpus import Corpus, Passage
from ralmspec.data.loaders import default_corpus, default_questions
from ralmspec.retrieval.index import build_index, load_retriever

KINDS = ("exact", "hnsw", "ivf", "bm25")
N_PASSAGES = 160
WORDS = 40


def kb_config(kind: str, **kw) -> RetrievalConfig:
    """Small-index parameters: IVF with 8 lists and 2 probes is really approximate here."""
    base = dict(kind=kind, ivf_nlist=8, ivf_nprobe=2, hnsw_m=8, hnsw_ef_construction=40, hnsw_ef_search=16)
    base.update(kw)
    return RetrievalConfig(**base)


@pytest.fixture(scope="session")
def kb_corpus() -> Corpus:
    full = default_corpus()
    step = len(full) // N_PASSAGES
    out = []
    for i in range(N_PASSAGES):
        p = full[i * step]
        out.append(Passage(i, p.title, " ".join(p.text.split()[:WORDS]), p.source_id))
    return Corpus(out)


@pytest.fixture(scope="session")
def kb_queries(kb_corpus: Corpus) -> list[str]:
    """48 distinct queries: NQ questions, passage-derived near matches, titles and edge cases."""
    qs = [q.question for q in default_questions()[:34]]
    qs += [" ".join(kb_corpus[i].text.split()[3:15]) for i in range(0, N_PASSAGES, 16)]
    qs += ["", "the of and is", "zzqxv wqqj", kb_corpus[5].title]
    assert len(set(qs)) == len(qs) == 48
    return qs


@pytest.fixture(scope="session")
def kb_index_dirs(kb_corpus: Corpus, encoder, tmp_path_factory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("kb_indexes"))
    return {kind: build_index(kb_corpus, kind, os.path.join(root, kind), kb_config(kind), encoder,
                              show_progress=False, corpus_source="kb-test-corpus.jsonl")
            for kind in KINDS}


@pytest.fixture(scope="session")
def kb_retrievers(kb_index_dirs: dict[str, str], encoder):
    return {kind: load_retriever(d, kb_config(kind), encoder) for kind, d in kb_index_dirs.items()}
