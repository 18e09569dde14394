import asyncio

import pytest

from ralmspec.errors import RetrievalError
from ralmspec.retrieval.base import Hit
from ralmspec.speculation.verify import first_mismatch, verify_batch


def test_first_mismatch_rule():
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert first_mismatch([1, 2, 3], [0, 5, 7]) == 0
    assert first_mismatch([], []) is None
    with pytest.raises(ValueError):
        first_mismatch([1], [1, 2])


def test_verify_batch_retries_then_succeeds():
    calls = []

    async def flaky(queries, k):
        calls.append(list(queries))
        if len(calls) < 2:
            raise ConnectionError("boom")
        return [[Hit(7, 1.0)] for _ in queries]

    hits = asyncio.run(verify_batch(flaky, ["a", "b"], 1, retries=2))
    assert [h[0].doc_id for h in hits] == [7, 7]
    assert calls == [["a", "b"], ["a", "b"]]  # one batched call per attempt


def test_verify_batch_gives_typed_error_when_kb_stays_down():
    async def down(queries, k):
        raise ConnectionError("refused")

    with pytest.raises(RetrievalError, match="unavailable after 3 attempts"):
        asyncio.run(verify_batch(down, ["a"], 1, retries=2))


def test_verify_batch_rejects_short_or_empty_answers():
    async def short(queries, k):
        return [[]]

    with pytest.raises(RetrievalError):
        asyncio.run(verify_batch(short, ["a"], 1, retries=0))


def test_verify_batch_timeout_is_an_error():
    async def slow(queries, k):
        await asyncio.sleep(5)

    with pytest.raises(RetrievalError):
        asyncio.run(verify_batch(slow, ["a"], 1, retries=0, timeout_s=0.05))


def test_a_cancelled_verification_stays_cancelled_when_its_search_completes_in_the_same_turn():
    """A request's deadline (or a client gone) cancels the verification while the search result
    arrives in the same loop turn: the cancellation must propagate, not the result (on Python
    3.11 ``asyncio.wait_for`` returned the result and swallowed it, so a request ran on past its
    deadline and answered 200: the flaky ``test_request_deadline_is_504``)."""
    async def main():
        fut = asyncio.get_running_loop().create_future()

        async def search(queries, k):
            return await fut

        task = asyncio.ensure_future(verify_batch(search, ["q"], 1, retries=0, timeout_s=30))
        for _ in range(3):
            await asyncio.sleep(0)  # the verification is now waiting for the search
        fut.set_result([[Hit(1, 1.0)]])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
