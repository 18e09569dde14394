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

Round (the speculation driver, :mod:`ralmspec.speculation.driver`)
------------------------------------------------------------------
A *step* is one token: its ``query`` is the :class:`LMState` the token is decided at (hidden
state = the k-NN query, and the logits), its ``guess`` the token decided from the cache's top-k
(the speculated neighbours ride along in ``Step.extra``). The loop, the token list, the steps
and rounds in flight, their in-order application, rollback and what may leave the decoder
belong to the driver (the same one as RaLM's); :class:`KNNMode` supplies only the kNN-LM parts:

- ``advance``: from the current LM state, one token from the cache (a round holds ``s`` of
  them, ``s`` from OS^3, decided once per round): query = LM hidden state, neighbours = cache
  top-k, token = :func:`next_token`; each token is fed to the LM (1-row forward) so that the
  next query exists, except the last token of a synchronous round, whose forward waits for its
  verification. At stride 0 (the naive fallback, below): one verified token instead.
- ``verify``: ONE batched real search of the pending steps' queries.
- ``judge``: the oldest round is judged step by step (``judge_each``) with the kNN-LM rule:
  the *true* token t*_i is :func:`next_token` with the true neighbours and the LM scores already
  computed for step i (no decision at all when the true neighbours are the speculated ones);
  t_i is kept when t*_i == t_i (default, the paper's rule: neighbour sets may differ) or, in
  ``strict`` mode, only when the speculated neighbours are the true ones. The driver keeps the
  accepted prefix; at the first rejection it cuts that step and everything after it (later
  tokens, and tokens speculated on top of them), t*_i becomes a verified step (``correct``) and
  the LM's KV cache is cropped back to it (``settled``; no re-prefill).

Only the verified prefix (``RoundBook.verified_end``) is returned.

Why output is identical to :meth:`KNNLM.generate`: step i's query and logits are produced by
the same 1-row forwards over the same verified tokens as in the naive decoder (see
:mod:`ralmspec.knnlm.model`), the real search is batch-invariant (see
:mod:`ralmspec.knnlm.datastore`), so t*_i is exactly the naive decoder's token at that
position; a kept t_i equals t*_i; the first differing token is replaced by t*_i and nothing
after it survives.

Asynchronous verification (``async_verify=True``)
-------------------------------------------------
The batched search of round r runs in a worker thread (FAISS and numpy release the GIL) while
the main thread already speculates round r+1 on top of round r's unverified tokens. At most one
verification is in flight, so round r is settled before round r+1 is submitted: on a rejection,
round r+1's steps are cut with the rollback. As in RaLM, OS^3 keeps the step and search costs
measured alone and beside each other and chooses per round whether overlapping pays under that
contention (``StrideDecision.overlap``); a round it does not overlap is verified synchronously.

A server's policy (``may_speculate``, asked before every round) may pause speculation: the
decoder then takes verified steps, the naive decoder's (the kNN-LM server pauses it while several
requests share the batched runner's forwards and searches: docs/knnlm.md).

OS^3 and the naive fallback
---------------------------
Stride and fallback are the shared :class:`StrideScheduler`'s, the same rule as RaLM's (``a`` =
one speculative step: cache top-k + decision + 1-row LM forward; ``b(s)`` = one batched
verification; ``γ`` from the last rounds, capped at ``gamma_max``; naive step = LM forward +
``b(1)``; nothing is regenerated on a rejection, ``regenerates=False``). A stride-1 synchronous
round costs a naive step *plus* a cache lookup, so speculation can only lose when retrieval is
cheap. With ``naive_fallback`` (and OS^3 on) the scheduler answers stride 0 while its best round
is predicted no faster per verified token than a naive step, and until ``a``, ``b(1)`` and ``γ``
are measured: the decoder then takes a plain verified step (a real search). Such a step also
probes the cache (top-k + decision, timed as ``a``, judged as a 1-step round) while estimates are
missing and then every ``probe_every``-th time, so that ``γ`` keeps being estimated and
speculation resumes when it pays again.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from ralmspec.config import OS3_MODE_DEFAULTS, OS3Config, check_type
from ralmspec.errors import ConfigError
from ralmspec.knnlm.datastore import Datastore, rank_order, squared_l2
from ralmspec.knnlm.model import KNNLM, IncrementalDecoder, KNNLMResult, LMState, OnTokens, StopWhen
from ralmspec.speculation.driver import Driver, Plan, StepKind
from ralmspec.speculation.rounds import Round, Step, Verdict, judge_each
from ralmspec.threads import WorkerPool, run_sync

_U32 = 2.0 ** -24  # float32 unit roundoff


@dataclass(frozen=True)
class SpeculativeKNNConfig(OS3Config):
    """Speculation knobs (OS^3's in ``OS3Config``, with kNN-LM's defaults from
    ``OS3_MODE_DEFAULTS``); none of them can change the output tokens."""

    async_verify: bool = bool(OS3_MODE_DEFAULTS["knnlm"]["async_verify"])
    gamma_max: float = float(OS3_MODE_DEFAULTS["knnlm"]["gamma_max"])
    successors: int = 10  # m: successors i+1..i+m of every retrieved entry go into the cache
    cache_capacity: int = 2048  # entries per request (LRU)
    strict: bool = False  # accept only when the speculated top-k ids equal the true ones
    prefilter: bool = True  # certified float32 prefilter in the cache (exact result either way)
    self_feed: bool = True  # speculated neighbours' successors also enter the cache (module doc)
    probe_every: int = 4  # during the fallback, every n-th step also probes the cache (0: never)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.successors <= 1024:
            raise ConfigError(f"successors must be in [0, 1024], got {self.successors!r}")
        if self.cache_capacity < 1:
            raise ConfigError(f"cache_capacity must be >= 1, got {self.cache_capacity!r}")
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
        # entry id -> slot, for the cached entries only: memory and set-up grow with the capacity,
        # not with the datastore (a dense id -> slot table took 4 bytes per datastore entry and
        # request: 396 MiB and 84 ms of set-up at WikiText-103's 103M entries). Replaying recorded
        # cache operations on the test datastore, a dict cost less than a sorted id view
        # (searchsorted, re-sorted or merged on every insert): ~7 us to look up an add's ~88 ids,
        # about +25 us per token over the dense table's ~160 us of cache work per token.
        self._slot_of: dict[int, int] = {}
        self._size = 0
        self._clock = 0
        self.evictions = 0
        self.prefilter_fallbacks = 0
        # |error of a float32 dot product of length d| <= gamma * ||k|| * ||q||
        self._gamma = (d + 2) * _U32 / (1.0 - (d + 2) * _U32) * 1.01

    def __len__(self) -> int:
        return self._size

    def __contains__(self, entry: int) -> bool:
        return int(entry) in self._slot_of

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
        cur = self._slots(arr)  # slot of each id, -1: not cached
        present = cur >= 0
        new = arr[~present]
        k64 = self.ds.key_vectors(new) if new.size else None  # before any change (it may raise)
        free = self.capacity - self._size
        n_free = min(free, new.size)
        slots = np.arange(self._size, self._size + n_free, dtype=np.int64)
        need = new.size - n_free
        if need > 0:
            stamps = self._stamp[:self._size].copy()
            stamps[cur[present]] = np.iinfo(np.int64).max  # protect this batch
            victims = np.argpartition(stamps, need - 1)[:need] if need < self._size else np.arange(self._size)
            victims = np.sort(victims)
            for gone in self._ids[victims].tolist():
                del slot_of[gone]
            self.evictions += need
            slots = np.concatenate([slots, victims])
        self._size += n_free
        if k64 is not None:
            self._ids[slots] = new
            self._keys64[slots] = k64
            self._keys32[slots] = k64.astype(np.float32)
            self._norm2[slots] = np.einsum("ij,ij->i", k64, k64)
            slot_of.update(zip(new.tolist(), slots.tolist()))
            cur[~present] = slots  # a present id is never a victim (protected): its slot stays
        self._stamp[cur] = self._clock + np.arange(arr.size)
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
        ids, d, slots = found
        self._stamp[slots] = self._clock + np.arange(ids.size)[::-1]
        self._clock += ids.size
        return ids, d

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        """The slot of each entry id (int64), -1 where it is not cached."""
        return np.fromiter(map(self._slot_of.get, ids.tolist(), itertools.repeat(-1, ids.size)),
                           dtype=np.int64, count=ids.size)

    def _rank(self, query: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Canonical top-``k`` of the entries in ``slots`` (float64 distances, then entry id):
        their ids, distances and slots."""
        ids = self._ids[slots]
        d = squared_l2(query, self._keys64[slots])
        order = rank_order(ids, d, k)
        return ids[order], d[order], slots[order]

    def _prefiltered_topk(self, query: np.ndarray, k: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
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
        ids, d, slots = self._rank(query, part[:c], k)
        m = float(norm2.max())
        lower = float(approx[part[c]]) - (2.0 * self._gamma * np.sqrt(m * qn) + 1e-9 * (m + qn + 1.0))
        return (ids, d, slots) if d.size == k and d[-1] < lower else None


# ---------------------------------------------------------------------- stats


@dataclass
class SpeculativeStats:
    """One request's counters. The speculation figures (``rounds`` ... ``verify_wait_s``, one
    definition each for every mode) are the driver's (``speculation/driver.py`` module doc),
    copied at the end; a step is one token. The rest are kNN-LM's own."""

    rounds: int = 0  # verification rounds applied
    speculated: int = 0  # tokens decided from the cache and verified in a round (kept or not)
    accepted: int = 0  # speculated tokens kept by verification
    rollbacks: int = 0  # rounds with a rejected token
    cancelled: int = 0  # rounds in flight cancelled by a rollback
    cancelled_steps: int = 0  # tokens those rounds held (sent to verification, never judged)
    verified_ahead: int = 0  # judged before producing anything (never here: a token is its own step's output)
    wasted_tokens: int = 0  # tokens cut by rollbacks, the rejected one included
    verify_batch_sizes: list[int] = field(default_factory=list)  # tokens per applied round (one per ``rounds``)
    strides: list[int] = field(default_factory=list)  # OS^3's stride for each applied round
    acceptance_histogram: dict[str, int] = field(default_factory=dict)  # kept tokens -> rounds
    verified_steps: int = 0  # tokens decided from a real search (the first, OS^3's fallback)
    naive_steps: int = 0  # OS^3's fallback steps among them
    paused_steps: int = 0  # verified steps taken while a server's policy paused speculation
    held_steps: int = 0  # naive steps taken while OS^3's realized guard held speculation off
    probes: int = 0  # fallback steps that also asked the cache
    probe_hits: int = 0
    verify_wait_s: float = 0.0  # main thread blocked on verification
    real_searches: int = 0  # calls of the datastore search (initial + verifications)
    verified_queries: int = 0  # query vectors sent to real searches
    lm_s: float = 0.0  # LM forwards (incl. wasted ones)
    cache_s: float = 0.0  # cache top-k + decision
    verify_s: float = 0.0  # real-search time (in the worker thread when async)
    cache_add_s: float = 0.0
    wall_s: float = 0.0
    cache_size: int = 0
    cache_evictions: int = 0
    prefilter_fallbacks: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.speculated if self.speculated else float("nan")

    def to_dict(self) -> dict:
        """The counters as JSON-safe values: ``acceptance_rate`` is None, not NaN, when no token
        was speculated (as in the driver's figures)."""
        d = asdict(self)
        d["acceptance_rate"] = self.acceptance_rate if self.speculated else None
        return d


# ---------------------------------------------------------------------- decoder


class SpeculativeKNNLM:
    """Speculative kNN-LM over a :class:`KNNLM` (same LM, datastore and KNNLMConfig)."""

    def __init__(self, knnlm: KNNLM, config: SpeculativeKNNConfig | None = None):
        if not isinstance(knnlm, KNNLM):
            raise ConfigError(f"SpeculativeKNNLM speculates over a KNNLM, got {type(knnlm).__name__}")
        check_type(config, SpeculativeKNNConfig, "config", optional=True)
        self.base = knnlm
        self.config = config or SpeculativeKNNConfig()

    def generate(self, prompt: str | Sequence[int], *, on_tokens: OnTokens | None = None,
                 stop_when: StopWhen | None = None,
                 may_speculate: Callable[[], bool] | None = None) -> KNNLMResult:
        """Decode ``prompt``: the same tokens as ``self.base.generate(prompt, stop_when=...)``
        (module doc). ``on_tokens`` receives verified tokens only, in order, as rounds settle;
        ``stop_when`` is asked on the output verified and speculated, like an EOS;
        ``may_speculate`` (a server's policy) is asked before every round: while it says no, the
        decoder takes verified steps, exactly the naive decoder's (``paused_steps``)."""
        prompt_ids = self.base.check_prompt(prompt, self.base.config.max_new_tokens)
        if self.config.async_verify:
            with WorkerPool(max_workers=1, thread_name_prefix="knnlm-verify") as pool:
                return KNNMode(self, prompt_ids, pool, on_tokens, stop_when, may_speculate).run()
        return KNNMode(self, prompt_ids, None, on_tokens, stop_when, may_speculate).run()


class KNNMode:
    """kNN-LM as a mode of the speculation driver (module doc "Round"). Use once.

    A step is one token of the driver's token list (``Step.start`` is its index there; the query
    is the :class:`LMState` it is decided at, the guess the token, ``extra`` the speculated
    neighbours). ``state`` is the LM state after the last token fed to the LM: after the last
    token, except while a synchronous round's last token waits for its verification, and once
    the output is complete. Every step runs without yielding to the event loop, so an overlapped
    round (a worker-thread search) is applied when the driver waits for it.
    """

    redecides_each_step = False  # OS^3 decides once per round (a step is one token)
    regenerates = False  # a rejected token's correction comes from the verification itself
    encodes_beside = False
    max_inflight = 1
    eager = False

    def __init__(self, owner: SpeculativeKNNLM, prompt_ids: list[int], pool: WorkerPool | None,
                 on_tokens: OnTokens | None = None, stop_when: StopWhen | None = None,
                 may_speculate: Callable[[], bool] | None = None):
        base, scfg = owner.base, owner.config
        self.on_tokens, self.stop_when, self.policy = on_tokens, stop_when, may_speculate
        self.base, self.scfg, self.pool = base, scfg, pool
        self.k, self.max_new = base.config.k, base.config.max_new_tokens
        self.prompt_ids = prompt_ids
        self.stats = SpeculativeStats()
        self.cache = NeighbourCache(base.datastore, scfg.cache_capacity, prefilter=scfg.prefilter)
        self.dec = IncrementalDecoder(base.lm, base.runner)
        self.state: LMState | None = None
        self.drv: Driver | None = None
        self.lm_step_s: float | None = None  # latest 1-row LM forward

    def run(self) -> KNNLMResult:
        """Prefill the prompt, run the driver's loop; the verified tokens and the stats."""
        st, t_start = self.stats, time.perf_counter()
        try:
            self.state = self.dec.start(self.prompt_ids)
            st.lm_s += self.state.seconds
            emit = None if self.on_tokens is None else (lambda toks, _steps: self.on_tokens(list(toks)))
            self.drv = drv = Driver(self, self.scfg, on_verified=emit)
            tokens = run_sync(lambda: drv.run(self.prompt_ids))
        finally:
            self.dec.close()
        figures = drv.figures()
        del figures["acceptance_rate"]  # SpeculativeStats computes it
        for name, value in figures.items():
            setattr(st, name, value)
        st.wall_s = time.perf_counter() - t_start
        st.cache_size, st.cache_evictions = len(self.cache), self.cache.evictions
        st.prefilter_fallbacks = self.cache.prefilter_fallbacks
        return KNNLMResult(prompt_ids=self.prompt_ids, tokens=tokens, text=self.base.decode_text(tokens),
                           wall_s=st.wall_s, lm_s=st.lm_s, search_s=st.verify_s, stats=st, mode="speculative")

    # ------------------------------------------------------------------ the mode's part of a round
    def complete(self, tokens: list[int], n_prompt: int) -> bool:
        """The output (verified and speculated tokens) is complete: max length, a stop token, or
        ``stop_when``. Asked before every step, so the output never grows past the first point
        where it holds: the verified output ends where the naive decoder's does."""
        if len(tokens) - n_prompt >= self.max_new or (len(tokens) > n_prompt and self.base.is_stop(tokens[-1])):
            return True
        return len(tokens) > n_prompt and self.stop_when is not None and self.stop_when(tokens[n_prompt:])

    def may_speculate(self) -> bool:
        return self.policy is None or self.policy()

    def steps_left(self, tokens: list[int], n_prompt: int) -> int:
        return self.max_new - (len(tokens) - n_prompt)

    async def start(self, drv: Driver) -> None:
        self.verified_step(StepKind.FIRST)

    async def advance(self, drv: Driver, plan: Plan) -> None:
        """One token: guessed from the cache and fed to the LM (except a synchronous round's last
        token: ``settled`` feeds it once verified), or at stride 0 decided from a real search."""
        if plan.stride == 0:  # naive fallback or a paused step: nothing in flight, everything verified
            self.verified_step(StepKind.PAUSED if plan.paused else StepKind.FALLBACK)
            return
        base, cache, sched, state, book = self.base, self.cache, drv.sched, self.state, drv.book
        beside = bool(book.inflight)  # a verification runs beside this step (contention)
        t0 = time.perf_counter()
        sid, sd = cache.topk(state.hidden, self.k)
        tok = base.decide(state, sid, sd)
        if self.scfg.self_feed:  # walk on: the successors of the speculated neighbours
            cache.add_search_result(sid, self.scfg.successors)
        t_cache = time.perf_counter() - t0
        self.stats.cache_s += t_cache
        start = len(drv.tokens)
        drv.add(Step(start, state, tok, verified=False, end=start + 1, extra=(sid, sd)), [tok])
        last = not plan.overlap and len(book.pending()) >= plan.stride
        if last or self.complete(drv.tokens, drv.n0):
            sched.observe_step(t_cache + (self.lm_step_s or state.seconds), beside)  # the forward it would cost
            return
        self.forward(tok, alone=not beside)
        sched.observe_step(t_cache + self.state.seconds, beside)

    def verify(self, drv: Driver, steps: list[Step], plan: Plan) -> asyncio.Future:
        """ONE batched real search of the steps' queries: now (synchronous; the driver applies it
        at once) or in the worker thread beside the next steps (``plan.overlap``)."""
        queries = [s.query.hidden for s in steps]
        if plan.overlap:  # the datastore's own search: the worker thread is no decoding thread (search)
            handle = asyncio.wrap_future(self.pool.submit(self.search, queries, True))
        else:
            handle = asyncio.get_running_loop().create_future()
            handle.set_result(self.search(queries))
        self.stats.real_searches += 1
        self.stats.verified_queries += len(steps)
        return handle

    def judge(self, drv: Driver, rnd: Round, outcome: tuple[np.ndarray, np.ndarray, float]) -> Verdict:
        """Judge the round's tokens in order (``judge_step``), up to the first rejection."""
        ids, d, took = outcome
        self.stats.verify_s += took
        drv.sched.observe_verification(len(rnd.steps), took, rnd.overlap)
        t0 = time.perf_counter()
        verdict = judge_each(self.judge_step(s, ids[i], d[i]) for i, s in enumerate(rnd.steps))
        self.stats.cache_add_s += time.perf_counter() - t0
        return verdict

    def correct(self, drv: Driver, bad: Step, truth: int, wasted: int) -> tuple[Step, list[int]]:
        """The true token replaces the rejected one (``settled`` feeds it to the LM)."""
        return Step(bad.start, None, truth, verified=True, end=bad.start + 1), [truth]

    def settled(self, drv: Driver, rnd: Round, verdict: Verdict, rolled_back: bool) -> None:
        """Kept steps drop their LM state (a vocabulary-sized buffer); the LM is fed the true
        token after a rollback (cropped back to it), or a synchronous round's last token."""
        for s in rnd.steps[:verdict.accepted]:
            s.query = s.extra = None
        if rolled_back or not rnd.overlap:
            self.feed()

    # ------------------------------------------------------------------ kNN-LM parts
    def judge_step(self, step: Step, ids: np.ndarray, d: np.ndarray) -> tuple[bool, int]:
        """The acceptance rule for one speculated token given its true neighbours ``ids``,
        ``d``: (keep it?, the true token). True neighbours equal to the speculated ones (ids and
        distances) give the same token, kept with no decision; with ``self_feed`` the cache
        already holds them and their successors. Otherwise they and their successors enter the
        cache and the true token is decided from the step's LM state (its scores are reused);
        it is kept when it is the speculated token, unless ``strict``."""
        cache, scfg = self.cache, self.scfg
        sid, sd = step.extra
        if np.array_equal(sid, ids) and np.array_equal(sd, d):
            if not scfg.self_feed:
                cache.add_search_result(ids, scfg.successors)
            return True, step.guess
        cache.add_search_result(ids, scfg.successors)
        true_tok = self.base.decide(step.query, ids, d)
        return true_tok == step.guess and not scfg.strict, true_tok

    def search(self, hidden: list[np.ndarray], worker: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
        """The real search of the queries, in one batch: (ids, distances, seconds). From the
        verification ``worker`` thread it is the datastore's own search, not the decoding threads'
        shared one (``KNNLM.search``): that thread is no member of their rendezvous, and a call
        from it would wait its turn among their batches (one at a time) instead of running beside
        this request's LM steps. Same results either way (the search is batch-invariant)."""
        t0 = time.perf_counter()
        ids, d = (self.base.datastore.search if worker else self.base.search)(np.stack(hidden), self.k)
        return ids, d, time.perf_counter() - t0

    def verified_step(self, kind: StepKind) -> None:
        """One token from a real search (the first token, the OS^3 fallback, a paused step), fed
        to the LM. While OS^3 lacks estimates, and then every ``probe_every``-th fallback step, it
        also asks the cache first (fed by the step before): a speculative step's cost ``a`` and a
        1-step round for ``γ``, so speculation can start, or resume when it pays again. A paused
        step never asks the cache: it is the naive decoder's step."""
        drv, base, cache, scfg, st, state = self.drv, self.base, self.cache, self.scfg, self.stats, self.state
        sched, done = drv.sched, drv.stats.verified_steps  # verified steps so far
        probe = done > 0 and kind is not StepKind.PAUSED and self.probes_now(done)  # paused: the naive step
        if probe:
            t0 = time.perf_counter()
            sid, sd = cache.topk(state.hidden, self.k)
            spec_tok = base.decide(state, sid, sd)
            t_probe = time.perf_counter() - t0
            st.cache_s += t_probe
        ids, d, took = self.search([state.hidden])
        st.verify_s += took
        st.real_searches += 1
        st.verified_queries += 1
        sched.observe_verification(1, took)
        sched.observe_retrieval(took)
        tok = base.decide(state, ids[0], d[0])
        if probe:
            ok = spec_tok == tok and (not scfg.strict or np.array_equal(sid, ids[0]))
            sched.observe_step(t_probe + (self.lm_step_s or state.seconds))
            drv.probed(ok)
        # Feed the cache on the first step, on a probe (speculation may start next) and right
        # before a probe (it needs this step's successors); skipping the other feeds keeps the
        # fallback close to naive cost, and a paused step at it (measured: feeding every paused
        # step, as OS^3 "needs estimates" while paused, cost 0.72-0.97x of naive throughput).
        if done == 0 or probe or (kind is not StepKind.PAUSED and self.probes_now(done + 1)):
            t0 = time.perf_counter()
            cache.add_search_result(ids[0], scfg.successors)
            st.cache_add_s += time.perf_counter() - t0
        start = len(drv.tokens)
        drv.add(Step(start, None, tok, verified=True, end=start + 1), [tok], kind)
        self.feed()

    def probes_now(self, verified_step: int) -> bool:
        """The ``verified_step``-th verified step (>= 1) probes the cache: while OS^3 still needs
        estimates, else every ``probe_every``-th one."""
        pe = self.scfg.probe_every
        return self.drv.sched.needs_estimates() or (pe > 0 and verified_step % pe == 0)

    def feed(self) -> None:
        """Feed the output's last token to the LM, after cropping its KV cache to the tokens
        before it (a no-op unless rolled back); nothing once the output is complete."""
        tokens = self.drv.tokens
        if self.complete(tokens, self.drv.n0):
            return
        self.dec.truncate(len(tokens) - 1)
        self.forward(tokens[-1], alone=True)

    def forward(self, token: int, alone: bool) -> None:
        """One 1-row LM forward of ``token``; ``alone``: no verification ran beside it (OS^3's
        naive-step LM cost)."""
        self.state = self.dec.step(token)
        self.stats.lm_s += self.state.seconds
        self.lm_step_s = self.state.seconds
        if alone:
            self.drv.sched.observe_lm(self.state.seconds)


__all__ = ["SpeculativeKNNConfig", "SpeculativeKNNLM", "SpeculativeStats", "NeighbourCache", "KNNMode"]
