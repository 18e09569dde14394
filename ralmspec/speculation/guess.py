"""How a speculative step guesses its passage: a policy, separate from verification.

Verification alone decides what is kept (one batched knowledge-base search with the exact
metric), so ANY guess keeps the output identical to the naive loop; a guesser only trades
acceptance against what it costs on the critical path (the LM's thread):

- ``exact``: rank the cached passages with the retriever's own metric (today's behaviour). The
  best guess the cache can give (right whenever the true top-1 is cached), but on a dense
  retriever it encodes the query first (MiniLM: ~25-40 ms per query on one core).
- ``last``: the passage the previous chunk used. Free; right as long as the text stays on the
  same passage (a grounded LM answering one question mostly does). The step's query is encoded
  at once on the verification worker, so the batched verification finds it encoded.
- ``refine``: start the chunk at once with ``last``'s guess while the worker encodes the query and
  ranks the cache exactly; when the chunk is done, keep it if the exact cache guess agrees,
  otherwise generate it again with that guess. Acceptance of ``exact`` with (mostly) the cost of
  ``last`` when an LM chunk takes longer than an encoding.
- ``static``: rank the cache by cosine between mean-pooled *input* token embeddings of the dense
  encoder (its static vocabulary table: no transformer layers run), for the query and for each
  cached passage. Microseconds; the query's exact encoding runs on the worker for verification.
- ``bm25``: rank the cache by BM25 of the query's words over the cached passages' words (idf and
  average length from the cached set). Microseconds, no model at all.
- ``oracle`` (a measurement bound, ``ralmspec bench`` only): the passage the naive run of the same
  question retrieved for this very query, taught by the bench before the speculative run
  (``OracleRanker.learn``). Always right, free: what no real guesser can beat on a machine, so a
  speed-up target above the oracle's is out of reach of guessing there.

Rankers ``StaticEmbeddingRanker`` / ``CacheBM25Ranker`` are shared by every request of an engine
(passage representations are cached by doc id); ties break by the lower doc id, as everywhere.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ralmspec.config import BOUND_GUESSERS, GUESSERS
from ralmspec.errors import ConfigError
from ralmspec.retrieval.base import rank_hits
from ralmspec.threads import to_thread


@dataclass(frozen=True)
class GuessPlan:
    """What the speculative step does for its guess (pure decision, no I/O)."""

    rank_now: bool  # rank the cache with the exact metric before the next chunk (critical path)
    rank_beside: bool  # rank the cache on the verification worker while the next chunk runs
    encode_beside: bool  # only encode the query on the worker (verification will need it)
    cheap: str | None = None  # rank the cache now with this cheap ranker ("static" / "bm25")


def plan_guess(guesser: str, dense: bool) -> GuessPlan:
    """The work of one guess for ``guesser`` on a dense (query-encoding) or sparse retriever."""
    if guesser not in GUESSERS + BOUND_GUESSERS:
        raise ConfigError(f"unknown guesser {guesser!r}; choose one of {', '.join(GUESSERS)}")
    if guesser == "exact":
        return GuessPlan(rank_now=True, rank_beside=False, encode_beside=False)
    if guesser == "last":
        return GuessPlan(rank_now=False, rank_beside=False, encode_beside=dense)
    if guesser in ("static", "bm25", "oracle"):
        if guesser == "static" and not dense:
            raise ConfigError("the static guesser needs a dense retriever (it uses the query encoder's "
                             "token embeddings); use bm25, last or exact")
        return GuessPlan(rank_now=False, rank_beside=False, encode_beside=dense, cheap=guesser)
    return GuessPlan(rank_now=False, rank_beside=True, encode_beside=False)


def refined_doc(cheap: int, exact: int | None, verified: bool) -> int | None:
    """The passage a refined step must be regenerated with, or ``None`` to keep its chunk.

    A step already verified keeps its (true) passage; an empty cache (``exact`` None) gives no
    better guess; otherwise the exact cache guess wins when it differs from the cheap one.
    """
    if verified or exact is None or exact == cheap:
        return None
    return exact


@dataclass(frozen=True)
class Guess:
    """A guesser's answer: the passage to produce the step with, and (``refine``) a future of the
    exact cache guess the step's chunk is checked against once produced (``refined_doc``)."""

    doc: int | None
    refine: Any = None


class GuessKit(Protocol):
    """What a guesser may use; the RaLM mode supplies it (``engine/speculative.py``)."""

    cache: Any  # the request's SpeculationCache

    def exact_guess(self, query: str) -> int | None:
        """The cache's top-1 with the retriever's own metric (encodes ``query`` first)."""

    def encode_beside(self, query: str) -> None:
        """Encode ``query`` on the verification worker beside the LM (cached for verification),
        telling OS^3 what it cost."""

    def rank_top1(self, query: str, doc_ids: list[int]) -> int | None:
        """The top-1 of ``doc_ids`` with the retriever's own metric."""

    def beside(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run ``fn(*args)`` on the verification worker, beside the LM."""


class Guesser(Protocol):
    """A guess policy (module doc). ``encodes_query``: the guess encodes the query on the critical
    path, so verification finds it encoded (OS^3's ``encodes_beside`` is off)."""

    encodes_query: bool

    async def guess(self, query: str, last: int, kit: GuessKit) -> Guess:
        """The next step's passage for ``query``; ``last`` is the current step's passage."""

    def would_guess(self, query: str, last: int, exact: int | None, kit: GuessKit) -> int | None:
        """The passage this guesser would have guessed for ``query`` at a verified (fallback)
        step, given ``exact``, the cache's exact top-1 the step's probe already computed. Cheap
        and without side effects: it is how OS^3 measures THIS guesser's acceptance while it
        takes verified steps (a probe that scored the exact lookup measured another guesser)."""


class ExactGuesser:
    """``exact``: rank the cache with the retriever's metric now (a worker thread, awaited)."""

    encodes_query = True

    async def guess(self, query: str, last: int, kit: GuessKit) -> Guess:
        return Guess(await to_thread(kit.exact_guess, query))

    def would_guess(self, query: str, last: int, exact: int | None, kit: GuessKit) -> int | None:
        return exact


class LastGuesser:
    """``last``: the current step's passage; the query is encoded beside (dense retrievers)."""

    encodes_query = False

    def __init__(self, encode_beside: bool):
        self.encode_beside = encode_beside

    async def guess(self, query: str, last: int, kit: GuessKit) -> Guess:
        if self.encode_beside:
            kit.encode_beside(query)
        return Guess(last)

    def would_guess(self, query: str, last: int, exact: int | None, kit: GuessKit) -> int | None:
        return last


class RefineGuesser:
    """``refine``: the current step's passage now, the exact cache ranking beside, to be checked
    against once the chunk is produced."""

    encodes_query = False

    async def guess(self, query: str, last: int, kit: GuessKit) -> Guess:
        return Guess(last, refine=kit.beside(kit.rank_top1, query, kit.cache.doc_ids()))

    def would_guess(self, query: str, last: int, exact: int | None, kit: GuessKit) -> int | None:
        return exact if exact is not None else last  # its chunk is redone with the exact guess (refined_doc)


class CheapGuesser:
    """``static`` / ``bm25`` / ``oracle``: a cheap ranker over the cached passages, on the critical
    path (microseconds); no answer keeps the current passage. Dense: encode beside."""

    encodes_query = False

    def __init__(self, ranker: Any, encode_beside: bool):
        self.ranker, self.encode_beside = ranker, encode_beside

    async def guess(self, query: str, last: int, kit: GuessKit) -> Guess:
        doc = self.ranker.top1(query, kit.cache.doc_ids())
        if doc is None:
            doc = last
        kit.cache.use(doc)
        if self.encode_beside:
            kit.encode_beside(query)
        return Guess(doc)

    def would_guess(self, query: str, last: int, exact: int | None, kit: GuessKit) -> int | None:
        doc = self.ranker.top1(query, kit.cache.doc_ids())
        return last if doc is None else doc


def make_guesser(guesser: str, dense: bool, rankers: CheapRankers) -> Guesser:
    """The strategy object for ``guesser`` (``plan_guess``'s plan) on a dense or sparse retriever;
    a cheap ranker comes from the engine's shared ``rankers``."""
    plan = plan_guess(guesser, dense)
    if plan.rank_now:
        return ExactGuesser()
    if plan.cheap is not None:
        return CheapGuesser(rankers.get(plan.cheap), plan.encode_beside)
    if plan.rank_beside:
        return RefineGuesser()
    return LastGuesser(plan.encode_beside)


class _PassageMemo:
    """Thread-safe bounded memo doc id -> a passage representation (LRU)."""

    def __init__(self, make: Callable[[int], object], capacity: int = 65536):
        self.make, self.capacity = make, capacity
        self._memo: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, doc_id: int):
        with self._lock:
            v = self._memo.get(doc_id)
            if v is not None:
                self._memo.move_to_end(doc_id)
                return v
        v = self.make(doc_id)
        with self._lock:
            self._memo[doc_id] = v
            if len(self._memo) > self.capacity:
                self._memo.popitem(last=False)
        return v

    def clear(self) -> None:
        """Forget every memoised representation."""
        with self._lock:
            self._memo.clear()


class StaticEmbeddingRanker:
    """Cosine of mean-pooled static token embeddings (guesser ``static``).

    ``tokenize(text) -> token ids`` and ``table`` ((vocab, dim) float32) are the dense encoder's
    own (``QueryEncoder.token_embeddings``); ``text_of(doc_id)`` is the indexed passage text.
    """

    def __init__(self, tokenize: Callable[[str], list[int]], table: np.ndarray, text_of: Callable[[int], str]):
        self.tokenize, self.table = tokenize, table
        self._passages = _PassageMemo(lambda d: self.vector(text_of(d)))

    def clear_memo(self) -> None:
        """Forget the memoised passage vectors (a benchmark's cold start)."""
        self._passages.clear()

    def vector(self, text: str) -> np.ndarray:
        ids = self.tokenize(text)
        if not ids:
            return np.zeros(self.table.shape[1], dtype=np.float64)
        v = self.table[np.asarray(ids, dtype=np.int64)].astype(np.float64).mean(axis=0)
        n = float(np.linalg.norm(v))
        return v / n if n > 0 else v

    def top1(self, query: str, doc_ids: Sequence[int]) -> int | None:
        if not doc_ids:
            return None
        q = self.vector(query)
        scores = np.array([float(self._passages.get(d) @ q) for d in doc_ids])
        return rank_hits(doc_ids, scores, 1)[0].doc_id


_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (BM25 guess)."""
    return _WORD.findall(text.lower())


class CacheBM25Ranker:
    """BM25 of the query over the cached passages alone (guesser ``bm25``): k1 = 1.5, b = 0.75,
    idf = ln(1 + (n - df + 0.5) / (df + 0.5)) and the average length over those ``n`` passages."""

    K1, B = 1.5, 0.75

    def __init__(self, text_of: Callable[[int], str]):
        self._passages = _PassageMemo(lambda d: Counter(words(text_of(d))))

    def clear_memo(self) -> None:
        """Forget the memoised passage term counts (a benchmark's cold start)."""
        self._passages.clear()

    def top1(self, query: str, doc_ids: Sequence[int]) -> int | None:
        if not doc_ids:
            return None
        tfs = [self._passages.get(d) for d in doc_ids]
        lengths = np.array([sum(tf.values()) for tf in tfs], dtype=np.float64)
        avg = float(lengths.mean()) or 1.0
        n = len(doc_ids)
        scores = np.zeros(n, dtype=np.float64)
        for term in set(words(query)):
            f = np.array([tf.get(term, 0) for tf in tfs], dtype=np.float64)
            df = int((f > 0).sum())
            if df == 0:
                continue
            idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
            scores += idf * f * (self.K1 + 1) / (f + self.K1 * (1 - self.B + self.B * lengths / avg))
        return rank_hits(doc_ids, scores, 1)[0].doc_id


class OracleRanker:
    """Guesser ``oracle``: query text -> the passage the naive loop retrieved for it (``learn``),
    whatever the cache holds; an unknown query gets no guess (the step keeps the last passage).
    A bound for measurements: it needs the naive run's answer before the speculative one."""

    def __init__(self):
        self._truth: dict[str, int] = {}
        self._lock = threading.Lock()

    def learn(self, query: str, doc_id: int) -> None:
        with self._lock:
            self._truth[query] = doc_id

    def top1(self, query: str, doc_ids: Sequence[int]) -> int | None:
        with self._lock:
            return self._truth.get(query)


class CheapRankers:
    """An engine's cheap rankers (``static``, ``bm25``, and the bench's ``oracle`` bound), built
    on first use and shared by its requests (passage representations are memoised by doc id)."""

    def __init__(self, retriever):
        self.retriever = retriever
        self._built: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, name: str):
        with self._lock:
            if name not in self._built:
                corpus = self.retriever.corpus

                def text_of(d: int) -> str:
                    return corpus[d].content

                if name == "bm25":
                    self._built[name] = CacheBM25Ranker(text_of)
                elif name == "oracle":
                    self._built[name] = OracleRanker()
                elif name == "static":
                    tokenize, table = self.retriever.encoder.token_embeddings()
                    self._built[name] = StaticEmbeddingRanker(tokenize, table, text_of)
                else:
                    raise ValueError(f"no cheap ranker {name!r}")
            return self._built[name]

    def clear_memos(self) -> None:
        """Forget every memoised passage representation of the built rankers (a benchmark's cold
        start: ``RalmEngine.reset_caches``), so a request does not find the words or static
        vectors of the passages an earlier request ranked already computed. What the ``oracle``
        learned is kept: it is the bound's input (taught before each request), not a cache."""
        with self._lock:
            built = list(self._built.values())
        for ranker in built:
            if not isinstance(ranker, OracleRanker):
                ranker.clear_memo()
