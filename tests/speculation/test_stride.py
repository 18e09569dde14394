"""OS^3 against hand-computed cases (docs/design.md §4)."""

import math

import pytest

from ralmspec.speculation.stride import (
    GUARD_HOLD, GUARD_STEPS, OVERLAP_REFRESH_ROUNDS, PRIOR_ROUNDS, SAMPLES, SEARCH_REFRESH_STEPS, StrideDecision, StrideScheduler, best_stride, expected_verified_chunks, fit_line,
    median, round_time, seconds_per_step,
)


def test_expected_chunks_closed_form():
    assert expected_verified_chunks(0.6, 1) == pytest.approx(1.0)
    assert expected_verified_chunks(0.6, 3) == pytest.approx(1 + 0.6 + 0.36)
    assert expected_verified_chunks(1.0, 5) == 5.0
    assert expected_verified_chunks(0.0, 4) == pytest.approx(1.0)


def test_round_time_sync_and_async():
    assert round_time(1, 40, 0.6, 6, async_verify=False) == 46
    # async, s=2: γ^2·max(s a, b) + (1-γ^2)(s a + b): a kept round ran beside the next one
    expect = 0.25 * max(2 * 2, 3) + 0.75 * (2 * 2 + 3)
    assert round_time(2, 3, 0.5, 2, async_verify=True) == pytest.approx(expect)
    # verification longer than the next round's steps: a kept round costs b alone
    assert round_time(1, 10, 1.0, 3, async_verify=True) == pytest.approx(10)
    # stride 1: the same as the paper's asynchronous round, γ·max(a, b) + (1-γ)(a + b)
    assert round_time(1, 10, 0.5, 1, async_verify=True) == pytest.approx(0.5 * 10 + 0.5 * 11)


def test_design_check_sync_a1_b40_gamma06_gives_6():
    # hand computation: f(s) = (1-0.6^s)/0.4/(s+40): s=5 0.05124, s=6 0.05181, s=7 0.05170
    assert best_stride(1.0, lambda s: 40.0, 0.6, async_verify=False, s_max=16) == 6


def test_async_with_cheap_verification_prefers_stride_1():
    for gamma in (0.1, 0.3, 0.6):
        assert best_stride(1.0, lambda s: 0.5, gamma, async_verify=True, s_max=16) == 1


def test_s_max_bounds_the_stride():
    assert best_stride(1.0, lambda s: 1000.0, 0.6, async_verify=False, s_max=4) == 4


def test_gamma_estimate_window_and_cap():
    sch = StrideScheduler(os3=True, window=2, gamma_max=0.6)
    assert sch.gamma() is None
    sch.observe_round(speculated=4, matched=4)  # no mismatch
    assert sch.gamma() == pytest.approx(0.6)  # 4/4 capped at 0.6
    sch.observe_round(speculated=4, matched=1)  # mismatch: (4+1)/(5+1)
    assert sch.gamma() == pytest.approx(min(0.6, 5 / 6))
    sch.observe_round(speculated=3, matched=0)  # window 2 drops the first round: 1/(1+2)
    assert sch.gamma() == pytest.approx(1 / 3)


def test_scheduler_starts_at_1_and_follows_measurements():
    sch = StrideScheduler(os3=True, async_verify=False, gamma_max=0.6)
    assert sch.next_stride() == 1
    sch.observe_step(1.0)
    sch.observe_verification(1, 40.0)
    sch.observe_round(1, 1)
    assert sch.next_stride() == 6  # γ capped at 0.6, a=1, b=40 -> 6 (the check in docs/design.md §4)


def test_fixed_mode_ignores_measurements():
    sch = StrideScheduler(os3=False, fixed_stride=3)
    sch.observe_step(1.0)
    sch.observe_verification(1, 1000.0)
    sch.observe_round(5, 5)
    assert sch.next_stride() == 3


def test_search_cost_model_is_linear_in_batch_size():
    sch = StrideScheduler()
    sch.observe_verification(1, 11.0)
    sch.observe_verification(8, 46.0)
    assert sch.search_cost(1) == pytest.approx(11.0)
    assert sch.search_cost(8) == pytest.approx(46.0)
    assert sch.search_cost(4) == pytest.approx(11.0 + 5.0 * 3)
    assert not math.isnan(sch.search_cost(16))


def test_one_query_is_its_own_point_once_two_batch_sizes_were_measured():
    """1M flat, one thread (seconds, measured 2026-12-05): FAISS's 1-query scan is not on the
    batches' line; through it the line was ~2x too steep."""
    sch = StrideScheduler()
    sch.observe_search(1, 0.128)
    sch.observe_search(2, 0.204)
    assert sch.search_cost(2) == pytest.approx(0.204)  # one batch size: the line through both
    assert sch.search_cost(3) == pytest.approx(0.204)  # (flat beyond the largest size measured)
    sch.observe_search(4, 0.226)
    sch.observe_search(8, 0.380)
    assert sch.search_cost(1) == pytest.approx(0.128)
    batches = [(2, 0.204), (4, 0.226), (8, 0.380)]
    mx, my = 14 / 3, sum(y for _, y in batches) / 3
    slope = sum((x - mx) * (y - my) for x, y in batches) / sum((x - mx) ** 2 for x, _ in batches)
    assert sch.search_cost(6) == pytest.approx(my + slope * (6 - mx))
    assert slope < (0.380 - 0.128) / 7 * 0.9  # flatter than the line from one query


def test_whether_to_speculate_is_judged_at_the_measured_gamma():
    """gamma_max hedges the stride's length, not whether speculating pays: every round matched
    (γ = 1 measured, 0.9 capped), and at the cap the best round looks slower than a naive step
    (seconds of the tiny model + EMULATED 1M scale, one thread)."""
    def scheduler(gamma_max: float) -> StrideScheduler:
        sch = StrideScheduler(os3=True, async_verify=True, gamma_max=gamma_max, naive_fallback=True,
                              encodes_beside=True)
        sch.observe_step(0.051)
        sch.observe_lm(0.031)
        sch.observe_encode(0.082)
        sch.observe_retrieval(0.09)  # a naive step: 0.031 + 0.09
        for size, sec in ((1, 0.11), (2, 0.191), (4, 0.239)):
            sch.observe_search(size, sec)
        sch.observe_search(2, 0.317, overlapped=True)
        sch.observe_step(0.089, overlapped=True)
        for _ in range(3):
            sch.observe_round(3, 3)
        return sch

    sch = scheduler(0.9)
    assert sch.gamma() == 0.9 and sch.gamma(capped=False) == 1.0
    d = sch.decide()
    assert d.stride > 0
    b, e = sch.search_cost(d.stride, d.overlap), sch.encode_cost()
    a = sch.overlapped_step_cost() if d.overlap else sch.step_cost()
    naive = sch.naive_step_cost()
    assert seconds_per_step(a, b, 1.0, d.stride, d.overlap, e=e) < naive
    assert seconds_per_step(a, b, 0.9, d.stride, d.overlap, e=e) >= naive  # the cap would fall back
    for _ in range(5):  # the guesses turn bad: the measured γ falls and naive steps win
        sch.observe_round(3, 0)
        sch.observe_round(3, 0, overlapped=True)
    assert sch.decide().stride == 0


def test_a_batch_larger_than_any_measured_is_priced_at_the_largest_until_measured():
    """The 2026-12-05 case (1M flat, one thread; seconds): sizes 1-3 measured on a steep line
    (a 1-query FAISS scan vs a batch sharing one pass over the index). Extrapolated, 8 queries
    cost ~0.6 s and OS^3 stayed at stride 2-3; priced at the largest measured size, a larger
    stride is tried, measured, and then fitted."""
    sch = StrideScheduler(os3=True, async_verify=True, gamma_max=0.9, encodes_beside=True)
    sch.observe_step(0.025)
    sch.observe_encode(0.02)
    for size, sec in ((1, 0.128), (2, 0.204), (3, 0.271)):
        sch.observe_search(size, sec)
    sch.observe_round(3, 3)
    assert sch.search_cost(5) == sch.search_cost(3) == pytest.approx(0.271, rel=0.05)
    tried = sch.decide().stride
    assert tried > 3
    sch.observe_search(tried, 0.38)  # measured: the batch shares one pass
    fitted = sch.search_cost(tried)
    assert fitted == pytest.approx(0.38, rel=0.1) and fitted < 0.128 + (tried - 1) * 0.0715  # the old line
    assert sch.search_cost(tried + 4) == sch.search_cost(tried)


def test_cheap_retrieval_keeps_stride_small_sync():
    # retrieval 1% of a step: speculation can barely help; OS^3 must not pick a big stride.
    sch = StrideScheduler(os3=True, async_verify=False)
    sch.observe_step(1.0)
    sch.observe_verification(1, 0.01)
    sch.observe_round(1, 0)
    assert sch.next_stride() == 1


def test_seconds_per_step_charges_the_regenerated_chunk():
    # sync, s=2, γ=0.5, a=1, b=0.5: round 2.5 + (1-0.25)*1 regen = 3.25 over 1.5 chunks
    assert seconds_per_step(1.0, 0.5, 0.5, 2, async_verify=False) == pytest.approx(3.25 / 1.5)
    assert seconds_per_step(1.0, 0.5, 0.5, 2, async_verify=False, regen=False) == pytest.approx(2.5 / 1.5)


def _observed(naive_fallback: bool, lm: float, lookup: float, r: float, b1: float, matched: int,
              async_verify: bool = False):
    sch = StrideScheduler(os3=True, async_verify=async_verify, naive_fallback=naive_fallback)
    sch.observe_lm(lm)
    sch.observe_step(lm + lookup)
    sch.observe_retrieval(r)
    sch.observe_verification(1, b1)
    sch.observe_round(1, matched)
    return sch


def test_fallback_when_retrieval_is_cheap():
    # retrieval = query encoding (0.025) + search (0.001): speculation still pays the encoding,
    # so it can only lose (s=1, γ=0.9: 0.125 + 0.001 + 0.1*0.125 = 0.139 > naive 0.126)
    sch = _observed(True, lm=0.1, lookup=0.025, r=0.026, b1=0.001, matched=1)
    assert sch.next_stride() == 0
    assert sch.naive_step_cost() == pytest.approx(0.126)
    # without the fallback switch OS^3 keeps speculating at stride 1
    assert _observed(False, lm=0.1, lookup=0.025, r=0.026, b1=0.001, matched=1).next_stride() == 1


def test_no_fallback_when_retrieval_dominates():
    # the search costs 4 LM steps: the best stride beats naive 0.525 s/step
    sch = _observed(True, lm=0.1, lookup=0.025, r=0.5, b1=0.4, matched=1)  # γ = cap 0.9
    s = sch.next_stride()
    assert s >= 2
    assert seconds_per_step(0.125, 0.4, 0.9, s, async_verify=False) < 0.525


def test_fallback_needs_a_measured_retrieval():
    sch = StrideScheduler(os3=True, naive_fallback=True)
    sch.observe_step(1.0)
    sch.observe_verification(1, 0.001)
    sch.observe_round(1, 0)
    assert sch.next_stride() == 1  # no observe_retrieval yet: no naive cost to compare with


def test_fallback_scheduler_takes_verified_steps_until_it_has_estimates():
    sch = StrideScheduler(os3=True, naive_fallback=True)
    assert sch.next_stride() == 0  # verified steps measure a, b(1) and γ first
    sch.observe_lm(0.1)
    sch.observe_step(0.12)
    sch.observe_retrieval(2.0)
    sch.observe_verification(1, 1.98)
    assert sch.next_stride() == 0  # still no γ
    sch.observe_round(1, 1)
    assert sch.next_stride() >= 1  # search costs 20 LM steps: speculate


# ----------------------------------------------------------------------------- contention (async)

def _async_sched(**kw):
    sch = StrideScheduler(os3=True, async_verify=True, gamma_max=0.9, naive_fallback=False, **kw)
    sch.observe_step(1.0)
    sch.observe_search(1, 4.0)
    sch.observe_round(4, 4)
    return sch


def test_async_overlaps_when_contention_is_unknown():
    # no cost measured under contention yet: the overlapped costs equal the alone ones, and
    # hiding verification behind decoding is then never slower than waiting for it
    d = _async_sched().decide()
    assert d.overlap is True and d.stride >= 1


def test_async_waits_when_contention_makes_overlap_slower():
    sch = _async_sched()
    # measured beside decoding: the search takes 3x longer and the step 2.5x (2 busy cores)
    sch.observe_step(2.5, overlapped=True)
    sch.observe_search(1, 12.0, overlapped=True)
    sch.observe_round(4, 4, overlapped=True)
    d = sch.decide()
    g = sch.gamma()
    sync_cost = seconds_per_step(1.0, sch.search_cost(d.stride), g, d.stride, False, regen=True)
    assert d.overlap is False
    # the synchronous plan it chose is the best synchronous stride
    assert d.stride == best_stride(1.0, lambda k: sch.search_cost(k), g, False, sch.s_max)
    ov_s = best_stride(2.5, lambda k: sch.search_cost(k, overlapped=True), sch.gamma(True), True, sch.s_max)
    ov_cost = seconds_per_step(2.5, sch.search_cost(ov_s, overlapped=True), sch.gamma(True), ov_s,
                               True, regen=True)
    assert sync_cost < ov_cost


def test_async_overlaps_when_contention_is_mild():
    sch = _async_sched()
    # 2% slower beside each other: hiding one step of each round still pays
    sch.observe_step(1.02, overlapped=True)
    sch.observe_search(1, 4.08, overlapped=True)
    sch.observe_round(4, 4, overlapped=True)
    assert sch.decide().overlap is True


def test_sync_mode_never_overlaps():
    sch = StrideScheduler(os3=True, async_verify=False, naive_fallback=False)
    sch.observe_step(1.0)
    sch.observe_search(1, 4.0)
    sch.observe_round(4, 4)
    assert sch.decide().overlap is False
    assert StrideScheduler(os3=False, async_verify=False).decide().overlap is False
    assert StrideScheduler(os3=False, async_verify=True).decide().overlap is True


def test_gamma_is_estimated_apart_for_overlapped_rounds():
    sch = StrideScheduler(os3=True, window=5, gamma_max=1.0)
    sch.observe_round(4, 4)  # synchronous: all accepted
    assert sch.gamma() == 1.0 and sch.gamma(True) == 1.0  # overlapped falls back to sync
    sch.observe_round(4, 1, overlapped=True)  # overlapped: 1 matched, then a mismatch
    assert sch.gamma() == 1.0
    assert sch.gamma(True) == pytest.approx(1 / 2)
    only_ov = StrideScheduler(os3=True, gamma_max=1.0)
    only_ov.observe_round(3, 3, overlapped=True)
    assert only_ov.gamma() == 1.0  # sync falls back to the overlapped rounds


def test_search_cost_under_contention_falls_back_to_alone():
    sch = StrideScheduler()
    sch.observe_search(1, 10.0)
    sch.observe_search(4, 16.0)
    assert sch.search_cost(2, overlapped=True) == pytest.approx(sch.search_cost(2))
    sch.observe_search(2, 30.0, overlapped=True)
    assert sch.search_cost(2, overlapped=True) == pytest.approx(30.0)
    assert sch.search_cost(2) == pytest.approx(12.0)
    # κ = 30 / 12 = 2.5: every size beside decoding is the alone line times κ
    assert sch.search_cost(4, overlapped=True) == pytest.approx(2.5 * 16.0)
    assert sch.search_cost(1, overlapped=True) == pytest.approx(2.5 * 10.0)


def test_search_cost_beside_decoding_without_alone_searches_uses_its_own_line():
    sch = StrideScheduler()
    sch.observe_search(3, 9.0, overlapped=True)
    assert sch.search_cost(3, overlapped=True) == pytest.approx(9.0)
    assert sch.search_cost(3) is None


def test_latencies_are_medians_of_the_last_samples():
    sch = StrideScheduler()
    for x in (1.0, 1.1, 9.0, 0.9, 1.05):  # one slow outlier
        sch.observe_step(x)
        sch.observe_search(1, 10 * x)
    assert sch.step_cost() == pytest.approx(1.05)
    assert sch.search_cost(1) == pytest.approx(10.5)
    for _ in range(SAMPLES):  # the machine got slower: the old samples age out
        sch.observe_step(2.0)
    assert sch.step_cost() == pytest.approx(2.0)
    assert median([]) is None and median([3.0, 1.0]) == pytest.approx(2.0)


def test_one_overlapped_search_scales_every_batch_size():
    """The case measured on the 2-core VM (2026-12-05, tiny, EMULATED 1M, oracle guesses): the
    only search seen beside decoding was one of 5 queries, at about the alone cost; read as a
    constant it priced every overlapped round like a 5-query search and kept OS^3 synchronous."""
    sch = StrideScheduler(os3=True, async_verify=True, gamma_max=0.9, encodes_beside=True)
    sch.observe_step(0.04)
    sch.observe_encode(0.09)
    for size, sec in ((1, 0.24), (2, 0.30), (3, 0.35), (4, 0.40), (5, 0.64)):
        sch.observe_search(size, sec)
    sch.observe_search(5, 0.66, overlapped=True)
    sch.observe_step(0.06, overlapped=True)
    sch.observe_round(3, 3)
    kappa = 0.66 / sch.search_cost(5)
    assert sch.search_cost(2, overlapped=True) == pytest.approx(kappa * sch.search_cost(2))
    d = sch.decide()
    assert d.overlap is True and d.stride >= 2


def test_stale_overlapped_costs_are_forgotten_and_measured_again():
    sch = _async_sched()
    sch.observe_step(2.5, overlapped=True)  # one bad measurement beside decoding
    sch.observe_search(1, 40.0, overlapped=True)
    sch.observe_round(4, 4, overlapped=True)
    assert sch.decide().overlap is False
    for _ in range(OVERLAP_REFRESH_ROUNDS - 1):
        sch.observe_round(4, 4)
        assert sch.decide().overlap is False
    sch.observe_round(4, 4)  # OVERLAP_REFRESH_ROUNDS synchronous rounds in a row
    assert sch.overlapped_step_cost() == sch.step_cost()
    assert sch.search_cost(1, overlapped=True) == sch.search_cost(1)
    assert sch.decide().overlap is True  # try again, measuring the contention anew
    sch.observe_step(1.1, overlapped=True)
    sch.observe_search(1, 4.4, overlapped=True)
    sch.observe_round(4, 4, overlapped=True)
    assert sch.decide().overlap is True


def test_costs_seed_the_next_scheduler_and_acceptance_only_as_a_prior():
    first = _async_sched()
    first.observe_step(2.5, overlapped=True)
    first.observe_search(1, 12.0, overlapped=True)
    first.observe_encode(0.3)
    first.observe_lm(0.8)
    costs = first.costs()
    assert costs["gamma_prior"] == first.gamma(capped=False) == 1.0
    nxt = StrideScheduler(os3=True, async_verify=True, gamma_max=0.9, naive_fallback=False)
    nxt.seed_costs(costs)
    assert nxt.costs() == costs
    assert nxt.gamma() == first.gamma() == 0.9  # the prior (capped), before its own first round
    assert nxt.decide() == first.decide()  # same costs, same γ: same plan, no blind stride 1
    nxt.observe_round(4, 0)  # its own text: the prior weighs as PRIOR_ROUNDS rounds beside it
    assert nxt.gamma() == pytest.approx(PRIOR_ROUNDS / (PRIOR_ROUNDS + 1))
    assert nxt.decide().stride < first.decide().stride
    for _ in range(4):
        nxt.observe_round(4, 0)
    assert nxt.gamma() == pytest.approx(PRIOR_ROUNDS / (PRIOR_ROUNDS + 5))  # its own rounds outweigh it
    nxt.seed_costs(None)  # no memory: unchanged
    assert nxt.gamma() == pytest.approx(PRIOR_ROUNDS / (PRIOR_ROUNDS + 5))


def test_a_request_starts_from_the_engines_acceptance_not_from_one_probe():
    """``last`` on 2 CPU cores (2026-12-05): each request's first probe hit (the text starts on
    the question's passage), so γ read 1.0 from one sample and OS^3 ran rounds of 9 that failed;
    the engine's earlier requests said ~0.4."""
    sch = StrideScheduler(os3=True, window=5)
    sch.seed_costs({**StrideScheduler().costs(), "gamma_prior": 0.4})
    sch.observe_probe(True)
    assert sch.gamma(capped=False) == pytest.approx((1 + 2 * 0.4) / 3)
    for _ in range(4):
        sch.observe_probe(True)
    assert sch.gamma(capped=False) == pytest.approx((5 + 2 * 0.4) / 7)
    assert sch.costs()["gamma_prior"] == sch.gamma(capped=False)  # carried on, uncapped


def test_fallback_scheduler_speculates_at_once_when_seeded():
    first = StrideScheduler(os3=True, async_verify=False, gamma_max=0.9, naive_fallback=True)
    first.observe_lm(0.01)
    first.observe_step(0.012)
    first.observe_retrieval(0.5)
    first.observe_search(1, 0.5)
    first.observe_search(4, 0.6)
    first.observe_round(4, 3)
    assert first.decide().stride > 1
    nxt = StrideScheduler(os3=True, async_verify=False, gamma_max=0.9, naive_fallback=True)
    assert nxt.decide().stride == 0  # blind: verified steps measure first
    nxt.seed_costs(first.costs())
    assert nxt.decide() == first.decide()
    unseeded = StrideScheduler(os3=True, async_verify=False, gamma_max=0.9, naive_fallback=True)
    costs = first.costs()
    costs.pop("gamma_prior")  # a cost memory without acceptance (older engine state)
    unseeded.seed_costs(costs)
    assert unseeded.decide().stride == 0


def test_async_without_fallback_measures_alone_costs_first():
    sch = StrideScheduler(os3=True, async_verify=True, naive_fallback=False, gamma_max=0.9)
    assert sch.decide() == StrideDecision(1, None, None, None, overlap=False)
    sch.observe_step(1.0)
    assert sch.decide().overlap is False  # search alone not measured yet
    sch.observe_search(1, 4.0)
    sch.observe_round(1, 1)
    assert sch.decide().overlap is True  # alone costs known, contention not yet: try overlapping


def test_needs_estimates_and_the_regeneration_charge():
    """needs_estimates: OS^3 with the fallback lacks a, b(1) or γ (kNN-LM probes then). A mode
    that regenerates nothing on a rejection (kNN-LM) is not charged the extra step, so at the
    same costs it can speculate where RaLM falls back."""
    for regen in (True, False):
        s = StrideScheduler(os3=True, naive_fallback=True, regenerates=regen, gamma_max=0.9)
        assert s.needs_estimates()
        s.observe_step(1.0)
        s.observe_lm(1.0)
        s.observe_search(1, 1.1)
        s.observe_retrieval(1.1)
        assert s.needs_estimates()  # γ unknown
        s.observe_round(1, 1)
        assert not s.needs_estimates()
        s.observe_search(4, 1.3)
        s.observe_round(4, 2)
        s.observe_round(4, 2)
        # γ = 5/7; naive step 2.1 s: RaLM's best round costs > 2.1 s per kept step with the
        # regenerated chunk charged (stride 2: 2.13 s), kNN-LM's ~1.85 s without it
        assert (s.decide().stride == 0) == regen
    assert not StrideScheduler(os3=True, naive_fallback=False).needs_estimates()


def _winning_on_paper() -> StrideScheduler:
    """The model says stride 3 beats a naive step by ~25% (0.17 s vs 0.23 s per step; seconds of
    the tiny model, one thread, ``last``'s acceptance): what the realized guard must overrule."""
    sch = _observed(True, lm=0.03, lookup=0.0, r=0.2, b1=0.2, matched=1)  # γ_max 0.9 (the default)
    sch.observe_search(2, 0.21)
    for _ in range(3):
        sch.observe_round(2, 1)
    return sch


def test_realized_guard_holds_off_speculation_that_loses_on_the_clock():
    """The model predicts speculation wins; the latest stretches of it (GUARD_STEPS naive steps'
    time) verified fewer steps than fallback steps would have (wall seconds): OS^3 takes verified
    steps for the hold, then tries again and judges afresh; tripping again doubles the hold
    (module doc)."""
    sch = _winning_on_paper()
    assert sch.decide().stride > 0 and not sch.holding()
    sch.observe_verified_step(0.25)  # the naive step as realized
    assert sch.naive_reference() == 0.25 and sch.naive_step_cost() == pytest.approx(0.23)
    sch.observe_realized(0.3 * GUARD_STEPS, GUARD_STEPS)  # 0.30 s per step: one interval is not judged
    assert sch.decide().stride > 0
    sch.observe_realized(0.3, 1)
    assert sch.holding() and sch.decide().stride == 0
    for _ in range(GUARD_HOLD[0] - 1):
        sch.observe_verified_step(0.25)
        assert sch.decide().stride == 0
    sch.observe_verified_step(0.25)
    assert not sch.holding() and sch.decide().stride > 0  # tried again
    rounds = 0  # the old intervals are forgotten: judged again once new ones cover 8 naive steps' time
    while not sch.holding():
        assert sch.decide().stride > 0
        sch.observe_realized(0.3, 1)
        rounds += 1
    assert rounds == math.ceil(GUARD_STEPS * 0.25 / 0.3) and sch.decide().stride == 0
    held = 0
    while sch.holding():
        sch.observe_verified_step(0.25)
        held += 1
    assert held == 2 * GUARD_HOLD[0]


def test_realized_guard_judges_the_latest_steps_and_a_win_resets_the_hold():
    sch = _winning_on_paper()
    sch.observe_verified_step(0.25)
    half = GUARD_STEPS // 2
    sch.observe_realized(0.25 * half, half)
    sch.observe_realized(0.25 * half, half)  # the naive step's pace: not faster, so losing
    assert sch.holding()
    while sch.holding():
        sch.observe_verified_step(0.25)
    for _ in range(4):  # tried again: stretches at 0.15 s per step, over 8 naive steps' time, win
        sch.observe_realized(0.15 * half, half)
    assert not sch.holding() and sch.decide().stride > 0
    assert sch.costs()["_next_hold"] == GUARD_HOLD[0]  # a win resets the doubled hold
    sch.observe_realized(0.5, 1)  # one rollback among winners: the latest window still wins
    assert not sch.holding()
    sch.observe_realized(10.0, 1)  # a disaster: the window is its time, judged at once
    assert sch.holding()


def test_realized_guard_is_off_without_the_fallback_and_its_hold_travels_with_the_costs():
    forced = StrideScheduler(os3=True, async_verify=False, naive_fallback=False)
    forced.observe_verified_step(0.1)
    for _ in range(4):
        forced.observe_realized(5.0, GUARD_STEPS)
    assert not forced.holding()  # speculation forced: nothing held
    first = _winning_on_paper()
    first.observe_verified_step(0.25)
    first.observe_realized(0.4 * GUARD_STEPS, GUARD_STEPS)
    first.observe_realized(0.4, 1)
    assert first.holding()
    first.observe_verified_step(0.25)  # one step of the hold taken: the rest travels
    nxt = StrideScheduler(os3=True, async_verify=False, gamma_max=0.9, naive_fallback=True)
    nxt.seed_costs(first.costs())
    assert nxt.naive_reference() == 0.25 and nxt.decide().stride == 0
    for _ in range(GUARD_HOLD[0] - 1):
        assert nxt.holding()
        nxt.observe_verified_step(0.25)
    assert not nxt.holding() and nxt.decide().stride > 0  # then judged afresh: no interval travelled
    nxt.observe_realized(0.4, 1)
    nxt.observe_realized(0.4 * GUARD_STEPS, GUARD_STEPS)
    held = 0
    while nxt.holding():
        nxt.observe_verified_step(0.25)
        held += 1
    assert held == 2 * GUARD_HOLD[0]
    last = StrideScheduler(os3=True, naive_fallback=True)
    for _ in range(10):
        last.observe_verified_step(0.25)
        last.observe_realized(10.0, GUARD_STEPS)
        last.observe_realized(10.0, 1)
    assert last.costs()["_next_hold"] == GUARD_HOLD[1]  # the hold stops doubling at its last value


def _fallen_back_on_an_outlier() -> StrideScheduler:
    """kNN-LM-like costs (seconds): an LM step 10 ms (11 with the cache lookup), a one-query search
    10 ms, acceptance 1.0, and ONE round of 7 whose search was a first-use outlier (89 ms, session
    19's carried ``b(7)``): the model now says every round loses, so OS^3 falls back."""
    sch = _observed(True, lm=0.010, lookup=0.001, r=0.010, b1=0.010, matched=1)
    sch.observe_search(7, 0.089)
    sch.observe_round(7, 7)
    return sch


def _fallback_steps(sch: StrideScheduler, n: int) -> None:
    """``n`` fallback steps as a mode takes them: a one-query search, a probe that hits, the step."""
    for _ in range(n):
        sch.observe_search(1, 0.010)
        sch.observe_probe(True)
        sch.observe_verified_step(0.020)


def test_a_batch_size_measured_once_and_badly_is_measured_again():
    """Searches of more than one query are refreshed only by rounds of that size, so while OS^3
    falls back an outlier would stand for good; after SEARCH_REFRESH_STEPS[0] fallback steps and
    rounds in a row without one they are forgotten (one query's stay) and the next decision
    speculates, measuring them again; an outlier confirmed as such keeps the first interval."""
    sch = _fallen_back_on_an_outlier()  # its round of 7 counts as the first
    assert sch.decide().stride == 0
    _fallback_steps(sch, SEARCH_REFRESH_STEPS[0] - 2)
    assert sch.decide().stride == 0 and sch.search_cost(7) == pytest.approx(0.089)
    _fallback_steps(sch, 1)
    assert sch.search_cost(7) == sch.search_cost(1) == pytest.approx(0.010)  # flat at one query's
    s = sch.decide().stride
    assert s > 1
    sch.observe_search(s, 0.012)  # measured again, as it really is: the old one was an outlier
    sch.observe_round(s, s)
    assert sch.decide().stride > 1
    assert sch.costs()["_next_refresh"] == SEARCH_REFRESH_STEPS[0]


def test_a_batch_size_that_really_is_dear_is_retried_ever_less_often():
    """Where batches really cost that much (the refreshed round confirms it), each refresh costs
    one losing round, so the interval doubles up to SEARCH_REFRESH_STEPS[1]; the count and the
    interval travel with the costs (a request may be shorter than the interval)."""
    sch = _fallen_back_on_an_outlier()
    intervals = []
    for _ in range(6):
        n = 0
        while sch.decide().stride == 0:
            _fallback_steps(sch, 1)
            n += 1
            assert n <= 2 * SEARCH_REFRESH_STEPS[1], "the batch sizes were never refreshed"
        intervals.append(n)
        s = sch.decide().stride
        sch.observe_search(s, 0.089)  # dear again
        sch.observe_round(s, s)  # (counts as the first of the next interval)
        assert sch.decide().stride == 0
    first, last = SEARCH_REFRESH_STEPS
    assert intervals == [min(last, first * 2 ** i) - 1 for i in range(6)]
    nxt = StrideScheduler(os3=True, async_verify=False, gamma_max=0.9, naive_fallback=True)
    _fallback_steps(sch, last - 4)  # 3 fallback steps to go
    nxt.seed_costs(sch.costs())  # the next request
    _fallback_steps(nxt, 2)
    assert nxt.decide().stride == 0
    _fallback_steps(nxt, 1)
    assert nxt.decide().stride > 1


def test_rounds_of_one_do_not_refresh_a_dear_batch_size_either():
    """Asynchronous verification: an outlier at 4 queries makes longer rounds lose, rounds of
    one overlapped with decoding pay, so OS^3 speculates at stride 1 and would never measure a
    batch again; the rounds count towards the refresh like fallback steps."""
    sch = _observed(True, lm=0.010, lookup=0.001, r=0.020, b1=0.020, matched=1, async_verify=True)
    sch.observe_search(4, 0.400)  # the outlier
    sch.observe_round(4, 4)
    for _ in range(SEARCH_REFRESH_STEPS[0] - 2):
        d = sch.decide()
        assert d.stride == 1 and d.overlap
        sch.observe_search(1, 0.020, overlapped=True)
        sch.observe_round(1, 1, overlapped=True)
    assert sch.decide().stride == 1
    sch.observe_search(1, 0.020, overlapped=True)
    sch.observe_round(1, 1, overlapped=True)
    assert sch.decide().stride > 1


def test_fit_line_is_least_squares_with_a_slope_never_below_zero():
    assert fit_line([(1, 3.0), (3, 7.0)]) == pytest.approx((1.0, 2.0))
    assert fit_line([(1, 5.0), (2, 4.0), (3, 3.0)]) == pytest.approx((4.0, 0.0))  # falling: flat at the mean
    assert fit_line([(2, 1.0)]) is None and fit_line([(2, 1.0), (2, 3.0)]) is None  # no two distinct sizes


def test_a_probe_is_an_acceptance_sample_beside_decoding_too():
    """After a stretch of overlapped rounds that went well, fallback probes that miss must lower
    γ beside decoding as well (it stayed at the stretch's value and OS^3 resumed losing rounds)."""
    sch = StrideScheduler(os3=True, async_verify=True, window=5)
    for _ in range(3):
        sch.observe_round(2, 2, overlapped=True)
    assert sch.gamma(overlapped=True, capped=False) == 1.0
    for _ in range(5):
        sch.observe_probe(False)
    assert sch.gamma(overlapped=True, capped=False) == 0.0
    assert sch.gamma(capped=False) == 0.0
    sch.observe_probe(True)
    assert sch.gamma(overlapped=True, capped=False) == pytest.approx(1 / 5)
