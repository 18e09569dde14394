"""The identity helper (tests/identity.py) and the CI flag of the real-model fixture: both must be
able to fail, or the identity tests and the CI gate built on them prove nothing."""

from __future__ import annotations

import pytest

from ralmspec.knnlm.speculative import SpeculativeStats
from tests.conftest import REQUIRE_SMOLLM2_ENV, skip_unless_required
from tests.identity import COUNT_ENV, RECORDED, SpeculationCheck, summary_lines, tally_of


@pytest.fixture(autouse=True)
def not_counted(monkeypatch):
    """These checks are made up: keep them out of the session's speculation table."""
    monkeypatch.delenv(COUNT_ENV, raising=False)


def test_tokens_that_differ_fail_the_check():
    with pytest.raises(AssertionError, match="speculative != naive at 'case 3'"):
        SpeculationCheck().same([1, 2, 3], [1, 2, 4], {"speculated": 2}, where="case 3")


def test_a_run_that_never_speculated_fails_the_check():
    check = SpeculationCheck()
    check.same([1, 2], [1, 2], {"speculated": 0, "accepted": 0, "rollbacks": 0, "naive_steps": 6})
    with pytest.raises(AssertionError, match=r"only 0 speculated steps .*\(1 speculated nothing, 6 verified steps\)"):
        check.ran()
    with pytest.raises(AssertionError, match="must say why"):
        check.ran(min_speculated=0)
    assert check.ran(min_speculated=0, why="OS^3 falls back on a cheap knowledge base").verified_steps == 6


def test_rollbacks_are_required_where_asked():
    check = SpeculationCheck()
    check.same("ab", "ab", {"speculated": 5, "accepted": 5, "rollbacks": 0})
    assert check.ran(min_speculated=5).speculated == 5
    with pytest.raises(AssertionError, match="only 0 rollbacks"):
        check.ran(min_rollbacks=1)


def test_counters_come_from_every_shape_of_stats():
    engine = {"speculated": 7, "accepted": 4, "rollbacks": 2, "naive_steps": 1, "paused_steps": 3}
    server_json = dict(engine)  # the server's ralm.stats is the engine's dict as JSON
    knn = SpeculativeStats(speculated=7, accepted=4, rollbacks=2, naive_steps=4)
    for stats in (engine, server_json, knn):
        t = tally_of(stats)
        assert (t.runs, t.speculative_runs, t.silent_runs, t.speculated, t.accepted, t.rollbacks,
                t.verified_steps) == (1, 1, 0, 7, 4, 2, 4)
    naive = tally_of({"steps": 6, "retrieval_s": 0.1})  # a naive request's stats: no speculation counters
    assert (naive.runs, naive.speculative_runs, naive.speculated) == (1, 0, 0)


def test_impossible_bookkeeping_fails():
    check = SpeculationCheck()
    check.same([1], [1], {"speculated": 2, "accepted": 2, "rollbacks": 1})
    with pytest.raises(AssertionError):
        check.ran()


def test_counts_are_recorded_per_test_when_asked(monkeypatch):
    monkeypatch.setenv(COUNT_ENV, "1")
    monkeypatch.setattr("tests.identity.RECORDED", {})
    from tests import identity

    SpeculationCheck().same([1], [1], {"speculated": 3, "accepted": 3, "rollbacks": 0})
    SpeculationCheck().same([2], [2], {"speculated": 1, "accepted": 0, "rollbacks": 1})
    (test_id, tally), = identity.RECORDED.items()
    assert test_id.endswith("::test_counts_are_recorded_per_test_when_asked")
    assert (tally.runs, tally.speculated, tally.rollbacks) == (2, 4, 1)
    assert any(line.startswith(test_id) for line in summary_lines())
    assert RECORDED is not identity.RECORDED  # the session's own records were left alone


def test_smollm2_fixture_skips_locally_and_fails_when_required(monkeypatch):
    monkeypatch.delenv(REQUIRE_SMOLLM2_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="offline"):
        skip_unless_required("offline")
    monkeypatch.setenv(REQUIRE_SMOLLM2_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"offline .*{REQUIRE_SMOLLM2_ENV}=1"):
        skip_unless_required("offline")
