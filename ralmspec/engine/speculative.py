"""RaLMSpec: speculative retrieval with batched verification, prefetching, OS^3 and async verify.

Invariant (DESIGN §2.1): the returned tokens equal ``generate_naive`` for the same model,
knowledge base and GenerationConfig, whatever the SpeculationConfig.

Why: a step (``speculation/rounds.py``) is a (start, query, doc) triple; its query is computed
from the tokens before ``start`` and its chunk is generated with its doc. Steps with a
speculated doc are verified in order by one batched search of their queries; a step whose doc
equals the knowledge base's top-1 becomes verified; at the first mismatch everything from that
step's ``start`` on is discarded and the step restarts with the true doc. So every kept chunk
was generated from a prompt the naive loop also builds, and the LM contract makes the chunk a
function of that prompt alone.

The round, as ``SpeculativeRequest.run`` reads:

- ``next_action`` (pure, ``speculation/rounds.py``) decides from the counts alone: produce a
  step, submit the pending steps, wait for the oldest round, or finish;
- ``step``: the LM chunk of the current step, then the next step's query and its guess
  (``speculation/guess.py``), or, while OS^3 says speculation does not pay, a verified step;
- ``submit``: ONE batched verification of the pending steps' queries (a task: a synchronous
  round is waited for at once; an asynchronous one runs beside the next steps, up to
  ``max_inflight`` rounds in flight; with ``eager_verify`` a round leaves as soon as the
  verifier is idle). In asynchronous mode OS^3 decides per round whether overlapping pays under
  the contention it measured (``speculation/stride.py``), else the round is synchronous;
- ``settle``: the oldest round's hits are applied (prefetch into the cache, ``judge``,
  ``RoundBook.commit``: accept the prefix, or roll back and restart the rejected step with the
  true passage). Only verified tokens are passed to ``on_tokens``.

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
from typing import Hashable

from ralmspec.config import SpeculationConfig
from ralmspec.engine.context import RalmContext, new_session_id
from ralmspec.engine.naive import TokenCallback
from ralmspec.engine.result import GenerationResult, StepRecord, Tracer
from ralmspec.retrieval.base import Hit
from ralmspec.speculation.cache import SpeculationCache
from ralmspec.speculation.guess import CheapRankers, plan_guess, refined_doc
from ralmspec.speculation.rounds import Action, Round, RoundBook, Step, histogram_dict, judge, next_action
from ralmspec.speculation.stride import StrideScheduler
from ralmspec.speculation.verify import verify_batch


async def generate_speculative(ctx: RalmContext, prompt: str, spec: SpeculationConfig,
                               session: Hashable | None = None, on_tokens: TokenCallback | None = None,
                               retries: int = 2, timeout_s: float | None = 30.0) -> GenerationResult:
    req = SpeculativeRequest(ctx, spec, session if session is not None else new_session_id("spec"),
                             on_tokens, retries, timeout_s)
    return await req.run(prompt)


class SpeculativeRequest:
    """One request's RaLMSpec round state machine (module doc). Use once."""

    def __init__(self, ctx: RalmContext, spec: SpeculationConfig, session: Hashable,
                 on_tokens: TokenCallback | None, retries: int, timeout_s: float | None):
        self.ctx, self.spec, self.session, self.on_tokens = ctx, spec, session, on_tokens
        self.retries, self.timeout_s = retries, timeout_s
        self.tr = Tracer()
        self.cache = SpeculationCache(ctx.retriever, spec.cache_capacity)
        encoder = getattr(ctx.retriever, "encoder", None)
        self.encoder = encoder if encoder is not None and hasattr(encoder, "encode_queries") else None
        self.plan = plan_guess(spec.guesser, dense=self.encoder is not None)
        self.ranker = None
        if self.plan.cheap is not None:
            self.ranker = (ctx.rankers or CheapRankers(ctx.retriever)).get(self.plan.cheap)
        self.sched = StrideScheduler(os3=spec.os3, fixed_stride=spec.fixed_stride, async_verify=spec.async_verify,
                                     s_max=spec.s_max, window=spec.window, gamma_max=spec.gamma_max,
                                     naive_fallback=spec.naive_fallback,
                                     verify_encodes=self.encoder is not None and not self.plan.rank_now)
        # costs are kept per guesser: a = LM chunk + guess, and the guess's price is the guesser's
        self.cost_key = f"os3/{spec.guesser}"
        self.sched.seed_costs(ctx.costs.get(self.cost_key) if ctx.costs is not None else None)
        self.max_inflight = spec.max_inflight if spec.async_verify else 1
        self.eager = spec.async_verify and spec.eager_verify
        self.stats = {"lm_steps": 0, "lm_s": 0.0, "cache_s": 0.0, "retrieval_s": 0.0, "verify_s": 0.0,
                      "encode_s": 0.0, "verify_wait_s": 0.0, "naive_steps": 0, "probe_hits": 0,
                      # steps whose passage was retrieved for real before their chunk: the first
                      # step, OS^3's fallback steps (naive_steps) and governor-paused steps
                      "verified_steps": 0,
                      "refine_wait_s": 0.0, "refined": 0, "worker_s": 0.0, "wasted_tokens": 0,
                      "guesses": 0, "guess_s": 0.0,  # guesses: the guesser's critical-path cost
                      "paused_steps": 0}  # verified steps taken because the server's governor paused speculation
        self.tokens: list[int] = []
        self.n0 = 0
        self.emitted = 0  # generated tokens already passed to on_tokens
        self.book: RoundBook | None = None
        self.paused = False  # the server's governor paused speculation for this decision

    # ------------------------------------------------------------------ the loop
    async def run(self, prompt: str) -> GenerationResult:
        ctx = self.ctx
        prompt_ids = ctx.encode_prompt(prompt)
        self.tokens, self.n0 = list(prompt_ids), len(prompt_ids)
        try:
            self.book = book = RoundBook(await self.first_step())
            while True:
                while book.inflight and book.inflight[0].handle.done():
                    await self.settle()
                complete = ctx.finished(self.tokens, self.n0)
                pending = book.pending()
                decision = self.sched.decide()  # OS^3: stride, and (async) overlap or wait
                stride = decision.stride
                # a loaded server's governor may pause speculation (engine/governor.py): stride 0,
                # and plain naive steps (also instead of OS^3's probing fallback steps)
                self.paused = ctx.may_speculate is not None and not ctx.may_speculate()
                if self.paused:
                    stride, decision.overlap = 0, False
                action = next_action(len(pending), len(book.inflight), stride, complete,
                                     self.max_inflight, self.eager and decision.overlap)
                if action is Action.SUBMIT:
                    self.submit(pending, stride, decision.overlap)
                    if not decision.overlap:  # synchronous round: wait for it now
                        await self.settle()
                elif action is Action.WAIT:
                    await self.settle()
                elif action is Action.FINISH:
                    break
                else:
                    await self.step(stride)
            self.emit_verified()
        finally:
            if self.book is not None:
                self.book.abort()
            ctx.lm_client.release(self.session)
            if ctx.costs is not None and self.spec.os3:
                ctx.costs[self.cost_key] = self.sched.costs()  # calibration for the engine's next request
        return self.result(prompt, prompt_ids)

    # ------------------------------------------------------------------ phases
    async def first_step(self) -> Step:
        """Step 0: one real retrieval for the prompt; its top-``prefetch`` seeds the cache."""
        t = self.tr.now()
        q0 = self.ctx.query(self.tokens)
        first = await self.search([q0])
        took = self.tr.record("retrieve", t, doc_id=first[0][0].doc_id, k=self.spec.prefetch)
        self.stats["retrieval_s"] += took
        self.stats["verified_steps"] += 1
        self.sched.observe_retrieval(took)
        self.cache.add(first[0])
        return Step(self.n0, q0, first[0][0].doc_id, verified=True)

    async def step(self, stride: int) -> None:
        """Generate the current step's chunk, then start the next step: guessed, or (OS^3
        fallback: stride 0, nothing in flight, all verified) retrieved for real."""
        ctx, tr, book, sched = self.ctx, self.tr, self.book, self.sched
        cur = book.current
        if cur.end is not None:  # cannot happen: a step is only added when work remains
            raise AssertionError("speculative engine lost track of its current step")
        t_step = tr.now()
        overlapped = bool(book.inflight)  # a verification runs beside this step (contention)
        n = ctx.chunk_size(len(self.tokens) - self.n0)
        chunk = await self.chunk_for(cur, n)
        lm_took = tr.record("lm", t_step, n=len(chunk), doc_id=cur.guess, verified=cur.verified)
        self.stats["lm_s"] += lm_took
        self.stats["lm_steps"] += 1
        sched.observe_lm(lm_took)
        if not chunk:
            raise RuntimeError("LM backend returned no tokens")
        self.tokens += chunk
        cur.end = len(self.tokens)
        if ctx.finished(self.tokens, self.n0):
            sched.observe_step(tr.now() - t_step, overlapped)
        elif stride == 0 and not book.inflight and book.all_verified():
            if self.paused:  # the server's governor: exactly the naive step
                await self.paused_step()
            else:
                lookup_s = await self.verified_step()
                sched.observe_step(lm_took + lookup_s)
        else:
            book.add(await self.guessed_step())
            sched.observe_step(tr.now() - t_step, overlapped)
        if cur.verified:
            self.emit_verified()

    def submit(self, pending: list[Step], stride: int, overlap: bool) -> Round:
        """ONE batched verification of the pending steps' queries, as a task (``overlap``: it
        will run beside decoding, else the caller waits for it at once)."""
        timing: list[tuple[float, float]] = []
        task = asyncio.create_task(self.verify([st.query for st in pending], timing, overlap))
        rnd = self.book.submit(pending, task, stride, self.tr.now(), overlap)
        rnd.timing = timing
        self.tr.event("submit", size=len(pending), stride=stride, inflight=len(self.book.inflight))
        return rnd

    async def settle(self) -> None:
        """Wait for the oldest round and apply it: prefetch, accept, or roll back at the first
        miss and restart that step with the knowledge base's passage."""
        book, tr = self.book, self.tr
        rnd = book.inflight[0]
        t = tr.now()
        try:
            hits = await rnd.handle
        finally:
            self.stats["verify_wait_s"] += tr.now() - t
        if not book.inflight or book.inflight[0] is not rnd:  # cancelled meanwhile (cannot happen today)
            return
        for h in hits:
            self.cache.add(h)
        start, took = rnd.timing[0] if rnd.timing else (rnd.submitted_at, tr.now() - rnd.submitted_at)
        self.stats["verify_s"] += took
        tr.events.append({"kind": "verify", "t": round(start, 6), "dur": round(took, 6), "size": len(rnd.steps)})
        verdict = judge([st.guess for st in rnd.steps], [h[0].doc_id for h in hits])
        self.sched.observe_round(len(rnd.steps), verdict.accepted, rnd.overlap)
        bad = book.commit(rnd, verdict)
        if bad is not None:
            wasted = len(self.tokens) - bad.start
            del self.tokens[bad.start:]
            book.add(Step(bad.start, bad.query, verdict.correction, verified=True))
            self.stats["wasted_tokens"] += wasted
            tr.event("rollback", at=bad.start - self.n0, wasted=wasted, speculated=bad.guess, true=verdict.correction)
        book.check()
        self.emit_verified()

    # ------------------------------------------------------------------ step helpers
    async def chunk_for(self, step: Step, n: int) -> list[int]:
        """The chunk of ``step`` (refined: regenerated with the exact cache guess if it differs)."""
        ctx = self.ctx
        chunk = await ctx.chunk(step.guess, self.tokens, self.n0, n, self.session)
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
        return await ctx.chunk(redo, self.tokens, self.n0, n, self.session)

    async def paused_step(self) -> None:
        """Speculation paused by a loaded server's governor: exactly the naive step (retrieve,
        then the chunk comes next), with no probe or other extra hop, so paused requests stay in
        lock-step with naive ones and share their LM and search batches. The hits still feed the
        cache for when speculation resumes."""
        t = self.tr.now()
        q = self.ctx.query(self.tokens)
        hits = await self.search([q])
        self.stats["retrieval_s"] += self.tr.record("retrieve", t, doc_id=hits[0][0].doc_id, k=self.spec.prefetch,
                                                    paused=True)
        self.cache.add(hits[0])
        self.stats["paused_steps"] += 1
        self.stats["verified_steps"] += 1
        self.book.add(Step(len(self.tokens), q, hits[0][0].doc_id, verified=True))

    async def guessed_step(self) -> Step:
        """The next step with a guessed passage (speculation/guess.py): the exact cache ranking
        now, or the last passage with the exact ranking / the encoding on the worker."""
        tr, cache = self.tr, self.cache
        t = tr.now()
        q = self.ctx.query(self.tokens)
        guess, refine = self.book.current.guess, None
        if self.plan.rank_now:
            guess = await asyncio.to_thread(self.exact_guess, q)
        elif self.ranker is not None:  # cheap: microseconds, on the critical path
            guess = self.ranker.top1(q, cache.doc_ids())
            if guess is None:
                guess = self.book.current.guess
            cache.use(guess)
            if self.plan.encode_beside:
                self.beside(self.timed_encode, q)
        elif self.plan.rank_beside:
            refine = self.beside(self.rank_top1, q, cache.doc_ids())
        elif self.plan.encode_beside:
            self.beside(self.timed_encode, q)
        took = tr.record("cache", t, doc_id=guess)
        self.stats["cache_s"] += took
        self.stats["guess_s"] += took
        self.stats["guesses"] += 1
        return Step(len(self.tokens), q, guess, verified=False, extra=refine)

    async def verified_step(self) -> float:
        """A naive step that also measures what OS^3 needs: the cache lookup first (it encodes
        the query, as a speculative step would), then the real search (reusing that encoding);
        together they cost one naive retrieval. Returns the lookup's seconds."""
        tr, sched, cache = self.tr, self.sched, self.cache
        t = tr.now()
        q = self.ctx.query(self.tokens)
        probe = await asyncio.to_thread(self.exact_guess, q)
        lookup_s = tr.record("probe", t, doc_id=probe)
        probe_event = tr.events[-1]
        t = tr.now()
        hits = await self.search([q])
        true = hits[0][0].doc_id
        probe_event["hit"] = probe == true
        search_s = tr.record("retrieve", t, doc_id=true, k=self.spec.prefetch, fallback=True)
        self.stats["cache_s"] += lookup_s
        self.stats["retrieval_s"] += search_s
        sched.observe_retrieval(lookup_s + search_s)
        sched.observe_search(1, search_s)
        sched.observe_round(1, int(probe == true))
        cache.add(hits[0])
        self.stats["naive_steps"] += 1
        self.stats["verified_steps"] += 1
        self.stats["probe_hits"] += int(probe == true)
        self.book.add(Step(len(self.tokens), q, true, verified=True))
        return lookup_s

    # ------------------------------------------------------------------ verification
    async def search(self, queries: list[str]) -> list[list[Hit]]:
        return await verify_batch(self.ctx.search_client.search, queries, self.spec.prefetch,
                                  self.retries, self.timeout_s)

    async def verify(self, queries: list[str], timing: list[tuple[float, float]],
                     overlapped: bool) -> list[list[Hit]]:
        """A round's verification: the queries' encodings on the verification worker (one at a
        time, batch-invariant; free when the guess already encoded them), then ONE batched
        search. Records b(s) = encodings + search(s) for OS^3."""
        t = self.tr.now()
        if self.encoder is not None and self.sched.verify_encodes:
            await asyncio.get_running_loop().run_in_executor(self.ctx.worker, self.encoder.encode_queries, queries)
        t_search = self.tr.now()
        hits = await self.search(queries)
        end = self.tr.now()
        self.stats["encode_s"] += t_search - t
        self.sched.observe_search(len(queries), end - t_search, overlapped)
        timing.append((t, end - t))
        return hits

    def exact_guess(self, q: str) -> int | None:
        """The cache's top-1 for ``q`` with the retriever's own metric (encodes ``q`` first)."""
        if self.encoder is not None:
            self.timed_encode(q)
        return self.cache.top1(q)

    def timed_encode(self, q: str) -> None:
        """Encode ``q`` (cached for the cache ranking and the verification) and tell OS^3 what a
        fresh encoding costs."""
        t = time.perf_counter()
        misses = self.encoder.misses
        self.encoder.encode_queries([q])
        if self.encoder.misses > misses:
            self.sched.observe_encode(time.perf_counter() - t)

    def rank_top1(self, query: str, ids: list[int]) -> int | None:
        return self.ctx.retriever.rank(query, ids, k=1)[0].doc_id if ids else None

    def beside(self, fn, *args) -> asyncio.Future:
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
    def emit_verified(self) -> None:
        """Pass the newly verified tokens (and only those) to ``on_tokens``."""
        if self.on_tokens is None:
            return
        upto = self.book.verified_end(self.n0)
        if upto - self.n0 > self.emitted:
            self.on_tokens(self.tokens[self.n0 + self.emitted: upto])
            self.emitted = upto - self.n0

    def result(self, prompt: str, prompt_ids: list[int]) -> GenerationResult:
        ctx, book, tr = self.ctx, self.book, self.tr
        gen = self.tokens[self.n0:]
        eos = ctx.lm.eos_token_id
        n0 = self.n0
        records = [StepRecord(st.start - n0, (st.end or len(self.tokens)) - n0, st.guess,
                              ctx.retriever.corpus[st.guess].title) for st in book.steps if st.end is not None]
        rs = book.stats
        stats = dict(self.stats, rounds=rs.rounds, speculated=rs.speculated, accepted=rs.accepted,
                     rollbacks=rs.rollbacks, verify_batch_sizes=rs.batch_sizes, strides=rs.strides,
                     acceptance_histogram=histogram_dict(rs.histogram))
        stats["acceptance_rate"] = rs.accepted / rs.speculated if rs.speculated else None
        # busy / (2 workers x wall): the LM thread (chunks) beside verification + the worker thread
        wall = max(tr.now(), 1e-12)
        stats["overlap"] = (stats["lm_s"] + stats["verify_s"] + stats["worker_s"]) / (2 * wall)
        stats["cache_size"] = len(self.cache)
        stats["cache_evictions"] = self.cache.evictions
        return GenerationResult(
            prompt=prompt, mode="speculative", prompt_ids=prompt_ids, token_ids=gen,
            text=ctx.lm.tokenizer.decode(gen), steps=records,
            finish_reason="eos" if gen and eos is not None and gen[-1] == eos else "length",
            latency_s=tr.now(), stats=stats, trace=tr.events,
        )
