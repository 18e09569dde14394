"""RaLMSpec: speculative retrieval with batched verification, prefetching, OS^3 and async verify.

Invariant (docs/design.md §2 invariant 1): the returned tokens equal ``generate_naive`` for the same model,
knowledge base and GenerationConfig, whatever the SpeculationConfig.

Why: a step (``speculation/rounds.py``) is a (start, query, doc) triple; its query is computed
from the tokens before ``start`` and its chunk is generated with its doc. Steps with a
speculated doc are verified in order by one batched search of their queries; a step whose doc
equals the knowledge base's top-1 becomes verified; at the first mismatch everything from that
step's ``start`` on is discarded and the step restarts with the true doc. So every kept chunk
was generated from a prompt the naive loop also builds, and the LM contract makes the chunk a
function of that prompt alone.

The round is the speculation driver's (``speculation/driver.py``: schedule, step, submit,
apply, rollback, the figures); this module is RaLM's ``Mode`` there (``RalmMode``):

- ``advance``: the LM chunk of the current step, then the next step's query and its guess (a
  guesser strategy, ``speculation/guess.py``), or, while OS^3 says speculation does not pay, a
  verified step;
- ``verify``: ONE batched verification of the pending steps' queries (a task: a synchronous
  round is waited for at once; an asynchronous one runs beside the next steps, up to
  ``max_inflight`` rounds in flight; with ``eager_verify`` a round leaves as soon as the
  verifier is idle). In asynchronous mode OS^3 decides per round whether overlapping pays under
  the contention it measured (``speculation/stride.py``), else the round is synchronous;
- ``judge``: the round's hits are prefetched into the cache; a step is kept when its passage is
  the knowledge base's top-1 (``judge``), and ``correct`` restarts a rejected step with the
  true passage. Only verified tokens are passed to ``on_tokens``.

Naive fallback: while OS^3 predicts that speculation loses to the naive loop (stride 0, see
``speculation/stride.py``), nothing is in flight and every step is verified, the next step is
retrieved for real before its chunk is generated (exactly the naive step). The cache is still
fed and probed: the probe runs first and encodes the query, the search then reuses that
encoding, so the step costs one naive retrieval and measures everything OS^3 compares (lookup,
single search, hit or miss). A request starts this way until those estimates exist, and
speculation resumes whenever it is predicted to pay. On a shared server the load governor
(``engine/governor.py``, ``ctx.may_speculate``) can pause speculation the same way while the LM
is saturated by other requests; those steps are plain naive steps (no probe).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Hashable

from ralmspec.config import SpeculationConfig
from ralmspec.engine.context import RalmContext, new_session_id
from ralmspec.engine.naive import VerifiedCallback
from ralmspec.engine.result import GenerationResult, StepRecord, Tracer
from ralmspec.retrieval.base import Hit
from ralmspec.speculation.cache import SpeculationCache
from ralmspec.speculation.driver import Driver, Plan, StepKind
from ralmspec.speculation.guess import CheapRankers, make_guesser, refined_doc
from ralmspec.speculation.rounds import Round, Step, Verdict, judge
from ralmspec.speculation.verify import verify_batch
from ralmspec.threads import to_thread


async def generate_speculative(ctx: RalmContext, prompt: str, spec: SpeculationConfig,
                               session: Hashable | None = None, on_verified: VerifiedCallback | None = None,
                               retries: int = 2, timeout_s: float | None = 30.0) -> GenerationResult:
    mode = RalmMode(ctx, spec, session if session is not None else new_session_id("spec"), retries, timeout_s)
    return await mode.generate(prompt, on_verified)


class RalmMode:
    """Document-level RaLM as a mode of the speculation driver (module doc): a step is one chunk
    and its passage; the guess is a guesser's (``speculation/guess.py``); a round is ONE batched
    knowledge-base search; a step is kept when its passage is the true top-1. Use once."""

    redecides_each_step = True  # a chunk's cost updates OS^3's estimates: ask before every step
    regenerates = True  # a rejected step's chunk is generated again with the true passage

    def __init__(self, ctx: RalmContext, spec: SpeculationConfig, session: Hashable, retries: int,
                 timeout_s: float | None):
        self.ctx, self.spec, self.session = ctx, spec, session
        self.retries, self.timeout_s = retries, timeout_s
        self.tr = Tracer()
        self.cache = SpeculationCache(ctx.retriever, spec.cache_capacity)
        encoder = getattr(ctx.retriever, "encoder", None)
        self.encoder = encoder if encoder is not None and hasattr(encoder, "encode_queries") else None
        self.guesser = make_guesser(spec.guesser, dense=self.encoder is not None,
                                    rankers=ctx.rankers or CheapRankers(ctx.retriever))
        # every guesser but ``exact`` has the worker encode each step's query beside its chunk
        self.encodes_beside = self.encoder is not None and not self.guesser.encodes_query
        self.max_inflight = spec.max_inflight if spec.async_verify else 1
        self.eager = spec.async_verify and spec.eager_verify
        # costs are kept per guesser: a = LM chunk + guess, and the guess's price is the guesser's
        self.cost_key = f"os3/{spec.guesser}"
        self.stats = {"lm_steps": 0, "lm_s": 0.0, "cache_s": 0.0, "retrieval_s": 0.0, "verify_s": 0.0,
                      "encode_s": 0.0, "refine_wait_s": 0.0, "refined": 0, "worker_s": 0.0,
                      "guesses": 0, "guess_s": 0.0}  # guesses: the guesser's critical-path cost
        self.drv: Driver | None = None

    async def generate(self, prompt: str, on_verified: VerifiedCallback | None) -> GenerationResult:
        ctx = self.ctx
        prompt_ids = ctx.encode_prompt(prompt)
        emit = None if on_verified is None else (
            lambda toks, steps: on_verified(toks, [self.record(st) for st in steps]))
        self.drv = drv = Driver(self, self.spec, emit, clock=self.tr.now)
        drv.sched.seed_costs(ctx.costs.get(self.cost_key) if ctx.costs is not None else None)
        try:
            await drv.run(prompt_ids)
        finally:
            ctx.lm_client.release(self.session)
            if ctx.costs is not None and self.spec.os3:
                ctx.costs[self.cost_key] = drv.sched.costs()  # calibration for the engine's next request
        return self.result(prompt, prompt_ids)

    # ------------------------------------------------------------------ the mode's part of a round
    def complete(self, tokens: list[int], n_prompt: int) -> bool:
        return self.ctx.finished(tokens, n_prompt)

    def may_speculate(self) -> bool:
        """A loaded server's governor may pause speculation (engine/governor.py): stride 0, and
        plain naive steps (also instead of OS^3's probing fallback steps)."""
        return self.ctx.may_speculate is None or self.ctx.may_speculate()

    def steps_left(self, tokens: list[int], n_prompt: int) -> None:
        return None  # a round may hold more chunks than remain: the last ones are never produced

    async def start(self, drv: Driver) -> None:
        """Step 0: one real retrieval for the prompt; its top-``prefetch`` seeds the cache."""
        drv.sched.observe_retrieval(await self.retrieved_step(self.ctx.query(drv.tokens), StepKind.FIRST))

    async def advance(self, drv: Driver, plan: Plan) -> None:
        """Generate the current step's chunk, then start the next step: guessed, or (OS^3
        fallback: stride 0, nothing in flight, all verified) retrieved for real."""
        ctx, tr, book, sched = self.ctx, self.tr, drv.book, drv.sched
        cur = book.current
        if cur.end is not None:  # cannot happen: a step is only added when work remains
            raise AssertionError("speculative engine lost track of its current step")
        t_step = tr.now()
        overlapped = bool(book.inflight)  # a verification runs beside this step (contention)
        chunk = await self.chunk_for(cur, ctx.chunk_size(len(drv.tokens) - drv.n0))
        lm_took = tr.record("lm", t_step, n=len(chunk), doc_id=cur.guess, verified=cur.verified)
        self.stats["lm_s"] += lm_took
        self.stats["lm_steps"] += 1
        if not overlapped:  # the naive step's LM part is a chunk alone (contention is a_ov's)
            sched.observe_lm(lm_took)
        drv.extend(chunk)
        cur.end = len(drv.tokens)
        if ctx.finished(drv.tokens, drv.n0):
            sched.observe_step(tr.now() - t_step, overlapped)
        elif plan.stride == 0 and not book.inflight and book.all_verified():
            if plan.paused:  # the server's governor: exactly the naive step
                await self.paused_step()
            else:
                lookup_s = await self.verified_step()
                sched.observe_step(lm_took + self.guess_price(lookup_s))
        else:
            await self.guessed_step()
            sched.observe_step(tr.now() - t_step, overlapped)

    def verify(self, drv: Driver, steps: list[Step], plan: Plan) -> asyncio.Task:
        """ONE batched verification of the steps' queries, as a task (``plan.overlap``: it runs
        beside decoding, else the driver waits for it at once)."""
        task = asyncio.create_task(self.verify_round([st.query for st in steps], plan.overlap))
        self.tr.event("submit", size=len(steps), stride=plan.stride, inflight=len(drv.book.inflight) + 1)
        return task

    def judge(self, drv: Driver, rnd: Round, outcome: tuple[list[list[Hit]], float, float]) -> Verdict:
        """Prefetch the round's hits into the cache; keep steps while their passage is the true
        top-1 (``judge``: the first mismatch ends the round, its top-1 is the correction)."""
        hits, start, took = outcome
        for h in hits:
            self.cache.add(h)
        self.stats["verify_s"] += took
        self.tr.events.append({"kind": "verify", "t": round(start, 6), "dur": round(took, 6), "size": len(rnd.steps)})
        return judge([st.guess for st in rnd.steps], [h[0].doc_id for h in hits])

    def correct(self, drv: Driver, bad: Step, truth: int, wasted: int) -> tuple[Step, list[int]]:
        """The rejected step restarts with the true passage (its chunk comes next). The trace calls
        it a ``rollback`` when tokens were cut (as ``stats["rollbacks"]`` counts), a ``correct``
        when the step had produced nothing yet (a synchronous round's last step)."""
        kind = "rollback" if wasted else "correct"
        self.tr.event(kind, at=bad.start - drv.n0, wasted=wasted, speculated=bad.guess, true=truth)
        return Step(bad.start, bad.query, truth, verified=True), []

    def settled(self, drv: Driver, rnd: Round, verdict: Verdict, rolled_back: bool) -> None:
        pass  # nothing of RaLM's own: the chunks are the driver's tokens

    # ------------------------------------------------------------------ step helpers
    async def chunk_for(self, step: Step, n: int) -> list[int]:
        """The chunk of ``step`` (refined: regenerated with the exact cache guess if it differs)."""
        ctx, drv = self.ctx, self.drv
        chunk = await ctx.chunk(step.guess, drv.tokens, drv.n0, n, self.session)
        fut, step.extra = step.extra, None
        if fut is None or step.verified:  # no refinement, or its round came back right meanwhile
            return chunk
        t = self.tr.now()
        try:
            exact = await fut
        except Exception:  # noqa: BLE001 - the exact guess is an optimisation, never required
            exact = None
        self.stats["refine_wait_s"] += self.tr.record("refine", t, doc_id=exact)
        if exact is not None:
            self.cache.use(exact)
        redo = refined_doc(step.guess, exact, step.verified)
        if redo is None:
            return chunk
        step.guess = redo
        self.stats["refined"] += 1
        return await ctx.chunk(redo, drv.tokens, drv.n0, n, self.session)

    async def paused_step(self) -> None:
        """Speculation paused by a loaded server's governor: exactly the naive step (retrieve,
        then the chunk comes next), with no probe or other extra hop, so paused requests stay in
        lock-step with naive ones and share their LM and search batches. The hits still feed the
        cache for when speculation resumes."""
        await self.retrieved_step(self.ctx.query(self.drv.tokens), StepKind.PAUSED, paused=True)

    async def retrieved_step(self, q: str, kind: StepKind, **trace: Any) -> float:
        """Add the next step with the knowledge base's passage for ``q`` (a real search, its hits
        fed to the cache); returns the search's seconds. Every verified step goes through here."""
        drv, t = self.drv, self.tr.now()
        hits = await self.search([q])
        took = self.tr.record("retrieve", t, doc_id=hits[0][0].doc_id, k=self.spec.prefetch, **trace)
        self.stats["retrieval_s"] += took
        self.cache.add(hits[0])
        drv.add(Step(len(drv.tokens), q, hits[0][0].doc_id, verified=True), kind=kind)
        return took

    async def guessed_step(self) -> None:
        """The next step with the guesser's passage (speculation/guess.py)."""
        drv, t = self.drv, self.tr.now()
        q = self.ctx.query(drv.tokens)
        guess = await self.guesser.guess(q, drv.book.current.guess, self)
        took = self.tr.record("cache", t, doc_id=guess.doc)
        self.stats["cache_s"] += took
        self.stats["guess_s"] += took
        self.stats["guesses"] += 1
        drv.add(Step(len(drv.tokens), q, guess.doc, verified=False, extra=guess.refine))

    def guess_price(self, lookup_s: float) -> float:
        """What the guesser's own guess costs on the critical path, as a fallback step's
        ``a`` = LM chunk + guess: the probe's exact lookup (it encodes the query) for a guesser
        that encodes (``exact``); else the mean of its guesses so far (microseconds: ``last``,
        ``refine``, the cheap and bound guessers). Charging every guesser the probe's encoding
        made OS^3 price an oracle step at ~80 ms instead of ~30 (tiny LM, one thread) and
        tipped it to naive steps (measured 2026-12-05)."""
        if self.guesser.encodes_query:
            return lookup_s
        return self.stats["guess_s"] / self.stats["guesses"] if self.stats["guesses"] else 0.0

    async def verified_step(self) -> float:
        """A naive step that also measures what OS^3 needs: the cache lookup first (it encodes
        the query, as a speculative step would), then the real search (reusing that encoding);
        together they cost one naive retrieval. The acceptance sample is whether the guesser's
        OWN guess (``would_guess``) was the true passage. Returns the lookup's seconds."""
        drv, tr = self.drv, self.tr
        t = tr.now()
        q = self.ctx.query(drv.tokens)
        last = drv.book.current.guess  # the passage of the chunk just produced
        probe = await to_thread(self.exact_guess, q)
        lookup_s = tr.record("probe", t, doc_id=probe)
        probe_event = tr.events[-1]
        # what THIS guesser would have guessed (``last`` keeps the passage, a cheap ranker ranks):
        # scoring the exact lookup instead made OS^3 resume `last` at exact's acceptance (~0.8)
        # where its own was ~0.3, so `last` ran slower than naive (measured 2026-12-05)
        own = self.guesser.would_guess(q, last, probe, self)
        search_s = await self.retrieved_step(q, StepKind.FALLBACK, fallback=True)
        hit = own == drv.book.current.guess  # the step just added holds the true passage
        probe_event["hit"] = hit
        probe_event["guess"] = own
        self.stats["cache_s"] += lookup_s
        drv.sched.observe_retrieval(lookup_s + search_s)
        drv.sched.observe_search(1, search_s)
        drv.probed(hit)
        return lookup_s

    # ------------------------------------------------------------------ verification and the guess kit
    async def search(self, queries: list[str]) -> list[list[Hit]]:
        return await verify_batch(self.ctx.search_client.search, queries, self.spec.prefetch,
                                  self.retries, self.timeout_s)

    async def verify_round(self, queries: list[str], overlapped: bool) -> tuple[list[list[Hit]], float, float]:
        """A round's verification: the queries' encodings on the verification worker (one at a
        time, batch-invariant; the guesses queued them there beside the chunks, so this waits for
        any still running and finds the rest cached), then ONE batched search, whose seconds are
        OS^3's b(s). Returns (hits, start, seconds)."""
        t = self.tr.now()
        if self.encodes_beside:  # implies an encoder
            await asyncio.get_running_loop().run_in_executor(self.ctx.worker, self.encoder.encode_queries, queries)
        t_search = self.tr.now()
        hits = await self.search(queries)
        end = self.tr.now()
        self.stats["encode_s"] += t_search - t
        self.drv.sched.observe_search(len(queries), end - t_search, overlapped)
        return hits, t, end - t

    def exact_guess(self, q: str) -> int | None:
        """The cache's top-1 for ``q`` with the retriever's own metric (encodes ``q`` first)."""
        if self.encoder is not None:
            self.timed_encode(q)
        return self.cache.top1(q)

    def timed_encode(self, q: str, beside: bool = False) -> None:
        """Encode ``q`` (cached for the cache ranking and the verification) and tell OS^3 what a
        fresh encoding costs, ``beside`` the LM (on the worker) or on the critical path."""
        t = time.perf_counter()
        misses = self.encoder.misses
        self.encoder.encode_queries([q])
        if self.encoder.misses > misses:
            self.drv.sched.observe_encode(time.perf_counter() - t, beside)

    def encode_beside(self, q: str) -> None:
        """Encode ``q`` on the verification worker while the LM produces the step's chunk."""
        self.beside(self.timed_encode, q, True)

    def rank_top1(self, query: str, ids: list[int]) -> int | None:
        return self.ctx.retriever.rank(query, ids, k=1)[0].doc_id if ids else None

    def beside(self, fn, *args: Any) -> asyncio.Future:
        """Run ``fn`` on the verification worker; a failure there only loses the head start."""
        def timed():
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.stats["worker_s"] += time.perf_counter() - t  # one worker thread: no lost update

        fut = asyncio.get_running_loop().run_in_executor(self.ctx.worker, timed)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        return fut

    # ------------------------------------------------------------------ output
    def record(self, st: Step) -> StepRecord:
        """A produced step as the result reports it (positions in the generated tokens)."""
        assert self.drv is not None and st.end is not None
        n0 = self.drv.n0
        return StepRecord(st.start - n0, st.end - n0, st.guess, self.ctx.retriever.corpus[st.guess].title)

    def result(self, prompt: str, prompt_ids: list[int]) -> GenerationResult:
        ctx, drv, tr = self.ctx, self.drv, self.tr
        gen = drv.tokens[drv.n0:]
        records = [self.record(st) for st in drv.book.steps if st.end is not None]
        stats = dict(self.stats, **drv.figures())
        # busy / (2 workers x wall): the LM thread (chunks) beside verification + the worker thread
        wall = max(tr.now(), 1e-12)
        stats["overlap"] = (stats["lm_s"] + stats["verify_s"] + stats["worker_s"]) / (2 * wall)
        stats["cache_size"] = len(self.cache)
        stats["cache_evictions"] = self.cache.evictions
        return GenerationResult(
            prompt=prompt, mode="speculative", prompt_ids=prompt_ids, token_ids=gen,
            text=ctx.lm.tokenizer.decode(gen), steps=records,
            finish_reason="eos" if gen and ctx.lm.is_stop(gen[-1]) else "length",
            latency_s=tr.now(), stats=stats, trace=tr.events,
        )
