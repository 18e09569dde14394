"""Verification: one batched knowledge-base call for all pending steps, and the first-mismatch rule.

Invariant 4 (docs/design.md §2): a verification that fails is retried; if it still fails it raises
``RetrievalError`` and the engine releases nothing that was not already verified.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Sequence

from ralmspec.errors import RetrievalError
from ralmspec.retrieval.base import Hit

SearchFn = Callable[[Sequence[str], int], Awaitable[list[list[Hit]]]]


def first_mismatch(speculated: Sequence[int], truth_top1: Sequence[int]) -> int | None:
    """Index of the first step whose speculated doc differs from the true top-1, else None."""
    if len(speculated) != len(truth_top1):
        raise ValueError("one truth per speculated step is required")
    for i, (s, t) in enumerate(zip(speculated, truth_top1)):
        if s != t:
            return i
    return None


async def verify_batch(search: SearchFn, queries: Sequence[str], k: int, retries: int = 2,
                       timeout_s: float | None = 30.0) -> list[list[Hit]]:
    """Top-k of every query in ONE batched search, with retries; RetrievalError on failure.

    A cancellation of the caller (a request's deadline, a client gone) always propagates, even
    when the search completes in the same loop turn: ``asyncio.timeout``, not ``wait_for``, which
    on Python 3.11 returns the result then and swallows the cancellation (the request would run
    on past its deadline; tests/speculation/test_verify.py reproduces it)."""
    last: BaseException | None = None
    for _attempt in range(retries + 1):
        try:
            async with asyncio.timeout(timeout_s or None):
                hits = await search(list(queries), k)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure is retried, then typed
            last = exc
            continue
        if len(hits) != len(queries) or any(not h for h in hits):
            last = RetrievalError(f"knowledge base returned {len(hits)} answers for {len(queries)} queries "
                                  "or an empty hit list")
            continue
        return hits
    raise RetrievalError(f"knowledge base unavailable after {retries + 1} attempts: {last!r}") from last
