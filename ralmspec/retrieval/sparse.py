"""Sparse retrieval: BM25 (bm25s "lucene" variant, k1=1.5, b=0.75) over the passage contents.

Tokenisation (corpus and queries alike): bm25s's regex tokenizer, lower-cased, bm25s's English
stop words removed, no stemming unless PyStemmer is installed at *build* time (the choice is
recorded in the index manifest and required again at load time), so a query's tokens are a
deterministic function of its text.

Canonical scoring: bm25s precomputes one float32 weight per (token, passage) in a sparse
token-major matrix. The score of every passage for a query is ``score_vector``: the float64 sum
of those weights over the query's in-vocabulary tokens, added in query-token order (a token that
appears twice counts twice, as in bm25s). ``search`` and ``score`` both index this one vector,
so they agree bit for bit, and a query's answer does not depend on the batch.

Ties (equal scores) go to the lower doc id (:func:`rank_hits`). A query whose tokens are all
stop words or out of vocabulary scores 0 for every passage, so its top-k is doc ids 0..k-1.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import numpy as np

from ralmspec.data.corpus import Corpus
from ralmspec.errors import ConfigError, IndexNotFoundError
from ralmspec.retrieval.base import Hit, Retriever, check_k, rank_hits

BM25_PARAMS = {"k1": 1.5, "b": 0.75, "method": "lucene"}


def _bm25s():
    try:
        import bm25s
    except ImportError as e:  # pragma: no cover - declared dependency of [cpu]
        raise ConfigError("BM25 retrieval needs the bm25s package: pip install bm25s") from e
    return bm25s


def available_stemmer() -> str | None:
    """``"english"`` if PyStemmer is importable (used for new BM25 indexes), else None."""
    try:
        import Stemmer  # noqa: F401
    except ImportError:
        return None
    return "english"


def _make_stemmer(name: str | None):
    if name is None:
        return None
    try:
        import Stemmer
    except ImportError as e:
        raise ConfigError(f"this BM25 index was built with the {name!r} PyStemmer stemmer; "
                          "install PyStemmer or rebuild the index") from e
    return Stemmer.Stemmer(name)


def tokenize(texts: Sequence[str], stemmer=None, show_progress: bool = False) -> list[list[str]]:
    """bm25s tokenisation (lower-case, English stop words removed, optional stemmer)."""
    bm25s = _bm25s()
    if len(texts) == 0:
        return []
    return bm25s.tokenize(list(texts), lower=True, stopwords="en", stemmer=stemmer,
                          return_ids=False, show_progress=show_progress)


def build_bm25(corpus: Corpus, out_dir: str, show_progress: bool = False) -> dict:
    """Index ``corpus`` contents (title + text) and save the bm25s index into ``out_dir``.

    Returns the parameters to record in the manifest.
    """
    bm25s = _bm25s()
    stemmer_name = available_stemmer()
    tokens = tokenize(corpus.contents(), _make_stemmer(stemmer_name), show_progress)
    model = bm25s.BM25(k1=BM25_PARAMS["k1"], b=BM25_PARAMS["b"], method=BM25_PARAMS["method"])
    model.index(tokens, show_progress=show_progress)
    model.save(out_dir, show_progress=False)
    return {**BM25_PARAMS, "stopwords": "en", "stemmer": stemmer_name, "vocab": len(model.vocab_dict)}


class BM25Matrix(NamedTuple):
    """A saved bm25s index as the token-major matrix of precomputed float32 weights.

    Column ``c`` (token ``t`` with ``vocab[t] == c``) holds passages ``indices[indptr[c]:indptr[c+1]]``
    with weights ``data[...]``; every weight was computed by bm25s with the statistics of the
    WHOLE collection it indexed (idf of the token, average passage length).
    """

    n: int  # passages
    data: np.ndarray  # float32 weights
    indices: np.ndarray  # int64 passage ids
    indptr: np.ndarray  # int64, columns + 1 (bm25s also maps "" to an id with no column)
    vocab: dict[str, int]  # token -> column


def load_bm25_matrix(bm25_dir: str) -> BM25Matrix:
    """Read the bm25s index saved in ``bm25_dir`` (IndexNotFoundError if unreadable)."""
    bm25s = _bm25s()
    try:
        model = bm25s.BM25.load(bm25_dir, mmap=False, load_corpus=False, show_progress=False)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise IndexNotFoundError(f"cannot read the bm25s index in {bm25_dir}: {e}") from e
    scores = model.scores
    return BM25Matrix(int(scores["num_docs"]), np.asarray(scores["data"], dtype=np.float32),
                      np.asarray(scores["indices"], dtype=np.int64), np.asarray(scores["indptr"], dtype=np.int64),
                      dict(model.vocab_dict))


def accumulate_scores(n: int, columns: Sequence[int], data: np.ndarray, indices: np.ndarray,
                      indptr: np.ndarray) -> np.ndarray:
    """The canonical BM25 score vector (float64, shape (n,)) of one query.

    ``columns`` are the query's in-vocabulary token columns in query order (duplicates kept);
    ``data`` / ``indices`` / ``indptr`` the token-major sparse matrix of float32 weights (column
    ``c`` holds the passages ``indices[indptr[c]:indptr[c+1]]``). Each passage's score is the
    float64 sum of its weights added in query-token order: the same additions, in the same order,
    whichever subset of passages the matrix holds (a shard's columns give its passages the very
    numbers the whole index gives them).
    """
    out = np.zeros(n, dtype=np.float64)
    for c in columns:
        s, e = indptr[c], indptr[c + 1]
        out[indices[s:e]] += data[s:e]  # doc ids within one token are unique
    return out


class QueryTokenizer:
    """The query side of BM25 tokenisation: query text -> its tokens in order (no vocabulary).

    ``tokens(q)`` are the strings whose in-vocabulary ones ``BM25Retriever.query_token_ids``
    looks up, in the same order; a sharded BM25 index sends these strings to its shards.
    """

    def __init__(self, stemmer: str | None = None):
        self.stemmer_name = stemmer
        self._stemmer = _make_stemmer(stemmer)

    def tokens(self, query: str) -> list[str]:
        if not isinstance(query, str):
            raise ConfigError(f"queries must be strings, got {type(query).__name__}")
        return [t for t in tokenize([query], self._stemmer)[0] if t != ""]


class BM25Retriever(Retriever):
    """BM25 over a saved bm25s index (see module docstring for the scoring contract)."""

    kind = "bm25"

    def __init__(self, corpus: Corpus, bm25_dir: str, stemmer: str | None = None):
        m = load_bm25_matrix(bm25_dir)
        self.corpus = corpus
        self._n = m.n
        if self._n != len(corpus):
            raise ConfigError(f"BM25 index {bm25_dir} has {self._n} passages but the corpus has {len(corpus)}")
        self._data, self._indices, self._indptr = m.data, m.indices, m.indptr
        self._vocab: dict[str, int] = m.vocab
        self._stemmer_name = stemmer
        self._stemmer = _make_stemmer(stemmer)
        self.index_dir: str | None = None  # the index directory; set by load_retriever
        self.bm25_dir = os.fspath(bm25_dir)

    def query_token_ids(self, query: str) -> list[int]:
        """In-vocabulary token ids of ``query`` in order (duplicates kept)."""
        toks = tokenize([query], self._stemmer)[0]
        return [self._vocab[t] for t in toks if t in self._vocab and t != ""]

    def score_vector(self, query: str) -> np.ndarray:
        """Canonical float64 BM25 score of every passage for ``query`` (shape (N,))."""
        if not isinstance(query, str):
            raise ConfigError(f"queries must be strings, got {type(query).__name__}")
        return accumulate_scores(self._n, self.query_token_ids(query), self._data, self._indices, self._indptr)

    @staticmethod
    def top_k(scores: np.ndarray, k: int) -> list[Hit]:
        """Top-k of a full score vector: score desc, ties -> lower doc id (exact, no partial sort ties)."""
        n = scores.shape[0]
        k = min(k, n)
        if k == n:
            cand = np.arange(n, dtype=np.int64)
        else:
            thr = np.partition(scores, n - k)[n - k]  # the k-th largest value
            above = np.flatnonzero(scores > thr)
            at = np.flatnonzero(scores == thr)[: k - above.size]  # lowest ids among the ties
            cand = np.concatenate([above, at])
        return rank_hits(cand, scores[cand], k)

    def search_sync(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        check_k(k)
        return [self.top_k(self.score_vector(q), int(k)) for q in queries]

    def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        ids = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return []
        if ids.min() < 0 or ids.max() >= self._n:
            raise ConfigError(f"doc ids must be in [0, {self._n}), got {int(ids.min())}..{int(ids.max())}")
        return self.score_vector(query)[ids].tolist()
