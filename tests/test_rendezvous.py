"""Rendezvous: the calls of decoding threads that meet at a lane run as one batch (ralmspec/rendezvous.py)."""

from __future__ import annotations

import threading
import time

import pytest

from ralmspec.rendezvous import Rendezvous
from tests.concurrent import run_together


def test_members_that_all_wait_run_as_one_batch_at_once():
    rv = Rendezvous()
    batches: list[list[int]] = []
    lane = rv.lane(lambda items: batches.append(list(items)) or [x * 10 for x in items], max_items=8, gather_s=30.0)
    entered = threading.Barrier(4)

    def body(i: int) -> int:
        with rv.member():
            entered.wait()  # all four are members before anyone calls
            return lane.call(i)

    t0 = time.perf_counter()
    out = run_together(4, body)
    assert out == [0, 10, 20, 30]
    assert time.perf_counter() - t0 < 10  # nobody waited for gather_s: all members were there
    assert [sorted(b) for b in batches] == [[0, 1, 2, 3]]
    assert lane.stats()["batches_by_size"] == {"4": 1}
    assert rv.members == rv.blocked == 0


def test_a_full_batch_runs_without_waiting_and_the_rest_follows():
    rv = Rendezvous()
    sizes: list[int] = []
    lane = rv.lane(lambda items: sizes.append(len(items)) or list(items), max_items=2, gather_s=30.0)
    entered = threading.Barrier(5)

    def body(i: int) -> int:
        with rv.member():
            entered.wait()
            return lane.call(i)

    assert run_together(5, body) == [0, 1, 2, 3, 4]
    assert sum(sizes) == 5 and max(sizes) <= 2


def test_a_straggler_holds_the_others_up_for_gather_s_only():
    rv = Rendezvous()
    lane = rv.lane(lambda items: list(items), max_items=8, gather_s=0.2)
    release = threading.Event()
    straggler_in = threading.Event()

    def straggler() -> None:
        with rv.member():
            straggler_in.set()
            release.wait(30)  # a member busy elsewhere (prefilling, say)

    t = threading.Thread(target=straggler)
    t.start()
    straggler_in.wait(10)
    try:
        with rv.member():
            t0 = time.perf_counter()
            assert lane.call(7) == 7
            waited = time.perf_counter() - t0
    finally:
        release.set()
        t.join(10)
    assert 0.15 <= waited < 5.0


def test_one_batch_runs_at_a_time_and_a_late_member_falls_into_step():
    """Members alternate between two lanes (a token: step, then search); a member that joins
    late first meets the others at the lane they come to next, after which every batch holds all
    members: no two batches ever overlap (so the groups cannot stay out of phase)."""
    rv = Rendezvous()
    running, overlaps = [0], [0]
    sizes: dict[str, list[int]] = {"a": [], "b": []}

    def runner(name: str):
        def run(items):
            running[0] += 1
            overlaps[0] += running[0] > 1
            time.sleep(0.002)
            sizes[name].append(len(items))
            running[0] -= 1
            return list(items)
        return run

    lane_a, lane_b = rv.lane(runner("a"), max_items=8, gather_s=1.0), rv.lane(runner("b"), max_items=8, gather_s=1.0)

    def body(i: int) -> int:
        if i == 3:
            time.sleep(0.03)  # joins while the others are a few tokens in
        with rv.member():
            for t in range(25 if i == 3 else 40):
                assert lane_a.call(t) == t and lane_b.call(t) == t
        return i

    assert run_together(4, body) == [0, 1, 2, 3]
    assert overlaps[0] == 0
    assert sum(sizes["a"]) == sum(sizes["b"]) == 3 * 40 + 25
    # the late member fell into step with the others: most of its 25 tokens shared every batch
    assert sizes["a"].count(4) >= 20 and sizes["b"].count(4) >= 20, sizes


def test_an_error_item_fails_alone_and_a_raising_batch_fails_every_call():
    rv = Rendezvous()
    lane = rv.lane(lambda items: [ValueError(f"bad {x}") if x < 0 else x for x in items], max_items=8, gather_s=30.0)
    entered = threading.Barrier(3)

    def body(i: int) -> int:
        with rv.member():
            entered.wait()
            return lane.call(-1 if i == 1 else i)

    out = run_together(3, body)
    assert out[0] == 0 and out[2] == 2 and isinstance(out[1], ValueError)

    def broken(items):
        raise RuntimeError("the batch failed")

    lane2 = Rendezvous().lane(broken, max_items=4)
    with pytest.raises(RuntimeError, match="the batch failed"):
        lane2.call(1)
    assert lane2.rv.blocked == 0


def test_bad_lane_settings_are_refused():
    with pytest.raises(ValueError, match="max_items"):
        Rendezvous().lane(lambda items: items, max_items=0)
    with pytest.raises(ValueError, match="gather_s"):
        Rendezvous().lane(lambda items: items, max_items=1, gather_s=-1)
