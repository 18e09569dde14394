"""Log-probabilities of an answer's tokens (``gen.logprobs``), scored as its steps are verified.

Each verified step of the answer (generated tokens ``[start, end)`` with passage ``doc_id``) is
scored under the very LM input that step was generated from:
``RalmContext.lm_prompt(doc_id, prompt + answer[:start], ...)``, i.e. THAT step's passage in the
prompt format, and the LM's ``token_logprobs`` replays the step's decoding
(``ralmspec/lm/base.py``). So a token's log-probability is the one the model computed when the
kept step produced it, and it depends only on the final answer and its passages: identical with
speculation on and off (speculated steps that were rolled back are never scored), at any
concurrency. The decoding loops are untouched: ``AnswerScorer`` is the callback they hand their
verified tokens to (with the steps those complete), and it passes each chunk on to the caller's
``on_tokens`` with its logprobs (``VerifiedChunk``), so a stream sends a chunk's logprobs with
its text; the result's logprobs are the chunks', cut where the answer ends (a stop string).

The cost: none on the ``hf`` backend in practice. Every chunk of such a request is decoded with
``Sampling.logprobs`` set (``GenerationConfig.sampling_at``), so the backend scores it from the
logits it was decoded with and keeps the scores; ``decoded_logprobs`` hands them over at once
(no wait for the LM), and a chunk is passed on as soon as it is verified. A step the backend no
longer holds (its bounded memo) is replayed in a thread, the same values bit for bit
(tests/engine/test_logprobs.py); later chunks wait for it, so they still arrive in order.

Values are ``log_softmax`` of the model's logits (temperature 1, no top-p cut), also for sampled
answers, as OpenAI and vLLM report them.
"""

from __future__ import annotations

import asyncio
from typing import Hashable, Sequence

from ralmspec.engine.context import RalmContext
from ralmspec.engine.naive import TokenCallback
from ralmspec.engine.result import GenerationResult, StepRecord, VerifiedChunk
from ralmspec.lm.base import TokenLogprob
from ralmspec.threads import to_thread


def step_inputs(ctx: RalmContext, result: GenerationResult) -> list[tuple[list[int], list[int]]]:
    """``(LM input, tokens generated from it)`` of every step of ``result``, in order."""
    spans = step_spans(ctx, result.steps, result.mode == "closed-book", 0, len(result.token_ids))
    return span_inputs(ctx, list(result.prompt_ids) + list(result.token_ids), len(result.prompt_ids), spans)


def step_spans(ctx: RalmContext, steps: Sequence[StepRecord], closed_book: bool, start: int,
               end: int) -> list[tuple[int | None, int, int, int]]:
    """``(passage, start, end, chunk size)`` of the steps of answer tokens ``[start, end)``: ``steps``,
    or one chunk of ``max_new_tokens`` with no passage for a closed-book answer (engine/naive.py)."""
    if closed_book:
        return [(None, start, end, ctx.gen.max_new_tokens)]
    return [(st.doc_id, st.start, st.end, ctx.chunk_size(st.start)) for st in steps]


def span_inputs(ctx: RalmContext, tokens: list[int], n0: int,
                spans: list[tuple[int | None, int, int, int]]) -> list[tuple[list[int], list[int]]]:
    """``(LM input, its tokens)`` of each non-empty span; ``tokens`` = prompt ids + answer."""
    return [(ctx.lm_prompt(doc, tokens[: n0 + s], n0, n), tokens[n0 + s: n0 + end])
            for doc, s, end, n in spans if end > s]


class AnswerScorer:
    """The loops' ``on_verified`` for a request that asks for logprobs (module doc): scores each
    verified chunk by its steps and passes it on to ``on_tokens`` with its logprobs, in order.

    Invariant: the chunks passed on, concatenated, are the tokens the loop verified, and
    ``scores()`` holds one ``TokenLogprob`` per token of them, in order."""

    def __init__(self, ctx: RalmContext, question: str, top_k: int, session: Hashable,
                 on_tokens: TokenCallback | None, closed_book: bool):
        self.ctx, self.top_k, self.session, self.on_tokens = ctx, top_k, session, on_tokens
        self.closed_book = closed_book
        self.prompt_ids = ctx.encode_prompt(question)  # the loops' own first step (tokenized once: ctx)
        self.answer: list[int] = []  # verified tokens received
        self.scored: list[TokenLogprob] = []  # their logprobs, as far as passed on
        self.pending: asyncio.Future | None = None  # the latest chunk still being scored

    def __call__(self, tokens: list[int], steps: list[StepRecord]) -> None:
        chunk, start = list(tokens), len(self.answer)
        self.answer += chunk
        spans = self._inputs(start, steps)
        if self.pending is None or self._settled(self.pending):
            kept = self._kept(spans)
            if kept is not None:  # the usual case: passed on at once
                self._pass_on(chunk, kept)
                return
        self.pending = asyncio.ensure_future(self._score_after(self.pending, chunk, spans))

    async def scores(self) -> list[TokenLogprob]:
        """Every received token's ``TokenLogprob`` once all are passed on."""
        if self.pending is not None:
            await self.pending
        if len(self.scored) != len(self.answer):  # the steps must tile the answer
            raise AssertionError(f"scored {len(self.scored)} of {len(self.answer)} answer tokens")
        return self.scored

    def close(self) -> None:
        """Stop scoring (the request ended or failed)."""
        if self.pending is not None:
            if not self.pending.done():
                self.pending.cancel()
            elif not self.pending.cancelled():
                self.pending.exception()  # retrieved: the request's own error is what is raised

    # ------------------------------------------------------------------ internals
    def _inputs(self, start: int, steps: list[StepRecord]) -> list[tuple[list[int], list[int]]]:
        spans = step_spans(self.ctx, steps, self.closed_book, start, len(self.answer))
        covered = sum(end - s for _, s, end, _ in spans)
        if covered != len(self.answer) - start or any(s < start for _, s, _, _ in spans):
            raise AssertionError(f"verified steps cover {covered} of {len(self.answer) - start} new tokens")
        return span_inputs(self.ctx, self.prompt_ids + self.answer, len(self.prompt_ids), spans)

    def _kept(self, spans: list[tuple[list[int], list[int]]]) -> list[TokenLogprob] | None:
        out: list[TokenLogprob] = []
        for prompt, toks in spans:
            kept = self.ctx.lm.decoded_logprobs(prompt, toks, self.top_k)
            if kept is None:
                return None
            out += kept
        return out

    def _replay(self, spans: list[tuple[list[int], list[int]]]) -> list[TokenLogprob]:
        """In a thread (the LM's lock is never waited for on the loop; nor is the release of
        the replay's session, so each replay releases it here)."""
        out: list[TokenLogprob] = []
        try:
            for prompt, toks in spans:  # memo hits answered as such, the rest replayed
                out += self.ctx.lm.token_logprobs(prompt, toks, self.top_k, self.session)
        finally:
            self.ctx.lm.release(self.session)
        return out

    async def _score_after(self, before: asyncio.Future | None, chunk: list[int],
                           spans: list[tuple[list[int], list[int]]]) -> None:
        if before is not None:
            await before  # in order: a chunk is passed on after the ones before it
        kept = self._kept(spans)
        if kept is None:
            kept = await to_thread(self._replay, spans)
        self._pass_on(chunk, kept)

    def _pass_on(self, chunk: list[int], scored: list[TokenLogprob]) -> None:
        if [lp.token for lp in scored] != chunk:
            raise AssertionError("a chunk's logprobs are not its tokens'")
        self.scored += scored
        if self.on_tokens is not None:
            self.on_tokens(VerifiedChunk(chunk, scored))

    @staticmethod
    def _settled(fut: asyncio.Future) -> bool:
        return fut.done() and not fut.cancelled() and fut.exception() is None
