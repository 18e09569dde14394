"""Speculative kNN-LM (RaLMSpec §kNN-LM): a locality cache answers the per-token k-NN searches,
one batched real search verifies ``s`` speculated tokens. Output == naive kNN-LM, token for token.

Cache (:class:`NeighbourCache`)
-------------------------------
A per-request set of datastore entry ids with their keys. Every real search result (the first
search for the prompt, and each verified query of a verification batch) inserts its top-k
entries and their corpus successors ``i+1 .. i+m`` (same document, ``m`` = ``successors``,
default 10): when the text being generated follows a corpus passage, the next query's nearest
keys are the successors of the current ones (spatial locality). A speculative search ranks the
cached entries with the datastore's canonical metric and tie-break (float64 squared L2 from the
stored keys, then entry id; a float32 prefilter is used only when a rigorous error bound
certifies that it cannot change the top-k). So whenever the true top-k is cached, the
speculated neighbours equal the real ones. Capacity is bounded (LRU; an insert or a top-k hit
is a use). With ``self_feed`` (default) a speculative step also inserts the successors of the
neighbours it speculated: within a round (and, with asynchronous verification, while the
previous round's true neighbours are not known yet) the cache keeps walking along the corpus
instead of running out after ``m`` tokens. Cache contents never affect the output, only the
acceptance rate.

Round (synchronous)
-------------------
From a verified state, for i = 1..s (``s`` from OS^3, :class:`StrideScheduler`, one token per
step): query = LM hidden state, neighbours = cache top-k, token t_i = :func:`next_token`; feed
t_i to the LM (the last feed is deferred until verification). Then ONE batched real search for
the s queries. Walk i = 1..s: the *true* token t*_i is :func:`next_token` with the true
neighbours and the LM logits already computed for step i; t_i is kept when t*_i == t_i (default
acceptance, the paper's: neighbour sets may differ) or, in ``strict`` mode, when the speculated
top-k ids equal the true ones. At the first rejected i: t_i is replaced by t*_i, every later
token is discarded and the LM's KV cache is cropped back (no re-prefill).

Why output is identical to :meth:`KNNLM.generate`: step i's query and logits are produced by
the same 1-row forwards over the same verified tokens as in the naive decoder (see
:mod:`ralmspec.knnlm.model`), the real search is batch-invariant (see
:mod:`ralmspec.knnlm.datastore`), so t*_i is exactly the naive decoder's token at that
position; a kept t_i equals t*_i; the first differing token is replaced by t*_i and nothing
after it survives.

Asynchronous verification (``async_verify=True``)
-------------------------------------------------
The batched search of round r runs in a worker thread (FAISS and numpy release the GIL) while
the main thread already speculates round r+1 on top of round r's unverified tokens. Before
round r+1 is submitted, round r's result is applied: on a rejection, round r+1's work is thrown
away with the rollback. At most one verification is in flight. Only verified tokens are ever
returned.

OS^3 and the naive fallback
---------------------------
The stride comes from the shared :class:`StrideScheduler` (``a`` = one speculative step: cache
top-k + decision + 1-row LM forward; ``b(s)`` = one batched verification; ``γ`` from the last
rounds, capped at ``gamma_max``). A stride-1 synchronous round costs a naive step *plus* a cache
lookup, so speculation can only lose when retrieval is cheap. With ``naive_fallback`` (and OS^3
on), before each round the predicted verified-tokens-per-second at the chosen stride,
``E[kept](γ, s) / round_time(a, b(s), γ, s)``, is compared with the naive rate
``1 / (LM step + b(1))``; when it does not beat it, the decoder takes a plain verified step (a
real search, the cache is still fed) instead, probing the cache every ``probe_every``-th such
step so that ``γ`` keeps being estimated and speculation resumes when it pays again.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ralmspec.errors import ConfigError
from ralmspec.knnlm.datastore import Datastore, rank_entries, squared_l2
from ralmspec.knnlm.model import KNNLM, IncrementalDecoder, KNNLMResult, LMState
from ralmspec.speculation.stride import StrideScheduler, expected_verified_chunks, round_time

_U32 = 2.0 ** -24  # float32 unit roundoff


@dataclass(frozen=True)
class SpeculativeKNNConfig:
    """Speculation knobs; none of them can change the output tokens."""

    successors: int = 10  # m: successors i+1..i+m of every retrieved entry go into the cache
    cache_capacity: int = 2048  # entries per request (LRU)
    os3: bool = True  # OS^3 stride scheduler; off: fixed_stride
    fixed_stride: int = 3
    s_max: int = 16
    window: int = 5  # OS^3 acceptance window (rounds)
    # OS^3 cap on γ (DESIGN/paper: 0.6). kNN-LM acceptance is ~0.9-1.0 and a verification of s
    # queries costs far less than s single searches only for large s: a 0.9 cap held the stride
    # near 3-4 and made the naive fallback fire at acceptance 1.0.
    gamma_max: float = 0.98
    strict: bool = False  # accept only when the speculated top-k ids equal the true ones
    async_verify: bool = False
    prefilter: bool = True  # certified float32 prefilter in the cache (exact result either way)
    self_feed: bool = True  # speculated neighbours' successors also enter the cache (module doc)
    naive_fallback: bool = True  # with OS^3: plain verified steps while it predicts no gain (module doc)
    probe_every: int = 4  # during the fallback, every n-th step also probes the cache (0: never)

    def __post_init__(self) -> None:
        if not 0 <= self.successors <= 1024:
            raise ConfigError(f"successors must be in [0, 1024], got {self.successors!r}")
        if self.cache_capacity < 1:
            raise ConfigError(f"cache_capacity must be >= 1, got {self.cache_capacity!r}")
        if not 1 <= self.fixed_stride <= 64 or not 1 <= self.s_max <= 64:
            raise ConfigError("fixed_stride and s_max must be in [1, 64]")
        if self.window < 1 or not 0.0 < self.gamma_max < 1.0:
            raise ConfigError("window must be >= 1 and 0 < gamma_max < 1")
        if self.probe_every < 0:
            raise ConfigError(f"probe_every must be >= 0, got {self.probe_every!r}")


# ---------------------------------------------------------------------- cache


class NeighbourCache:
    """Bounded per-request cache of datastore entries, ranked with the canonical k-NN metric.

    ``topk(q, k)`` == the canonical top-k of ``q`` among the cached entries: squared L2 from
    :func:`squared_l2` (bit-identical to what the datastore's search reports for the same entry)
    ranked by (distance asc, entry id asc).
    """

    def __init__(self, datastore: Datastore, capacity: int, prefilter: bool = True, prefilter_margin: int = 32):
        if capacity < 1:
            raise ConfigError("cache capacity must be >= 1")
        self.ds = datastore
        self.capacity = int(capacity)
        self.prefilter = prefilter
        self.margin = prefilter_margin
        d = datastore.dim
        self._ids = np.full(self.capacity, -1, dtype=np.int64)
        self._keys64 = np.zeros((self.capacity, d), dtype=np.float64)
        self._keys32 = np.zeros((self.capacity, d), dtype=np.float32)
        self._norm2 = np.zeros(self.capacity, dtype=np.float64)
        self._stamp = np.zeros(self.capacity, dtype=np.int64)
        self._slot_of = np.full(datastore.n, -1, dtype=np.int32)  # entry id -> slot (-1: absent)
        self._size = 0
        self._clock = 0
        self.evictions = 0
        self.prefilter_fallbacks = 0
        # |error of a float32 dot product of length d| <= gamma * ||k|| * ||q||
        self._gamma = (d + 2) * _U32 / (1.0 - (d + 2) * _U32) * 1.01

    def __len__(self) -> int:
        return self._size

    def __contains__(self, entry: int) -> bool:
        return 0 <= int(entry) < self._slot_of.size and self._slot_of[int(entry)] >= 0

    def entry_ids(self) -> np.ndarray:
        return self._ids[:self._size].copy()

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        """Insert ``ids`` ordered from least to most important (the last ones are most recent)."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            return
        # unique, keeping each id's LAST position (its highest priority)
        _, last = np.unique(arr[::-1], return_index=True)
        arr = arr[::-1][np.sort(last)][::-1]
        if arr.size > self.capacity:
            arr = arr[-self.capacity:]
        slot_of = self._slot_of
        present = slot_of[arr] >= 0
        new = arr[~present]
        free = self.capacity - self._size
        n_free = min(free, new.size)
        slots = np.arange(self._size, self._size + n_free, dtype=np.int64)
        need = new.size - n_free
        if need > 0:
            stamps = self._stamp[:self._size].copy()
            stamps[slot_of[arr[present]]] = np.iinfo(np.int64).max  # protect this batch
            victims = np.argpartition(stamps, need - 1)[:need] if need < self._size else np.arange(self._size)
            victims = np.sort(victims)
            slot_of[self._ids[victims]] = -1
            self.evictions += need
            slots = np.concatenate([slots, victims])
        self._size += n_free
        if new.size:
            k64 = self.ds.key_vectors(new)
            self._ids[slots] = new
            self._keys64[slots] = k64
            self._keys32[slots] = k64.astype(np.float32)
            self._norm2[slots] = np.einsum("ij,ij->i", k64, k64)
            slot_of[new] = slots
        self._stamp[slot_of[arr]] = self._clock + np.arange(arr.size)
        self._clock += arr.size

    def add_search_result(self, neighbour_ids: np.ndarray, successors: int) -> None:
        """Insert a ranked top-k list (best first) and the successors of each entry.

        Priority (least -> most recent): the neighbours themselves (worst rank first), then
        successors at offset m, m-1, ..., 1 (each worst rank first): the likeliest next
        neighbours (offset 1 of the best entries) are the most recently used.
        """
        nb = np.asarray(neighbour_ids, dtype=np.int64)[::-1]
        if successors <= 0 or nb.size == 0:
            self.add(nb)
            return
        succ = nb[None, :] + np.arange(successors, 0, -1, dtype=np.int64)[:, None]  # row o: offset m-o
        self.add(np.concatenate([nb, succ[succ < self.ds.doc_end(nb)[None, :]]]))  # row-major: offset m first

    def topk(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Canonical top-``k`` among the cached entries (fewer if the cache holds fewer)."""
        n = self._size
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        c = k + self.margin
        found = self._prefiltered_topk(query, k, c) if self.prefilter and n > c else None
        if found is None:
            if self.prefilter and n > c:  # not certified: rank everything exactly
                self.prefilter_fallbacks += 1
            found = self._rank(query, np.arange(n), k)
        ids, d = found
        slots = self._slot_of[ids]
        self._stamp[slots] = self._clock + np.arange(ids.size)[::-1]
        self._clock += ids.size
        return ids, d

    def _rank(self, query: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Canonical top-``k`` of the entries in ``slots`` (float64 distances, then entry id)."""
        return rank_entries(self._ids[slots], squared_l2(query, self._keys64[slots]), k)

    def _prefiltered_topk(self, query: np.ndarray, k: int, c: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The exact top-``k`` ranked among the ``c`` (< size) float32-nearest cached entries, or
        None when the float32 error bound cannot certify that no other cached entry ranks in.

        ``approx_i = ||k_i||^2 + ||q||^2 - 2 fl32(k_i . q)`` is within ``2 γ_d ||k_i|| ||q||``
        (+ float64 slack) of the exact distance; that bound grows with ``||k_i||``, so the largest
        cached norm gives one bound for every entry, and the smallest ``approx`` outside the
        candidates (the ``c``-th order statistic) minus it is a lower bound on their distances.
        """
        n = self._size
        q32 = np.asarray(query, dtype=np.float32).reshape(-1)
        q64 = q32.astype(np.float64)
        qn = float(q64 @ q64)
        norm2 = self._norm2[:n]
        approx = norm2 + qn - 2.0 * np.einsum("ij,j->i", self._keys32[:n], q32).astype(np.float64)
        part = np.argpartition(approx, c)
        ids, d = self._rank(query, part[:c], k)
        m = float(norm2.max())
        lower = float(approx[part[c]]) - (2.0 * self._gamma * np.sqrt(m * qn) + 1e-9 * (m + qn + 1.0))
        return (ids, d) if d.size == k and d[-1] < lower else None


# ---------------------------------------------------------------------- stats


@dataclass
class SpeculativeStats:
    rounds: int = 0  # verification rounds
    speculated: int = 0  # tokens decided from the cache
    accepted: int = 0  # speculated tokens kept by verification
    rollbacks: int = 0  # rounds with a rejected token
    real_searches: int = 0  # calls of the datastore search (initial + verifications)
    verified_queries: int = 0  # query vectors sent to real searches
    lm_s: float = 0.0  # LM forwards (incl. wasted ones)
    cache_s: float = 0.0  # cache top-k + decision
    verify_s: float = 0.0  # real-search time (in the worker thread when async)
    verify_wait_s: float = 0.0  # main thread blocked on verification
    cache_add_s: float = 0.0
    wall_s: float = 0.0
    wasted_tokens: int = 0  # speculated tokens discarded by rollbacks (after the rejected one)
    strides: list[int] = field(default_factory=list)
    cache_size: int = 0
    cache_evictions: int = 0
    prefilter_fallbacks: int = 0
    naive_steps: int = 0  # verified steps without speculation (first token, OS^3 fallback)
    probes: int = 0  # fallback steps that also asked the cache
    probe_hits: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.speculated if self.speculated else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["acceptance_rate"] = self.acceptance_rate
        return d


@dataclass
class _Pending:
    """One speculated step awaiting verification."""

    state: LMState  # the LM state the token was decided at (query, logits and their scores)
    token: int
    spec_ids: np.ndarray  # neighbours from the cache
    spec_d: np.ndarray

    def same_neighbours(self, ids: np.ndarray, d: np.ndarray) -> bool:
        """The true neighbours (ids and distances) are the speculated ones: then the true token
        is the speculated one (:func:`next_token` is a function of these and the state)."""
        return np.array_equal(self.spec_ids, ids) and np.array_equal(self.spec_d, d)


# ---------------------------------------------------------------------- decoder


class SpeculativeKNNLM:
    """Speculative kNN-LM over a :class:`KNNLM` (same LM, datastore and KNNLMConfig)."""

    def __init__(self, knnlm: KNNLM, config: SpeculativeKNNConfig | None = None):
        self.base = knnlm
        self.config = config or SpeculativeKNNConfig()

    def _scheduler(self) -> StrideScheduler:
        c = self.config
        return StrideScheduler(os3=c.os3, fixed_stride=c.fixed_stride, async_verify=c.async_verify,
                               s_max=c.s_max, window=c.window, gamma_max=c.gamma_max)

    def generate(self, prompt: str | Sequence[int]) -> KNNLMResult:
        if self.config.async_verify:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="knnlm-verify") as pool:
                return self._generate(prompt, pool)
        return self._generate(prompt, None)

    # -------------------------------------------------------------- internals

    def _verify(self, hidden: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
        t0 = time.perf_counter()
        ids, d = self.base.datastore.search(np.stack(hidden), self.base.config.k)
        return ids, d, time.perf_counter() - t0

    def _generate(self, prompt: str | Sequence[int], pool: ThreadPoolExecutor | None) -> KNNLMResult:
        base, cfg, scfg = self.base, self.base.config, self.config
        ds, k = base.datastore, cfg.k
        prompt_ids = base.check_prompt(prompt, cfg.max_new_tokens)
        st = SpeculativeStats()
        t_start = time.perf_counter()
        sched = self._scheduler()
        cache = NeighbourCache(ds, scfg.cache_capacity, prefilter=scfg.prefilter)
        dec = IncrementalDecoder(base.lm.model)
        n_prompt = len(prompt_ids)
        out: list[int] = []  # verified tokens, then (transiently) speculated ones
        state = dec.start(prompt_ids)
        st.lm_s += state.seconds

        def finished(tokens: list[int]) -> bool:
            return len(tokens) >= cfg.max_new_tokens or (bool(tokens) and base.is_stop(tokens[-1]))

        # In-flight verification (async only): (future, pending steps, index in `out` of step 0)
        inflight: tuple[Future, list[_Pending], int] | None = None
        timing = {"lm_step": None, "spec_step": None}  # latest 1-row LM forward / speculative step

        def feed(tok: int) -> None:
            """Feed the last verified token to the LM unless the request is finished."""
            nonlocal state
            if not finished(out):
                dec.truncate(n_prompt + len(out) - 1)  # no-op unless rolled back
                state = dec.step(tok)
                st.lm_s += state.seconds
                timing["lm_step"] = state.seconds

        def naive_step() -> None:
            """One verified token from a real search (the first token, and the OS^3 fallback).
            Every ``probe_every``-th fallback step also asks the cache first (fed by the step
            before), so the acceptance estimate keeps tracking the cache and speculation can
            resume."""
            probe = st.naive_steps > 0 and scfg.probe_every > 0 and st.naive_steps % scfg.probe_every == 0
            if probe:
                t0 = time.perf_counter()
                sid, sd = cache.topk(state.hidden, k)
                spec_tok = base.decide(state, sid, sd)
                st.cache_s += time.perf_counter() - t0
            ids, d, tv = self._verify([state.hidden])
            st.verify_s += tv
            st.real_searches += 1
            st.verified_queries += 1
            sched.observe_verification(1, tv)
            # Feed the cache on the first step and right before a probe (the probe needs this
            # step's successors); skipping the other feeds keeps the fallback close to naive cost.
            if st.naive_steps == 0 or (scfg.probe_every > 0 and (st.naive_steps + 1) % scfg.probe_every == 0):
                t0 = time.perf_counter()
                cache.add_search_result(ids[0], scfg.successors)
                st.cache_add_s += time.perf_counter() - t0
            tok = base.decide(state, ids[0], d[0])
            if probe:
                ok = spec_tok == tok and (not scfg.strict or np.array_equal(sid, ids[0]))
                sched.observe_round(1, int(ok))
                st.probes += 1
                st.probe_hits += int(ok)
            st.naive_steps += 1
            out.append(tok)
            feed(tok)

        def speculation_pays(s: int) -> bool:
            """OS^3's predicted verified tokens/s at stride ``s`` beat the naive decoder's rate."""
            g, b_s, b_1 = sched.gamma(), sched.verification_cost(s), sched.verification_cost(1)
            a_spec, a_lm = timing["spec_step"], timing["lm_step"]
            if not (scfg.naive_fallback and scfg.os3) or None in (g, b_s, b_1, a_spec, a_lm):
                return True
            rate = expected_verified_chunks(g, s) / round_time(a_spec, b_s, g, s, scfg.async_verify)
            return rate > 1.0 / (a_lm + b_1)

        def verdict(p: _Pending, ids: np.ndarray, d: np.ndarray) -> tuple[bool, int]:
            """(keep the speculated token?, the true token) for one verified step. When the true
            neighbours are the speculated ones the token is the same, and with ``self_feed`` the
            cache already holds them and their successors: no decision, no insert."""
            if p.same_neighbours(ids, d):
                if not scfg.self_feed:
                    cache.add_search_result(ids, scfg.successors)
                return True, p.token
            cache.add_search_result(ids, scfg.successors)
            true_tok = base.decide(p.state, ids, d)
            return true_tok == p.token and not scfg.strict, true_tok

        def apply(pend: list[_Pending], first: int, ids: np.ndarray, d: np.ndarray) -> int | None:
            """Walk a verified round; feed the cache; return the index of the first rejection."""
            t0 = time.perf_counter()
            try:
                for i, p in enumerate(pend):
                    ok, true_tok = verdict(p, ids[i], d[i])
                    if not ok:
                        st.wasted_tokens += len(out) - (first + i) - 1
                        del out[first + i:]
                        out.append(true_tok)
                        return i
                    st.accepted += 1
                return None
            finally:
                st.cache_add_s += time.perf_counter() - t0

        def settle(fut: Future, pend: list[_Pending], first: int) -> int | None:
            """Apply a verification result; on a rejection roll the LM back and feed the true token."""
            t0 = time.perf_counter()
            ids, d, tv = fut.result()
            st.verify_wait_s += time.perf_counter() - t0
            st.verify_s += tv
            sched.observe_verification(len(pend), tv)
            j = apply(pend, first, ids, d)
            sched.observe_round(len(pend), len(pend) if j is None else j)
            st.rounds += 1
            if j is not None:
                st.rollbacks += 1
                feed(out[-1])
            return j

        # First token: a real search (the cache starts from the prompt's neighbours).
        naive_step()

        while not finished(out):
            s = max(1, min(sched.next_stride(), cfg.max_new_tokens - len(out)))
            if not speculation_pays(s):
                if inflight is not None:  # settle what is in flight before a verified step
                    f_prev, p_prev, first_prev = inflight
                    inflight = None
                    settle(f_prev, p_prev, first_prev)
                    continue
                naive_step()
                continue
            first = len(out)
            pend: list[_Pending] = []
            for i in range(s):
                t0 = time.perf_counter()
                sid, sd = cache.topk(state.hidden, k)
                tok = base.decide(state, sid, sd)
                if scfg.self_feed:  # walk on: the successors of the speculated neighbours
                    cache.add_search_result(sid, scfg.successors)
                t_cache = time.perf_counter() - t0
                st.cache_s += t_cache
                st.speculated += 1
                pend.append(_Pending(state, tok, sid, sd))
                out.append(tok)
                if finished(out) or (i == s - 1 and pool is None):
                    # sync: the LM feed of the round's last token waits for its verification
                    step_s = timing["lm_step"] or state.seconds
                    timing["spec_step"] = t_cache + step_s
                    sched.observe_step(t_cache + step_s)
                    break
                state = dec.step(tok)
                st.lm_s += state.seconds
                timing["lm_step"] = state.seconds
                timing["spec_step"] = t_cache + state.seconds
                sched.observe_step(t_cache + state.seconds)
            st.strides.append(len(pend))

            if pool is None:  # ---------------------------------------- synchronous
                ids, d, tv = self._verify([p.state.hidden for p in pend])
                st.real_searches += 1
                st.verified_queries += len(pend)
                fut: Future = Future()
                fut.set_result((ids, d, tv))
                if settle(fut, pend, first) is None:
                    feed(out[-1])  # all kept: now feed the round's last token
                continue

            # ------------------------------------------------------------- asynchronous
            if inflight is not None:
                f_prev, p_prev, first_prev = inflight
                inflight = None
                if settle(f_prev, p_prev, first_prev) is not None:
                    continue  # this round was built on a rejected token: discarded with the rollback
            st.real_searches += 1
            st.verified_queries += len(pend)
            inflight = (pool.submit(self._verify, [p.state.hidden for p in pend]), pend, first)
            if finished(out):  # speculated up to the end: settle now
                f_cur, p_cur, first_cur = inflight
                inflight = None
                settle(f_cur, p_cur, first_cur)

        if inflight is not None:  # cannot happen: every exit path settles; keep the invariant loud
            raise AssertionError("a verification round was left unsettled")
        st.wall_s = time.perf_counter() - t_start
        st.cache_size = len(cache)
        st.cache_evictions = cache.evictions
        st.prefilter_fallbacks = cache.prefilter_fallbacks
        del out[cfg.max_new_tokens:]
        return KNNLMResult(prompt_ids=prompt_ids, tokens=out, text=base.decode_text(out), wall_s=st.wall_s,
                           lm_s=st.lm_s, search_s=st.verify_s, stats=st, mode="speculative")


__all__ = ["SpeculativeKNNConfig", "SpeculativeKNNLM", "SpeculativeStats", "NeighbourCache"]
