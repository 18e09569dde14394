"""The oracle: naive iterative RaLM exactly as docs/design.md §1. Every faster path must match it.

    tokens = tokenize(prompt)
    while not finished:
        doc = knowledge_base.top1(query(tokens))      # step 0 queries the prompt itself
        tokens += lm.greedy(doc + tokens, n=stride)
"""

from __future__ import annotations

from typing import Callable, Hashable

from ralmspec.engine.context import RalmContext, new_session_id
from ralmspec.engine.result import GenerationResult, StepRecord, Tracer, VerifiedChunk
from ralmspec.speculation.verify import verify_batch

TokenCallback = Callable[[VerifiedChunk], None]  # an engine caller's: each verified chunk, in order
# the loops': the verified tokens and the steps they complete (none for a closed-book answer)
VerifiedCallback = Callable[[list[int], list[StepRecord]], None]


async def generate_naive(ctx: RalmContext, prompt: str, session: Hashable | None = None,
                         on_verified: VerifiedCallback | None = None, retries: int = 2,
                         timeout_s: float | None = 30.0) -> GenerationResult:
    """Run the oracle loop for one request. ``on_verified`` receives each new chunk (all
    verified) and its step."""
    session = session if session is not None else new_session_id("naive")
    prompt_ids = ctx.encode_prompt(prompt)
    tokens = list(prompt_ids)
    n0 = len(tokens)
    tr = Tracer()
    steps: list[StepRecord] = []
    retrieval_s = lm_s = 0.0
    try:
        while not ctx.finished(tokens, n0):
            t = tr.now()
            query = ctx.query(tokens)
            hits = await verify_batch(ctx.search_client.search, [query], 1, retries, timeout_s)
            doc_id = hits[0][0].doc_id
            retrieval_s += tr.record("retrieve", t, doc_id=doc_id)
            n = ctx.chunk_size(len(tokens) - n0)
            t = tr.now()
            chunk = await ctx.chunk(doc_id, tokens, n0, n, session)
            lm_s += tr.record("lm", t, n=len(chunk))
            start = len(tokens) - n0
            tokens += chunk
            steps.append(StepRecord(start, len(tokens) - n0, doc_id, ctx.retriever.corpus[doc_id].title))
            if on_verified is not None:
                on_verified(chunk, steps[-1:])
    finally:
        ctx.lm_client.release(session)
    gen = tokens[n0:]
    latency = tr.now()
    return GenerationResult(
        prompt=prompt, mode="naive", prompt_ids=prompt_ids, token_ids=gen,
        text=ctx.lm.tokenizer.decode(gen), steps=steps,
        finish_reason="eos" if gen and ctx.lm.is_stop(gen[-1]) else "length",
        latency_s=latency,
        stats={
            "steps": len(steps), "retrieval_s": retrieval_s, "lm_s": lm_s,
            "mean_retrieval_s": retrieval_s / max(1, len(steps)), "mean_lm_s": lm_s / max(1, len(steps)),
            # speed-up limit of a perfect speculator: (a + r) / a, from this very trace
            "limit": latency / max(1e-12, latency - retrieval_s),
        },
        trace=tr.events,
    )


async def generate_closed_book(ctx: RalmContext, prompt: str, session: Hashable | None = None,
                               on_verified: VerifiedCallback | None = None) -> GenerationResult:
    """The same prompt format with no passage and no retrieval (``--no-retrieval``): the
    closed-book answer that shows what retrieval adds. One greedy call of ``max_new_tokens``."""
    session = session if session is not None else new_session_id("closed")
    prompt_ids = ctx.encode_prompt(prompt)
    tr = Tracer()
    n = ctx.gen.max_new_tokens
    try:
        t = tr.now()
        gen = await ctx.chunk(None, prompt_ids, len(prompt_ids), n, session)
        lm_s = tr.record("lm", t, n=len(gen))
    finally:
        ctx.lm_client.release(session)
    if on_verified is not None and gen:
        on_verified(list(gen), [])
    return GenerationResult(
        prompt=prompt, mode="closed-book", prompt_ids=prompt_ids, token_ids=list(gen),
        text=ctx.lm.tokenizer.decode(gen), steps=[],
        finish_reason="eos" if gen and ctx.lm.is_stop(gen[-1]) else "length",
        latency_s=tr.now(), stats={"steps": 0, "retrieval_s": 0.0, "lm_s": lm_s}, trace=tr.events)
