"""The load governor's policy (engine/governor.py): pure, driven by an explicit clock."""

from __future__ import annotations

import pytest

from ralmspec.engine.governor import BatchCostFit, BusyWindow, GovernorConfig, LoadGovernor
from ralmspec.errors import ConfigError


def test_busy_window_counts_only_the_window_and_the_running_call():
    w = BusyWindow(window_s=2.0, t0=0.0)
    assert w.fraction(0.0) == 0.0
    w.start(0.0)
    w.stop(1.0)
    assert w.fraction(1.0) == pytest.approx(1.0)  # young window: divided by the 1 s it has existed
    assert w.fraction(2.0) == pytest.approx(0.5)
    assert w.fraction(2.5) == pytest.approx(0.25)  # [0.5, 2.5]: 0.5 s of the call
    assert w.fraction(3.5) == 0.0  # the call left the window (and was dropped)
    w.start(3.0)
    assert w.fraction(4.0) == pytest.approx(0.5)  # a call still running counts up to now
    w.stop(4.5)
    w.start(4.5)
    assert w.fraction(5.0) == pytest.approx(1.0)


def test_busy_window_keeps_only_the_window_when_fraction_is_never_asked():
    """A server whose requests never speculate (or with the governor off) records every LM and
    knowledge-base call but never asks ``fraction``: the intervals out of the window go anyway."""
    w = BusyWindow(window_s=1.0, t0=0.0)
    for i in range(10_000):  # a call every 10 ms, 5 ms long: 100 s of serving
        w.start(i * 0.01)
        w.stop(i * 0.01 + 0.005)
    assert len(w._done) <= 101  # the last second's calls, not 10,000
    assert w.fraction(100.0) == pytest.approx(0.5)


def _governor(**kw) -> tuple[LoadGovernor, BusyWindow]:
    w = BusyWindow(window_s=1.0, t0=0.0)
    return LoadGovernor(GovernorConfig(window_s=1.0, **kw), w), w


def test_pauses_when_the_lm_is_saturated_by_several_requests_and_resumes_with_hysteresis():
    g, w = _governor(pause_at=0.8, resume_at=0.5)
    w.start(0.0)
    w.stop(1.0)
    assert g.allows_speculation(1.0, active=8) is False and g.pauses == 1
    w.start(1.0)
    w.stop(1.7)  # 70% busy: between the thresholds, still paused (hysteresis)
    assert g.allows_speculation(2.0, active=8) is False
    w.start(2.0)
    w.stop(2.4)  # 40% busy: resumes
    assert g.allows_speculation(3.0, active=8) is True
    assert g.stats(3.0)["paused_s"] == pytest.approx(2.0)
    w.start(3.0)
    w.stop(3.75)  # 75%: not enough to pause again
    assert g.allows_speculation(3.75, active=8) is True and g.pauses == 1


def test_a_lone_request_is_never_paused_and_a_paused_server_resumes_when_load_drops():
    g, w = _governor(pause_at=0.8, resume_at=0.5, min_active=2)
    w.start(0.0)
    w.stop(1.0)
    assert g.allows_speculation(1.0, active=1) is True  # nobody else could use the LM: OS^3 decides
    assert g.allows_speculation(1.0, active=2) is False
    assert g.allows_speculation(1.0, active=1) is True  # back to one request: resumes at once


def test_a_pause_ends_when_the_requests_that_loaded_the_lm_end():
    """The last speculative request may ask while others still run and then end: the requests
    ending (``request_ended``) take the server below ``min_active``, which ends the pause then,
    not at the next speculative request's ask, maybe minutes later, with ``paused`` true and the
    idle seconds counted as paused by load meanwhile."""
    g, w = _governor(pause_at=0.8, resume_at=0.5, min_active=2)
    w.start(0.0)
    w.stop(1.0)
    assert g.allows_speculation(1.0, active=3) is False
    g.request_ended(2.0, active=2)  # still loaded: still paused
    assert g.stats(2.0)["paused"] is True
    g.request_ended(3.0, active=1)
    assert g.stats(60.0)["paused"] is False and g.stats(60.0)["paused_s"] == pytest.approx(2.0)


def test_disabled_governor_always_allows():
    g, w = _governor(enabled=False)
    w.start(0.0)
    w.stop(1.0)
    assert g.allows_speculation(1.0, active=64) is True and g.pauses == 0


@pytest.mark.parametrize("kw", [{"window_s": 0}, {"pause_at": 0.5, "resume_at": 0.6}, {"pause_at": 1.5},
                                {"resume_at": 0.0}, {"min_active": 0}, {"kb_bottleneck_at": 1.5},
                                {"kb_fixed_share_at": -0.1}])
def test_bad_governor_config_is_refused(kw):
    with pytest.raises(ConfigError):
        GovernorConfig(**kw)


def test_busy_window_nests_overlapping_calls():
    w = BusyWindow(window_s=2.0, t0=0.0)
    w.start(0.0)
    w.start(0.5)  # a second call while the first runs (search concurrency > 1)
    w.stop(1.0)
    assert w.fraction(1.5) == pytest.approx(1.0)  # still busy: one call remains
    w.stop(1.5)
    assert w.fraction(2.0) == pytest.approx(0.75)
    w.stop(2.0)  # an unmatched stop is ignored
    assert w.fraction(2.0) == pytest.approx(0.75)


def _fit(fixed: float, per_query: float, sizes=(1, 2, 4, 8, 3, 5, 7, 6)) -> BatchCostFit:
    fit = BatchCostFit()
    for q in sizes:
        fit.observe(q, fixed + per_query * q)
    return fit


def test_batch_cost_fit_separates_fixed_and_per_query_cost():
    assert BatchCostFit().fixed_share() is None  # nothing seen
    assert _fit(0.2, 0.01, sizes=(4,) * 8).fixed_share() is None  # one size: cannot separate
    assert _fit(0.2, 0.01, sizes=(1, 2, 4)).fixed_share() is None  # too few calls
    mean_q = sum((1, 2, 4, 8, 3, 5, 7, 6)) / 8
    assert _fit(0.2, 0.01).fixed_share() == pytest.approx(0.2 / (0.2 + 0.01 * mean_q))  # a large scan
    assert _fit(0.001, 0.008).fixed_share() < 0.05  # per-query encodings dominate
    noisy = BatchCostFit()
    for q, t in ((1, 0.3), (2, 0.1), (3, 0.3), (4, 0.1), (5, 0.3), (6, 0.1), (7, 0.3), (8, 0.05)):
        noisy.observe(q, t)  # cost falling with size: slope clamped at 0, all fixed
    assert noisy.fixed_share() == pytest.approx(1.0)


def _lm_and_kb_busy_for_1s(fit: BatchCostFit) -> tuple[LoadGovernor, BusyWindow, BusyWindow]:
    lm, kb = BusyWindow(1.0, 0.0), BusyWindow(1.0, 0.0)
    g = LoadGovernor(GovernorConfig(window_s=1.0, pause_at=0.8, resume_at=0.5), lm, kb, fit)
    for w in (lm, kb):
        w.start(0.0)
        w.stop(1.0)
    return g, lm, kb


def test_a_busy_knowledge_base_whose_calls_batching_does_not_amortize_lets_the_pause_stand():
    """The small real KB: its calls are query encodings, per query; more queries per call (what
    speculation brings) do not relieve it, so a busy KB does not end a pause."""
    g, lm, kb = _lm_and_kb_busy_for_1s(_fit(0.001, 0.008))
    assert g.allows_speculation(1.0, active=8) is False
    assert g.stats(1.0)["kb_fixed_share"] < 0.05
    no_fit = LoadGovernor(GovernorConfig(window_s=1.0, pause_at=0.8, resume_at=0.5), lm, kb, BatchCostFit())
    assert no_fit.allows_speculation(1.0, active=8) is False  # unknown: the LM rule alone


def test_a_saturated_knowledge_base_keeps_speculation_on():
    """Retrieval as the bottleneck: speculation's larger verification batches are the gain."""
    g, lm, kb = _lm_and_kb_busy_for_1s(_fit(0.2, 0.01))
    assert g.allows_speculation(1.0, active=8) is True
    lm.start(1.0)
    lm.stop(2.0)
    kb.start(1.0)
    kb.stop(1.5)  # the KB has room again while the LM stays saturated: pause
    assert g.allows_speculation(2.0, active=8) is False
    assert g.stats(2.0)["kb_busy_fraction"] == pytest.approx(0.5)
    for w in (lm, kb):
        w.start(2.0)
        w.stop(3.0)  # the KB saturates: the pause ends although the LM is still busy
    assert g.allows_speculation(3.0, active=8) is True
