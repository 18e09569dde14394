"""RaLMSpec: speculative retrieval with batched verification, prefetching, OS^3 and async verify.

Invariant (DESIGN §2.1): the returned tokens equal ``generate_naive`` for the same model,
knowledge base and GenerationConfig, whatever the SpeculationConfig.

Why: a step is a (start, query, doc) triple; its query is computed from the tokens before
``start``. A step's chunk is generated with its doc. Steps with a speculated doc are verified in
order by one batched search of their queries; a step whose doc equals the knowledge base's top-1
becomes verified; at the first mismatch everything from that step's ``start`` on is discarded and
the step restarts with the true doc. So every kept chunk was generated from a prompt the naive
loop also builds, and the LM contract makes the chunk a function of that prompt alone.

Rounds: OS^3 picks ``s``; after ``s`` speculated steps exist they go to verification. Synchronous
mode waits for it. Asynchronous mode starts the search as a task and keeps speculating (up to
``max_inflight`` rounds in flight); results are applied strictly in submission order and a
rollback cancels every later round. Only verified tokens are passed to ``on_tokens``.

Naive fallback: while OS^3 predicts that speculation loses to the naive loop (stride 0, see
``speculation/stride.py``), nothing is in flight and every step is verified, the next step is
retrieved for real before its chunk is generated (exactly the naive step). The cache is still
fed and probed: the probe runs first and encodes the query, the search then reuses that
encoding, so the step costs one naive retrieval and measures everything OS^3 compares (lookup,
single search, hit or miss). A request starts this way until those estimates exist, and
speculation resumes whenever it is predicted to pay.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

from ralmspec.config import SpeculationConfig
from ralmspec.engine.context import RalmContext, new_session_id
from ralmspec.engine.naive import TokenCallback
from ralmspec.engine.result import GenerationResult, StepRecord, Tracer
from ralmspec.retrieval.base import Hit
from ralmspec.speculation.cache import SpeculationCache
from ralmspec.speculation.guess import plan_guess, refined_doc
from ralmspec.speculation.stride import StrideScheduler
from ralmspec.speculation.verify import first_mismatch, verify_batch


@dataclass(eq=False)
class _Step:
    start: int  # absolute index into tokens where this step's chunk begins
    query: str
    doc_id: int
    verified: bool
    end: int | None = None  # set once its chunk is generated
    submitted: bool = False
    # guesser "refine": the exact cache guess being computed on the worker (None: no refinement)
    refine: asyncio.Future | None = None


@dataclass(eq=False)
class _Round:
    steps: list[_Step]
    task: asyncio.Task
    submitted_at: float
    duration: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds), by the task


async def generate_speculative(ctx: RalmContext, prompt: str, spec: SpeculationConfig,
                               session: Hashable | None = None, on_tokens: TokenCallback | None = None,
                               retries: int = 2, timeout_s: float | None = 30.0) -> GenerationResult:
    session = session if session is not None else new_session_id("spec")
    prompt_ids = ctx.encode_prompt(prompt)
    tokens = list(prompt_ids)
    n0 = len(tokens)
    tr = Tracer()
    cache = SpeculationCache(ctx.retriever, spec.cache_capacity)
    sched = StrideScheduler(os3=spec.os3, fixed_stride=spec.fixed_stride, async_verify=spec.async_verify,
                            s_max=spec.s_max, window=spec.window, gamma_max=spec.gamma_max,
                            naive_fallback=spec.naive_fallback)
    max_inflight = spec.max_inflight if spec.async_verify else 1
    loop = asyncio.get_running_loop()
    encoder = getattr(ctx.retriever, "encoder", None)
    plan = plan_guess(spec.guesser, dense=encoder is not None and hasattr(encoder, "encode_queries"))
    stats = {"rounds": 0, "speculated": 0, "accepted": 0, "rollbacks": 0, "wasted_tokens": 0,
             "lm_steps": 0, "lm_s": 0.0, "cache_s": 0.0, "retrieval_s": 0.0, "verify_s": 0.0,
             "verify_wait_s": 0.0, "naive_steps": 0, "probe_hits": 0, "refine_wait_s": 0.0, "refined": 0,
             "worker_s": 0.0,
             "verify_batch_sizes": [], "strides": []}
    inflight: deque[_Round] = deque()
    emitted = 0  # generated tokens already passed to on_tokens

    async def timed_search(queries: list[str], out: list[tuple[float, float]]) -> list[list[Hit]]:
        t = tr.now()
        hits = await verify_batch(ctx.search_client.search, queries, spec.prefetch, retries, timeout_s)
        out.append((t, tr.now() - t))
        return hits

    def emit_verified() -> None:
        nonlocal emitted
        if on_tokens is None:
            return
        upto = n0
        for st in steps:
            if not st.verified or st.end is None:
                break
            upto = st.end
        if upto - n0 > emitted:
            on_tokens(tokens[n0 + emitted: upto])
            emitted = upto - n0

    def apply(rnd: _Round, hits: list[list[Hit]]) -> None:
        """Apply one verification round in order: prefetch, accept, or roll back at the first miss."""
        for h in hits:
            cache.add(h)
        start, took = rnd.duration[0] if rnd.duration else (rnd.submitted_at, tr.now() - rnd.submitted_at)
        stats["verify_s"] += took
        tr.events.append({"kind": "verify", "t": round(start, 6), "dur": round(took, 6), "size": len(rnd.steps)})
        sched.observe_verification(len(rnd.steps), took)
        j = first_mismatch([st.doc_id for st in rnd.steps], [h[0].doc_id for h in hits])
        matched = len(rnd.steps) if j is None else j
        for st in rnd.steps[:matched]:
            st.verified = True
        stats["rounds"] += 1
        stats["speculated"] += len(rnd.steps)
        stats["accepted"] += matched
        sched.observe_round(len(rnd.steps), matched)
        if j is not None:
            bad = rnd.steps[j]
            idx = steps.index(bad)
            wasted = len(tokens) - bad.start
            del tokens[bad.start:]
            del steps[idx:]
            steps.append(_Step(bad.start, bad.query, hits[j][0].doc_id, verified=True))
            for later in inflight:
                later.task.cancel()
            inflight.clear()
            stats["rollbacks"] += 1
            stats["wasted_tokens"] += wasted
            tr.event("rollback", at=bad.start - n0, wasted=wasted, speculated=bad.doc_id, true=hits[j][0].doc_id)
        emit_verified()

    def rank_top1(query: str, ids: list[int]) -> int | None:
        return ctx.retriever.rank(query, ids, k=1)[0].doc_id if ids else None

    def timed(fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            stats["worker_s"] += time.perf_counter() - t  # one worker thread: no lost update

    def beside(fn, *args) -> asyncio.Future:
        """Run ``fn`` on the verification worker; a failure there only loses the head start."""
        fut = loop.run_in_executor(ctx.worker, timed, fn, *args)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        return fut

    async def chunk_for(step: _Step, n: int) -> list[int]:
        """The chunk of ``step`` (refined: regenerated with the exact cache guess if it differs)."""
        chunk = await ctx.lm_client.greedy(ctx.lm_prompt(step.doc_id, tokens, n0, n), n, session)
        if step.refine is None:
            return chunk
        fut, step.refine = step.refine, None
        if step.verified:  # its round came back right while the chunk ran: nothing to refine
            return chunk
        t = tr.now()
        try:
            exact = await fut
        except Exception:  # noqa: BLE001 - the exact guess is an optimisation, never required
            exact = None
        stats["refine_wait_s"] += tr.record("refine", t, doc_id=exact)
        if exact is not None:
            cache.use(exact)
        redo = refined_doc(step.doc_id, exact, step.verified)
        if redo is None:
            return chunk
        step.doc_id = redo
        stats["refined"] += 1
        return await ctx.lm_client.greedy(ctx.lm_prompt(redo, tokens, n0, n), n, session)

    async def wait_oldest() -> None:
        rnd = inflight[0]
        t = tr.now()
        try:
            hits = await rnd.task
        finally:
            stats["verify_wait_s"] += tr.now() - t
        if inflight and inflight[0] is rnd:
            inflight.popleft()
            apply(rnd, hits)

    try:
        # Step 0: one real retrieval for the prompt; its top-`prefetch` seeds the cache.
        t = tr.now()
        q0 = ctx.query(tokens)
        first = await verify_batch(ctx.search_client.search, [q0], spec.prefetch, retries, timeout_s)
        took = tr.record("retrieve", t, doc_id=first[0][0].doc_id, k=spec.prefetch)
        stats["retrieval_s"] += took
        sched.observe_retrieval(took)
        cache.add(first[0])
        lookup_s = 0.0  # latest speculative cache lookup (query encoding + ranking)
        steps: list[_Step] = [_Step(n0, q0, first[0][0].doc_id, verified=True)]

        while True:
            while inflight and inflight[0].task.done():
                await wait_oldest()
            done = ctx.finished(tokens, n0)
            pending = [st for st in steps if not st.verified and not st.submitted]
            stride = sched.next_stride()
            if pending and (len(pending) >= stride or done):
                if len(inflight) >= max_inflight:
                    await wait_oldest()
                    continue
                for st in pending:
                    st.submitted = True
                duration: list[tuple[float, float]] = []
                task = asyncio.create_task(timed_search([st.query for st in pending], duration))
                rnd = _Round(pending, task, tr.now(), duration)
                inflight.append(rnd)
                stats["verify_batch_sizes"].append(len(pending))
                stats["strides"].append(stride)
                tr.event("submit", size=len(pending), stride=stride, inflight=len(inflight))
                if not spec.async_verify:
                    await wait_oldest()
                continue
            if done:
                if inflight:
                    await wait_oldest()
                    continue
                break
            if stride == 0 and inflight:  # falling back to naive steps: settle what is in flight
                await wait_oldest()
                continue
            last = steps[-1]
            if last.end is not None:  # cannot happen: a step is only added when work remains
                raise AssertionError("speculative engine lost track of its current step")
            # One speculative step: LM chunk with the current doc, then the next query + cache guess.
            t_step = tr.now()
            n = ctx.chunk_size(len(tokens) - n0)
            chunk = await chunk_for(last, n)
            lm_took = tr.record("lm", t_step, n=len(chunk), doc_id=last.doc_id, verified=last.verified)
            stats["lm_s"] += lm_took
            stats["lm_steps"] += 1
            sched.observe_lm(lm_took)
            if not chunk:
                raise RuntimeError("LM backend returned no tokens")
            tokens += chunk
            last.end = len(tokens)
            if not ctx.finished(tokens, n0):
                t = tr.now()
                q = ctx.query(tokens)
                if sched.next_stride() == 0 and not inflight and all(st.verified for st in steps):
                    # A naive step that also measures what OS^3 needs: the cache lookup first
                    # (it encodes the query, as a speculative step would: c), then the real
                    # search (reusing that encoding: b(1)); together they cost one naive retrieval.
                    probe = await asyncio.to_thread(cache.top1, q)
                    lookup_s = tr.record("probe", t, doc_id=probe)
                    probe_event = tr.events[-1]
                    t = tr.now()
                    hits = await verify_batch(ctx.search_client.search, [q], spec.prefetch, retries, timeout_s)
                    true = hits[0][0].doc_id
                    probe_event["hit"] = probe == true
                    search_s = tr.record("retrieve", t, doc_id=true, k=spec.prefetch, fallback=True)
                    stats["cache_s"] += lookup_s
                    stats["retrieval_s"] += search_s
                    sched.observe_retrieval(lookup_s + search_s)
                    sched.observe_verification(1, search_s)
                    sched.observe_round(1, int(probe == true))
                    cache.add(hits[0])
                    stats["naive_steps"] += 1
                    stats["probe_hits"] += int(probe == true)
                    steps.append(_Step(len(tokens), q, true, verified=True))
                    sched.observe_step(lm_took + lookup_s)
                else:
                    # the guess (speculation/guess.py): exact ranking now, or the last passage
                    # with the exact ranking / the query encoding on the worker beside the LM
                    guess, refine = last.doc_id, None
                    if plan.rank_now:
                        guess = await asyncio.to_thread(cache.top1, q)
                    elif plan.rank_beside:
                        refine = beside(rank_top1, q, cache.doc_ids())
                    elif plan.encode_beside:
                        beside(encoder.encode_queries, [q])
                    lookup_s = tr.record("cache", t, doc_id=guess)
                    stats["cache_s"] += lookup_s
                    steps.append(_Step(len(tokens), q, guess, verified=False, refine=refine))
                    sched.observe_step(tr.now() - t_step)
            else:
                sched.observe_step(tr.now() - t_step)
            if last.verified:
                emit_verified()
        emit_verified()
    finally:
        for rnd in inflight:
            rnd.task.cancel()
        ctx.lm_client.release(session)

    gen = tokens[n0:]
    eos = ctx.lm.eos_token_id
    records = [StepRecord(st.start - n0, (st.end or len(tokens)) - n0, st.doc_id,
                          ctx.retriever.corpus[st.doc_id].title) for st in steps if st.end is not None]
    stats["acceptance_rate"] = stats["accepted"] / stats["speculated"] if stats["speculated"] else None
    # busy / (2 workers x wall): the LM thread (chunks) beside verification + the worker thread
    wall = max(tr.now(), 1e-12)
    stats["overlap"] = (stats["lm_s"] + stats["verify_s"] + stats["worker_s"]) / (2 * wall)
    stats["cache_size"] = len(cache)
    stats["cache_evictions"] = cache.evictions
    return GenerationResult(
        prompt=prompt, mode="speculative", prompt_ids=prompt_ids, token_ids=gen,
        text=ctx.lm.tokenizer.decode(gen), steps=records,
        finish_reason="eos" if gen and eos is not None and gen[-1] == eos else "length",
        latency_s=tr.now(), stats=stats, trace=tr.events,
    )
