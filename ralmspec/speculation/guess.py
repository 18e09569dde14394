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
"""

from __future__ import annotations

from dataclasses import dataclass

from ralmspec.config import GUESSERS


@dataclass(frozen=True)
class GuessPlan:
    """What the speculative step does for its guess (pure decision, no I/O)."""

    rank_now: bool  # rank the cache with the exact metric before the next chunk (critical path)
    rank_beside: bool  # rank the cache on the verification worker while the next chunk runs
    encode_beside: bool  # only encode the query on the worker (verification will need it)


def plan_guess(guesser: str, dense: bool) -> GuessPlan:
    """The work of one guess for ``guesser`` on a dense (query-encoding) or sparse retriever."""
    if guesser not in GUESSERS:
        raise ValueError(f"unknown guesser {guesser!r}; choose one of {', '.join(GUESSERS)}")
    if guesser == "exact":
        return GuessPlan(rank_now=True, rank_beside=False, encode_beside=False)
    if guesser == "last":
        return GuessPlan(rank_now=False, rank_beside=False, encode_beside=dense)
    return GuessPlan(rank_now=False, rank_beside=True, encode_beside=False)


def refined_doc(cheap: int, exact: int | None, verified: bool) -> int | None:
    """The passage a refined step must be regenerated with, or ``None`` to keep its chunk.

    A step already verified keeps its (true) passage; an empty cache (``exact`` None) gives no
    better guess; otherwise the exact cache guess wins when it differs from the cheap one.
    """
    if verified or exact is None or exact == cheap:
        return None
    return exact
