"""Log-probabilities of an answer's tokens, scored once the answer is final (``gen.logprobs``).

Each verified step of the answer (``GenerationResult.steps``: generated tokens ``[start, end)``
with passage ``doc_id``) is scored under the very LM input that step was generated from:
``RalmContext.lm_prompt(doc_id, prompt + answer[:start], ...)``, i.e. THAT step's passage in the
prompt format, and the LM's ``token_logprobs`` replays the step's decoding
(``ralmspec/lm/base.py``). So a token's log-probability is the one the model computed when the
kept step produced it, and it depends only on the final answer and its passages: identical with
speculation on and off (speculated steps that were rolled back are never scored), at any
concurrency. The decoding loops are untouched. The cost: none on the ``hf`` backend in
practice, since every chunk of such a request is decoded with ``Sampling.logprobs`` set
(``GenerationConfig.sampling_at``), so the backend scores it from the logits it was decoded
with and answers ``token_logprobs`` of a kept step from those scores (a chunk later rolled back
is simply never asked for); a step it no longer holds (its bounded memo) is replayed: the same
values, bit for bit (tests/engine/test_logprobs.py).

Values are ``log_softmax`` of the model's logits (temperature 1, no top-p cut), also for sampled
answers, as OpenAI and vLLM report them.
"""

from __future__ import annotations

from typing import Hashable

from ralmspec.engine.context import RalmContext
from ralmspec.engine.result import GenerationResult
from ralmspec.lm.base import TokenLogprob
from ralmspec.threads import to_thread


def step_inputs(ctx: RalmContext, result: GenerationResult) -> list[tuple[list[int], list[int]]]:
    """``(LM input, tokens generated from it)`` of every step of ``result``, in order."""
    n0 = len(result.prompt_ids)
    tokens = list(result.prompt_ids) + list(result.token_ids)
    if result.mode == "closed-book":  # one chunk of max_new_tokens, no passage (engine/naive.py)
        spans = [(None, 0, len(result.token_ids), ctx.gen.max_new_tokens)]
    else:
        spans = [(st.doc_id, st.start, st.end, ctx.chunk_size(st.start)) for st in result.steps]
    return [(ctx.lm_prompt(doc, tokens[: n0 + start], n0, n), tokens[n0 + start: n0 + end])
            for doc, start, end, n in spans if end > start]


async def score_answer(ctx: RalmContext, result: GenerationResult, top_k: int,
                       session: Hashable) -> list[TokenLogprob]:
    """One ``TokenLogprob`` per token of ``result.token_ids`` (module doc). ``session`` is a fresh
    LM session for the replay (consecutive steps share their KV prefix), released after."""
    def run() -> list[TokenLogprob]:  # in a thread: the backend's lock is never waited for on the loop
        out: list[TokenLogprob] = []
        try:
            for prompt, toks in step_inputs(ctx, result):
                out += ctx.lm.token_logprobs(prompt, toks, top_k, session)
        finally:
            ctx.lm.release(session)
        return out

    scored = await to_thread(run)
    if len(scored) != len(result.token_ids):  # the steps must tile the answer
        raise AssertionError(f"scored {len(scored)} of {len(result.token_ids)} answer tokens")
    return scored
