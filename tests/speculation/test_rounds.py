import pytest

from ralmspec.speculation.rounds import (Action, RoundBook, Status, Step, Verdict, histogram_dict, judge,
                                         judge_each, next_action)
from ralmspec.speculation.stride import StrideScheduler, round_time, seconds_per_step


class Handle:
    def __init__(self):
        self.cancelled = 0

    def cancel(self):
        self.cancelled += 1


def book_with(n_steps: int) -> RoundBook:
    """A verified first step [0, 4) then ``n_steps`` speculated steps of 4 tokens each."""
    book = RoundBook(Step(0, "q0", 10, verified=True, end=4))
    for i in range(n_steps):
        book.add(Step(4 * (i + 1), f"q{i + 1}", 20 + i, verified=False, end=4 * (i + 2)))
    return book


def test_judge_accepts_the_prefix_and_names_the_correction():
    assert judge([1, 2, 3], [1, 2, 3]) == Verdict(3, None)
    assert judge([1, 2, 3], [1, 5, 3]) == Verdict(1, 5)
    assert judge([1, 2, 3], [0, 5, 7]) == Verdict(0, 0)
    assert judge([], []) == Verdict(0, None)
    assert judge([1, 2], [1, 3], same=lambda g, t: abs(g - t) <= 1) == Verdict(2, None)
    with pytest.raises(ValueError):
        judge([1], [1, 2])


def test_judge_each_stops_at_the_first_rejection():
    """A mode's own rule: (keep, truth) pairs, consumed lazily up to the first rejection."""
    seen = []

    def checks(pairs):
        for keep, truth in pairs:
            seen.append(truth)
            yield keep, truth

    assert judge_each(checks([(True, 1), (False, 7), (True, 3)])) == Verdict(1, 7)
    assert seen == [1, 7]  # the third step was never judged
    assert judge_each(checks([(True, 1), (True, 2)])) == Verdict(2, None)
    assert judge_each([]) == Verdict(0, None)


def test_commit_accepts_then_rolls_back_and_cancels_later_rounds():
    book = book_with(5)
    a = book.submit(book.pending()[:3], Handle(), 3, 0.0)
    b = book.submit(book.pending(), Handle(), 3, 0.1)
    assert book.pending() == [] and len(book.inflight) == 2
    book.check()
    with pytest.raises(ValueError):
        book.commit(b, Verdict(2, None))  # strictly in order
    bad = book.commit(a, Verdict(1, 99))
    assert bad is a.steps[1]
    assert [st.start for st in book.steps] == [0, 4]  # rejected step and everything after it gone
    assert all(st.verified for st in book.steps)
    assert b.handle.cancelled == 1 and not book.inflight
    s = book.stats
    assert (s.rounds, s.speculated, s.accepted, s.rollbacks, s.cancelled) == (1, 3, 1, 1, 1)
    assert histogram_dict(s.histogram) == {"1": 1}
    assert book.verified_end(0) == 8
    book.abort()  # idempotent
    assert b.handle.cancelled == 1


def test_commit_all_kept_keeps_later_rounds():
    book = book_with(4)
    a = book.submit(book.pending()[:2], Handle(), 2, 0.0)
    b = book.submit(book.pending(), Handle(), 2, 0.0)
    assert book.commit(a, Verdict(2, None)) is None
    assert list(book.inflight) == [b] and b.handle.cancelled == 0
    assert book.verified_end(0) == 12
    assert book.status(complete=True) is Status.AWAITING_VERIFICATION
    assert book.commit(b, Verdict(2, None)) is None
    assert book.status(complete=True) is Status.FINISHED
    assert book.status(complete=False) is Status.SPECULATING
    assert book.stats.histogram[2] == 2


def test_book_refuses_bad_rounds_and_detects_broken_invariants():
    with pytest.raises(ValueError):
        RoundBook(Step(0, "q", 1, verified=False))
    book = book_with(2)
    with pytest.raises(ValueError):
        book.submit([], Handle(), 1, 0.0)
    with pytest.raises(ValueError):
        book.submit([book.steps[0]], Handle(), 1, 0.0)  # verified
    book.steps[2].verified = True  # verified after an unverified step
    with pytest.raises(AssertionError):
        book.check()


@pytest.mark.parametrize("pending,inflight,stride,complete,max_inflight,eager,expected", [
    (0, 0, 3, False, 2, False, Action.STEP),
    (2, 0, 3, False, 2, False, Action.STEP),  # not enough for a round yet
    (3, 0, 3, False, 2, False, Action.SUBMIT),
    (3, 2, 3, False, 2, False, Action.WAIT),  # pipeline full
    (2, 0, 3, True, 2, False, Action.SUBMIT),  # the end flushes
    (0, 1, 3, True, 2, False, Action.WAIT),
    (0, 0, 3, True, 2, False, Action.FINISH),
    (0, 1, 0, False, 2, False, Action.WAIT),  # fallback: settle before a verified step
    (0, 0, 0, False, 2, False, Action.STEP),
    (1, 0, 0, False, 1, False, Action.SUBMIT),
    (1, 0, 5, False, 2, True, Action.SUBMIT),  # eager: the verifier is idle
    (1, 1, 5, False, 2, True, Action.STEP),  # eager, but a round runs: keep speculating
    (5, 1, 5, False, 2, True, Action.SUBMIT),
])
def test_next_action(pending, inflight, stride, complete, max_inflight, eager, expected):
    assert next_action(pending, inflight, stride, complete, max_inflight, eager) is expected


def test_beside_encodings_pipeline_with_the_chunks_not_the_search():
    """Guessers that encode beside (``encodes_beside``): the worker encodes each step's query while
    the LM produces its chunk, and the searches run on the knowledge base's thread. An encoding
    faster than a chunk costs nothing; a slower one sets the round's pace; it is never added to
    the search (b(s) = search(s) either way)."""
    beside = StrideScheduler(encodes_beside=True)
    critical = StrideScheduler(encodes_beside=False)  # ``exact``: the encoding is part of a
    for sch in (beside, critical):
        sch.observe_search(1, 0.10)
        sch.observe_search(8, 0.24)
        sch.observe_encode(0.015, beside=True)
        sch.observe_step(0.03)
        for _ in range(5):
            sch.observe_round(4, 4)
    assert critical.encode_cost() == 0.0 and beside.encode_cost() == pytest.approx(0.015)
    assert beside.search_cost(4) == critical.search_cost(4) == pytest.approx(0.10 + 0.02 * 3)
    assert beside.next_stride() == critical.next_stride()  # 15 ms of encoding hides behind 30 ms chunks
    assert round_time(0.03, 0.16, 1.0, 4, async_verify=False, e=0.015) == pytest.approx(4 * 0.03 + 0.16)
    assert round_time(0.03, 0.16, 1.0, 4, async_verify=False, e=0.05) == pytest.approx(4 * 0.05 + 0.16)
    # asynchronous, every round kept: the slowest of the three pipelines sets the pace
    assert round_time(0.03, 0.16, 1.0, 4, async_verify=True, e=0.05) == pytest.approx(0.20)
    assert round_time(0.03, 0.16, 1.0, 4, async_verify=True, e=0.02) == pytest.approx(0.16)
    for _ in range(5):
        beside.observe_encode(0.5, beside=True)  # the worker is the bottleneck now
    assert beside.encode_cost() == pytest.approx(0.5)
    sched_cost = seconds_per_step(0.03, beside.search_cost(4), 0.9, 4, False, e=beside.encode_cost())
    assert sched_cost > seconds_per_step(0.03, critical.search_cost(4), 0.9, 4, False)


def test_encode_cost_is_a_probe_encoding_until_one_was_measured_beside():
    sch = StrideScheduler(encodes_beside=True)
    assert sch.encode_cost() == 0.0
    sch.observe_encode(0.015)  # a fallback step's probe, on the critical path
    assert sch.encode_cost() == pytest.approx(0.015)
    sch.observe_encode(0.028, beside=True)  # beside the LM: contended, and what a round pays
    assert sch.encode_cost() == pytest.approx(0.028)
    costs = sch.costs()
    fresh = StrideScheduler(encodes_beside=True)
    fresh.seed_costs(costs)
    assert fresh.encode_cost() == pytest.approx(0.028)


def test_verified_prefix_is_tracked_through_commits_and_rollbacks():
    """``n_verified`` (what pending/all_verified read instead of scanning every step) follows
    adds, accepted prefixes, rollbacks and verified steps after them; ``check`` agrees."""
    book = RoundBook(Step(0, None, 1, verified=True, end=1))
    for i in range(1, 5):
        book.add(Step(i, None, 1, verified=False, end=i + 1))
    assert book.n_verified == 1 and not book.all_verified() and len(book.pending()) == 4
    a = book.submit(book.pending()[:2], Handle(), 2, 0.0)
    b = book.submit(book.pending(), Handle(), 2, 0.0)
    with pytest.raises(ValueError):
        book.commit(a, Verdict(3, None))  # more accepted steps than the round holds
    assert book.commit(a, Verdict(2, None)) is None
    assert book.n_verified == 3 and book.pending() == []
    book.check()
    bad = book.commit(b, Verdict(1, 9))
    assert bad.start == 4 and book.n_verified == 4 and book.all_verified()
    book.add(Step(4, None, 9, verified=True, end=5))  # the correction
    book.add(Step(5, None, 2, verified=False, end=6))
    assert book.n_verified == 5 and [st.start for st in book.pending()] == [5]
    assert book.verified_end(0) == 5
    book.check()
    book.n_verified = 2
    with pytest.raises(AssertionError):
        book.check()


def test_verified_end_and_verified_from_read_only_the_tail():
    """What a stream is sent: the verified steps from a position on, and where the verified
    output ends, with the step being produced (verified, unfinished) left out; both agree with
    a scan of every step, through commits and a rollback."""
    def scan(book, start):
        end, steps = 0, []
        for st in book.steps:
            if not st.verified or st.end is None:
                break
            end = st.end
            if st.start >= start:
                steps.append(st)
        return end, steps

    book = RoundBook(Step(0, None, 1, verified=True))  # the first step, being produced
    assert book.verified_end(-1) == -1 and book.verified_from(0) == []
    book.steps[0].end = 4
    for i in range(1, 6):
        book.add(Step(4 * i, None, 1, verified=False, end=4 * i + 4))
    rnd = book.submit(book.pending()[:4], Handle(), 4, 0.0)
    for start in (0, 4, 5, 8, 24):
        assert (book.verified_end(0), book.verified_from(start)) == scan(book, start)
    bad = book.commit(rnd, Verdict(2, 7))
    book.add(Step(bad.start, None, 7, verified=True))  # the correction, being produced
    book.check()
    for start in (0, 4, 8, 12, 13):
        assert (book.verified_end(0), book.verified_from(start)) == scan(book, start)
    assert [st.start for st in book.verified_from(4)] == [4, 8]
    book.steps[1].end = None  # an unfinished step before the last one
    with pytest.raises(AssertionError, match="only the last step"):
        book.check()
