"""HTTP client of a retrieval service (``ralmspec serve --retrieval-only``): a ``Retriever``.

Protocol (served by ``ralmspec.serving.app``; see docs/serving.md):

- ``GET  /v1/retriever``  -> ``{"kind", "corpus_size", "limits": {"queries", "k", "texts", "ids"}}``
- ``POST /v1/retrieve``   ``{"queries": [str], "k": int, "include_text": bool}`` ->
  ``{"results": [[{"doc_id", "score", "title", "text"}]]}``
- ``POST /v1/score``      ``{"query": str, "doc_ids": [int]}`` -> ``{"scores": [float]}``
- ``POST /v1/passages``   ``{"doc_ids": [int]}`` -> ``{"passages": [{"doc_id", "title", "text"}]}``

Contract: the scores are the remote retriever's own numbers (JSON carries a float64 exactly:
Python writes the shortest repr that reads back to the same double), so ``search`` and
``score`` here equal the remote ``search`` and ``score`` bit for bit, and a speculation cache
ranking with ``score`` agrees with the remote top-1 whenever the top-1 is cached.

Design of the two call paths:
- ``search`` (the engine's verification path, on the event loop) is async, through an
  ``aiohttp`` session per event loop with keep-alive; ``await aclose()`` before that loop ends
  (the server does it on cleanup). Hits carry title and text, which fill the
  lazy corpus, so every doc id the engine ever sees is already cached when it is used.
- ``score`` is synchronous because the speculation cache calls it from worker threads
  (``threads.to_thread(cache.top1, q)``): it uses a blocking ``http.client`` connection per
  thread (keep-alive), so it never touches the event loop and cannot deadlock on it.
- ``corpus[doc_id]`` is a ``RemoteCorpus``: passages are fetched by id (sync) on a miss and
  kept in a bounded LRU.

A service answers at most ``limits.queries`` queries and ``limits.texts`` passages with text
(queries x min(k, corpus size)) per ``/v1/retrieve``, hits up to ``limits.k``, and ``limits.ids``
ids per ``/v1/score`` or ``/v1/passages`` call (400 past them). The client splits its calls to fit
(a service that does not say has the defaults of ``ServiceLimits``): one query's hits do not
depend on the others of its call (the retrievers' batch invariance), so the answer is the same.
A ``k`` above the service's ``limits.k`` is asked at that limit (a warning, once): the engine's k
is ``ralm.prefetch`` (up to 4,096), the passages put in the speculation cache besides the top-1,
so fewer of them changes speculation's hit rate, never a token.

Every connection failure, timeout, non-200 answer or malformed body raises ``RetrievalError``
(the engine retries, then turns it into a clean error; HTTP 503 in the server). Malformed is
checked strictly, since a wrong hit would be taken as verified: doc ids are integers inside the
corpus, scores finite numbers, texts strings, at most ``k`` hits per query in rank order (score
descending, then doc id ascending, no repeats), one answer per query and per scored id.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import math
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ralmspec.config import check_api_key, check_seconds, is_int
from ralmspec.data.corpus import Corpus, Passage
from ralmspec.errors import ConfigError, RetrievalError
from ralmspec.retrieval.base import Hit, Retriever

log = logging.getLogger(__name__)

RETRIEVER_API_KEY_ENV = "RALMSPEC_RETRIEVER_API_KEY"  # serve --retriever-api-key when the flag is absent


class RemoteCorpus(Corpus):
    """Lazy view of the remote corpus: ``corpus[doc_id]`` fetches by id on a miss (bounded LRU)."""

    def __init__(self, client: "RemoteRetriever", size: int, capacity: int = 200_000):
        self._client = client
        self._size = int(size)
        self.capacity = capacity
        self._cache: OrderedDict[int, Passage] = OrderedDict()
        self._lock = threading.Lock()
        self.fetched = 0  # passages fetched by id (cache misses)

    def __len__(self) -> int:
        return self._size

    def put(self, passages: Sequence[Passage]) -> None:
        with self._lock:
            for p in passages:
                self._cache[p.doc_id] = p
                self._cache.move_to_end(p.doc_id)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)

    def get_many(self, doc_ids: Sequence[int]) -> list[Passage]:
        ids = [int(i) for i in doc_ids]
        for i in ids:
            if not 0 <= i < self._size:
                raise IndexError(f"doc id {i} out of range [0, {self._size})")
        with self._lock:
            missing = sorted({i for i in ids if i not in self._cache})
        if missing:
            got = self._client.fetch_passages(missing)
            self.fetched += len(got)
            self.put(got)
        with self._lock:
            out = []
            for i in ids:
                p = self._cache.get(i)
                if p is None:  # evicted between put and read (tiny capacity): fetch alone
                    p = self._client.fetch_passages([i])[0]
                out.append(p)
            return out

    def __getitem__(self, doc_id):  # type: ignore[override]
        if isinstance(doc_id, slice):
            return self.get_many(range(*doc_id.indices(self._size)))
        i = int(doc_id)
        if i < 0:
            i += self._size
        return self.get_many([i])[0]

    def __iter__(self) -> Iterator[Passage]:
        for start in range(0, self._size, 1000):
            yield from self.get_many(range(start, min(self._size, start + 1000)))

    def contents(self) -> list[str]:
        return [p.content for p in self]


def _doc_id(v: Any, size: int) -> int:
    if not is_int(v, 0, size - 1):
        raise ValueError(f"doc_id {v!r} is not an id of the corpus of {size} passages")
    return v


def _score(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"score {v!r} is not a finite number")
    return float(v)


def _string(d: dict, key: str, default: str | None = None) -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
        raise ValueError(f"{key} {v!r} is not a string")
    return v


def _passage(d: Any, size: int) -> Passage:
    if not isinstance(d, dict):
        raise TypeError(f"a passage is an object, got {type(d).__name__}")
    return Passage(_doc_id(d.get("doc_id"), size), _string(d, "title", ""), _string(d, "text"),
                   str(d.get("source_id", "")))


def _ranked(hits: list[Hit]) -> None:
    """ValueError unless ``hits`` are in the canonical rank order (``rank_hits``): score
    descending, then doc id ascending; a repeated hit breaks it too."""
    for a, b in zip(hits, hits[1:]):
        if not (a.score > b.score or (a.score == b.score and a.doc_id < b.doc_id)):
            raise ValueError(f"hits out of rank order: {a} before {b}")


@dataclass(frozen=True)
class ServiceLimits:
    """The most a retrieval service answers per call (``GET /v1/retriever``'s ``limits``); the
    defaults are ``ServerConfig``'s (which takes them from here), for a service too old to say."""

    queries: int = 512
    k: int = 1000
    texts: int = 50_000
    ids: int = 10_000

    @classmethod
    def from_info(cls, info: dict) -> "ServiceLimits":
        limits = info.get("limits", {})
        if not isinstance(limits, dict):
            raise TypeError(f"limits {limits!r} is not an object")
        for name, v in limits.items():
            if name in cls.__dataclass_fields__ and not is_int(v, 1):
                raise ValueError(f"limits.{name} {v!r}")
        return cls(**{name: v for name, v in limits.items() if name in cls.__dataclass_fields__})

    def query_groups(self, n: int, k: int) -> list[range]:
        """The queries ``0..n-1`` split into consecutive calls of at most ``queries`` queries and
        ``texts`` passages (``k`` hits each)."""
        per = max(1, min(self.queries, self.texts // max(1, k)))
        return [range(i, min(n, i + per)) for i in range(0, n, per)]


class RemoteRetriever(Retriever):
    """A retrieval service at ``url`` as a ``Retriever`` (module doc). Raises ``RetrievalError``
    at construction when the service cannot be reached."""

    def __init__(self, url: str, timeout_s: float = 10.0, connect_timeout_s: float = 3.0,
                 passage_cache: int = 200_000, api_key: str | None = None):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"retriever URL must look like http://host:port, got {url!r}")
        check_seconds(timeout_s, "retriever timeout_s")
        check_seconds(connect_timeout_s, "retriever connect_timeout_s")
        check_api_key(api_key, "the retrieval service's API key")
        # the service's --api-key, sent with every call (``Authorization: Bearer``, as the service checks)
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._scheme, self._host = parsed.scheme, parsed.hostname
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._base = parsed.path.rstrip("/")
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self._tls = threading.local()
        self._sessions: dict[asyncio.AbstractEventLoop, Any] = {}
        self._sessions_lock = threading.Lock()
        self.requests = 0  # HTTP calls made (all paths)
        self._warned_k = False
        info = self._post_or_get("GET", "/v1/retriever", None)
        try:
            if not isinstance(info, dict):
                raise TypeError(f"{type(info).__name__}, not an object")
            self.kind = _string(info, "kind")
            size = info["corpus_size"]
            if not is_int(size, 1):
                raise ValueError(f"corpus_size {size!r}")
            self.limits = ServiceLimits.from_info(info)
        except (KeyError, TypeError, ValueError) as exc:
            raise RetrievalError(f"{self.url} is not a ralmspec retrieval service: bad /v1/retriever answer") from exc
        self.corpus = RemoteCorpus(self, size, passage_cache)

    # ------------------------------------------------------------------ sync path
    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._tls, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout_s)
            self._tls.conn = conn
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._tls, "conn", None)
        if conn is not None:
            conn.close()
            self._tls.conn = None

    def _post_or_get(self, method: str, path: str, body: Any) -> Any:
        """One blocking JSON call within ``timeout_s`` (the whole answer, not each read: a service
        sending a byte a second is timed out too); one reconnect on a stale keep-alive connection,
        none after a timeout (which would double it)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self._auth}
        last: BaseException | None = None
        for _attempt in range(2):
            conn = self._conn()
            try:
                deadline = time.monotonic() + self.timeout_s
                if conn.sock is None:
                    conn.timeout = self.connect_timeout_s
                    conn.connect()
                    conn.sock.settimeout(self.timeout_s)
                conn.request(method, self._base + path, body=data, headers=headers)
                resp = conn.getresponse()
                parts = []
                while part := resp.read1(1 << 16):  # at most one socket read each
                    parts.append(part)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the answer took longer than {self.timeout_s:g} s")
                raw = b"".join(parts)
                self.requests += 1
            except TimeoutError as exc:
                self._drop_conn()
                raise RetrievalError(f"retrieval service {self.url} timed out ({method} {path}): {exc}") from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop_conn()
                last = exc
                continue
            return self._decode(resp.status, raw, path)
        raise RetrievalError(f"retrieval service {self.url} unreachable ({method} {path}): {last!r}") from last

    def _decode(self, status: int, raw: bytes, path: str) -> Any:
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        if status != 200:
            err = doc.get("error") if isinstance(doc, dict) else None
            msg = err.get("message") if isinstance(err, dict) else raw[:200]
            raise RetrievalError(f"retrieval service {self.url}{path} answered HTTP {status}: {msg}")
        if doc is None:
            raise RetrievalError(f"retrieval service {self.url}{path} sent a malformed body")
        return doc

    def _parse_results(self, doc: Any, n: int, k: int) -> list[list[Hit]]:
        size = len(self.corpus)
        # an exact or BM25 knowledge base answers min(k, corpus size) hits to every query (the
        # approximate ones may answer fewer): a shorter list is not a top-k
        want = min(k, size) if self.kind.split("+")[0] in ("exact", "bm25") else None
        try:
            results = doc["results"]
            if not isinstance(results, list) or len(results) != n:
                raise ValueError(f"{len(results) if isinstance(results, list) else results!r} answers for {n} queries")
            out, passages = [], []
            for hits in results:
                if not isinstance(hits, list) or len(hits) > k:
                    raise ValueError(f"a query's hits must be a list of at most k={k}")
                if want is not None and len(hits) != want:
                    raise ValueError(f"{len(hits)} hits where a {self.kind} knowledge base of {size} passages "
                                     f"answers {want}")
                row = []
                for h in hits:
                    row.append(Hit(_doc_id(h["doc_id"], size), _score(h["score"])))
                    if "text" in h:
                        passages.append(_passage(h, size))
                _ranked(row)
                out.append(row)
        except (KeyError, TypeError, ValueError) as exc:
            raise RetrievalError(f"retrieval service {self.url} sent a malformed /v1/retrieve answer: {exc}") from exc
        self.corpus.put(passages)
        return out

    def _k_asked(self, k: int) -> int:
        """``k``, or the service's most (module doc: only the prefetched passages are fewer)."""
        k = int(k)
        if k > self.limits.k and not self._warned_k:
            self._warned_k = True
            log.warning("retrieval service %s answers at most k=%d hits per query: k=%d is asked as %d "
                        "(ralm.prefetch above it prefetches fewer passages; the tokens are the same)",
                        self.url, self.limits.k, k, self.limits.k)
        return min(k, self.limits.k)

    def search_sync(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        queries, k = list(queries), self._k_asked(k)
        out: list[list[Hit]] = []
        for group in self.limits.query_groups(len(queries), min(k, len(self.corpus))):
            doc = self._post_or_get("POST", "/v1/retrieve", {"queries": queries[group.start:group.stop], "k": k,
                                                             "include_text": True})
            out += self._parse_results(doc, len(group), k)
        return out

    def _id_groups(self, ids: list[int]) -> list[list[int]]:
        return [ids[i:i + self.limits.ids] for i in range(0, len(ids), self.limits.ids)]

    def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        return [s for group in self._id_groups([int(i) for i in doc_ids]) for s in self._score_call(query, group)]

    def _score_call(self, query: str, ids: list[int]) -> list[float]:
        doc = self._post_or_get("POST", "/v1/score", {"query": query, "doc_ids": ids})
        try:
            scores = [_score(s) for s in doc["scores"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise RetrievalError(f"retrieval service {self.url} sent a malformed /v1/score answer: {exc}") from exc
        if len(scores) != len(ids):
            raise RetrievalError(f"retrieval service {self.url} scored {len(scores)} of {len(ids)} docs")
        return scores

    def fetch_passages(self, doc_ids: Sequence[int]) -> list[Passage]:
        return [p for group in self._id_groups([int(i) for i in doc_ids]) for p in self._passages_call(group)]

    def _passages_call(self, ids: list[int]) -> list[Passage]:
        doc = self._post_or_get("POST", "/v1/passages", {"doc_ids": ids})
        try:
            got = [_passage(p, len(self.corpus)) for p in doc["passages"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise RetrievalError(f"retrieval service {self.url} sent a malformed /v1/passages answer: {exc}") from exc
        if [p.doc_id for p in got] != ids:
            raise RetrievalError(f"retrieval service {self.url} returned the wrong passages")
        return got

    # ------------------------------------------------------------------ async path
    def _session(self) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        with self._sessions_lock:
            s = self._sessions.get(loop)
            if s is None or s.closed:
                for old_loop in [lp for lp in self._sessions if lp.is_closed()]:
                    del self._sessions[old_loop]  # its loop is gone; the OS reclaims the sockets
                timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)
                s = aiohttp.ClientSession(timeout=timeout, raise_for_status=False, headers=self._auth)
                self._sessions[loop] = s
            return s

    async def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """``/v1/retrieve`` calls within the service's limits, made at once (their order kept)."""
        queries, k = list(queries), self._k_asked(k)
        groups = self.limits.query_groups(len(queries), min(k, len(self.corpus)))
        answers = await asyncio.gather(*(self._search_call(queries[g.start:g.stop], k) for g in groups))
        return [hits for answer in answers for hits in answer]

    async def _search_call(self, queries: list[str], k: int) -> list[list[Hit]]:
        import aiohttp

        body = {"queries": queries, "k": k, "include_text": True}
        try:
            async with self._session().post(f"{self.url}/v1/retrieve", json=body) as resp:
                raw = await resp.read()
                status = resp.status
            self.requests += 1
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise RetrievalError(f"retrieval service {self.url} unreachable (POST /v1/retrieve): {exc!r}") from exc
        return self._parse_results(self._decode(status, raw, "/v1/retrieve"), len(queries), k)

    async def aclose(self) -> None:
        """Close the aiohttp session of the running loop (call before the loop ends)."""
        loop = asyncio.get_running_loop()
        with self._sessions_lock:
            s = self._sessions.pop(loop, None)
        if s is not None:
            await s.close()

    def close(self) -> None:
        self._drop_conn()
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, {}
        for loop, s in sessions.items():
            if not s.closed and not loop.is_closed() and loop.is_running():
                asyncio.run_coroutine_threadsafe(s.close(), loop)
