"""Speculative kNN-LM == naive kNN-LM, token for token (docs/design.md §2 invariant 1), and the cache."""

from __future__ import annotations

import numpy as np
import pytest

from ralmspec.errors import ConfigError
from ralmspec.knnlm.speculative import NeighbourCache, SpeculativeKNNConfig, SpeculativeKNNLM

from tests.identity import SpeculationCheck, forces_speculation

from .conftest import FALLBACK_WHY, MAX_NEW_TOKENS, check_fallback_sibling

C = SpeculativeKNNConfig
# Flat datastores verify batches through the GEMM candidate path (gemm_min_batch=2) while the
# naive decoder searches one query at a time through FAISS: every flat case also checks that
# the two paths return the same certified top-k.
CONFIGS = {
    "flat": [
        C(),  # OS^3, defaults (naive fallback on)
        C(os3=False, fixed_stride=4),
        C(os3=False, fixed_stride=3, cache_capacity=3),  # tiny cache: many rejections
        C(os3=False, fixed_stride=2, cache_capacity=1, successors=0, prefilter=False, self_feed=False),
        C(os3=False, fixed_stride=2, strict=True),
        C(async_verify=True, os3=False, fixed_stride=4, cache_capacity=16),
    ],
    "ivf": [C(async_verify=True, gamma_max=0.95, naive_fallback=False),
            C(os3=False, fixed_stride=3, cache_capacity=8)],
    "hnsw": [C(strict=True, os3=False, fixed_stride=2, cache_capacity=64), C(probe_every=1, cache_capacity=256)],
}
CASES = [(kind, i) for kind, cfgs in CONFIGS.items() for i in range(len(cfgs))]


@pytest.mark.parametrize("kind,i", CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_speculative_equals_naive(naive_results, knn_prompts, kind, i):
    cfg = CONFIGS[kind][i]
    knn, naive = naive_results[kind]
    spec = SpeculativeKNNLM(knn, cfg)
    results = [spec.generate(p) for p in knn_prompts]
    check = SpeculationCheck()
    for p, a, b in zip(knn_prompts, naive, results):
        check.same((b.tokens, b.text), (a.tokens, a.text), b.stats, where=(p, cfg))
    st = [r.stats for r in results]
    for s, r in zip(st, results):
        # bookkeeping: every speculated token was accepted or caused exactly one rollback,
        # except tokens wasted after a rejection
        assert s.accepted + s.rollbacks <= s.speculated
        assert s.rounds >= s.rollbacks and s.real_searches >= 1
        assert len(r.tokens) <= MAX_NEW_TOKENS
        if not cfg.os3:
            assert all(1 <= x <= cfg.fixed_stride for x in s.verify_batch_sizes)
    # a fixed stride (or OS^3 without its fallback) speculates in every request, and caches of
    # <= 3 entries roll back; OS^3 with its fallback speculates where the machine's costs say it
    # pays (hnsw-1 measured both ways on 2 cores), so its forcing sibling runs too
    if forces_speculation(cfg):
        check.ran(min_speculated=len(results), min_rollbacks=int(cfg.cache_capacity <= 3))
    else:
        check.ran(min_speculated=0, why=FALLBACK_WHY)
        check_fallback_sibling(knn, cfg, knn_prompts, naive)


def test_speculation_pays_off_on_corpus_prompts(naive_results, knn_prompts):
    """Locality: with the default cache most speculated tokens are right (the test can fail)."""
    knn, _ = naive_results["flat"]
    results = [SpeculativeKNNLM(knn, C(os3=False, fixed_stride=2)).generate(p) for p in knn_prompts[:12]]
    acc = sum(r.stats.accepted for r in results) / sum(r.stats.speculated for r in results)
    assert acc > 0.5, acc
    # the strict rule (identical neighbour sets) accepts no more than the token rule
    strict = [SpeculativeKNNLM(knn, C(os3=False, fixed_stride=2, strict=True)).generate(p)
              for p in knn_prompts[:12]]
    acc_strict = sum(r.stats.accepted for r in strict) / sum(r.stats.speculated for r in strict)
    assert acc_strict <= acc
    # and fewer real searches than tokens were needed
    assert sum(r.stats.real_searches for r in results) < sum(len(r.tokens) for r in results)


def test_cache_topk_is_canonical_and_bounded(knn_datastores):
    ds = knn_datastores["flat"]
    rng = np.random.default_rng(7)
    ids = rng.choice(ds.n, size=600, replace=False)
    exact = NeighbourCache(ds, 1000, prefilter=False)
    fast = NeighbourCache(ds, 1000, prefilter=True, prefilter_margin=8)
    exact.add(ids)
    fast.add(ids)
    for q in ds.key_vectors(ids[:20]).astype(np.float32) + rng.normal(0, 0.3, size=(20, ds.dim)).astype(np.float32):
        a_ids, a_d = exact.topk(q, 8)
        b_ids, b_d = fast.topk(q, 8)
        assert np.array_equal(a_ids, b_ids) and np.array_equal(a_d, b_d)
        # distances are bit-identical to the datastore's canonical ones; ranking matches
        assert np.array_equal(a_d, ds.distances(q, a_ids))
        all_d = ds.distances(q, ids)
        ref = ids[np.lexsort((ids, all_d))[:8]]
        assert a_ids.tolist() == ref.tolist()
        # when the true top-k is cached, the cache answers exactly like the real search
        t_ids, t_d = ds.search(q, 8)
        if set(t_ids[0]) <= set(ids.tolist()):
            assert np.array_equal(t_ids[0], a_ids) and np.array_equal(t_d[0], a_d)

    small = NeighbourCache(ds, 5)
    small.add([1, 2, 3, 4, 5])
    small.add([6, 7])  # evicts the two least recent: 1, 2
    assert sorted(small.entry_ids().tolist()) == [3, 4, 5, 6, 7] and small.evictions == 2
    small.add([3])  # touch 3
    small.add([8])  # evicts 4
    assert 4 not in small and 3 in small and len(small) == 5
    small.add(list(range(100, 120)))  # more than capacity: the last 5 are kept
    assert sorted(small.entry_ids().tolist()) == [115, 116, 117, 118, 119]


def test_cache_add_search_result_uses_successors(knn_datastores):
    ds = knn_datastores["flat"]
    cache = NeighbourCache(ds, 100)
    cache.add_search_result(np.array([10, 500]), successors=3)
    assert sorted(cache.entry_ids().tolist()) == [10, 11, 12, 13, 500, 501, 502, 503]
    end0 = int(ds.doc_offsets[1])
    cache2 = NeighbourCache(ds, 100)
    cache2.add_search_result(np.array([end0 - 2]), successors=5)
    assert sorted(cache2.entry_ids().tolist()) == [end0 - 2, end0 - 1]  # stops at the document end


def test_config_validation():
    for bad in (dict(cache_capacity=0), dict(successors=-1), dict(fixed_stride=0), dict(gamma_max=1.0)):
        with pytest.raises(ConfigError):
            SpeculativeKNNConfig(**bad)


def test_naive_fallback_when_speculation_cannot_pay(naive_results, knn_prompts):
    """With a near-zero acceptance cap OS^3 predicts no gain: the decoder takes plain verified
    steps (probing the cache now and then) and the output is still the naive one."""
    knn, naive = naive_results["flat"]
    spec = SpeculativeKNNLM(knn, C(gamma_max=0.01, probe_every=2))
    results = [spec.generate(p) for p in knn_prompts[:16]]
    check = SpeculationCheck()
    for r, a in zip(results, naive):
        check.same(r.tokens, a.tokens, r.stats)
    # built NOT to speculate; the default OS^3 below and the fixed strides above speculate
    check.ran(min_speculated=0, why="a near-zero acceptance cap: OS^3 predicts no gain and falls back")
    assert sum(r.stats.verified_steps for r in results) > 16  # beyond the first tokens
    assert sum(r.stats.probes for r in results) > 0


def test_os3_measures_with_a_probed_verified_step_then_speculates_fake_latency_search(naive_results, knn_prompts,
                                                                                      monkeypatch):
    """The fallback is the shared StrideScheduler's: with nothing measured the second token is a
    verified step that also probes the cache (a speculative step's cost and a 1-step round),
    after which OS^3 decides; on corpus prompts (locality) speculation then pays. Every real
    search takes a FAKE extra 30 ms (any batch size), a datastore where a search costs several
    LM steps: with the real ~3 ms search whether speculation pays is this machine's call (a
    step with its guess ~9 ms vs a naive step ~11 ms on 2 cores), and a loaded CI machine may
    rightly never speculate."""
    import time

    from ralmspec.knnlm.speculative import KNNMode

    search = KNNMode.search

    def slow_search(self, hidden, worker=False):
        ids, d, took = search(self, hidden, worker)
        time.sleep(0.03)
        return ids, d, took + 0.03

    monkeypatch.setattr(KNNMode, "search", slow_search)
    knn, naive = naive_results["flat"]
    results = [SpeculativeKNNLM(knn, C()).generate(p) for p in knn_prompts[:8]]
    check = SpeculationCheck()
    for r, a in zip(results, naive):
        check.same(r.tokens, a.tokens, r.stats)
    check.ran(min_speculated=len(results))  # measured: 80 speculated (2026-12-08)
    assert all(r.stats.verified_steps >= 2 and r.stats.probes >= 1 for r in results)


@pytest.mark.parametrize("cfg", [C(os3=False, fixed_stride=3, cache_capacity=3),
                                 C(async_verify=True, os3=False, fixed_stride=4, cache_capacity=16),
                                 C(gamma_max=0.01, probe_every=2)],
                         ids=["sync-rollbacks", "async", "fallback"])
def test_tokens_and_stats_come_from_the_round_core(naive_results, knn_prompts, cfg):
    """Every returned token is verified: a real search (naive step), a kept speculated token, or
    the correction of a rollback; the round counters are the RoundBook's."""
    knn, naive = naive_results["flat"]
    spec = SpeculativeKNNLM(knn, cfg)
    check = SpeculationCheck()
    for p, a in zip(knn_prompts[:10], naive[:10]):
        r = spec.generate(p)
        s = r.stats
        check.same(r.tokens, a.tokens, s, where=p)
        assert len(r.tokens) == s.verified_steps + s.accepted + s.rollbacks
        hist = {int(k): v for k, v in s.acceptance_histogram.items()}
        assert sum(hist.values()) == s.rounds == len(s.verify_batch_sizes)
        assert sum(k * v for k, v in hist.items()) == s.accepted
        assert sum(s.verify_batch_sizes) == s.speculated
        assert s.real_searches == s.rounds + s.verified_steps
        assert s.verified_queries == s.speculated + s.verified_steps
        assert "acceptance_histogram" in r.to_dict()["stats"]
    if forces_speculation(cfg):
        check.ran(min_speculated=len(knn_prompts[:10]), min_rollbacks=int(cfg.cache_capacity <= 3))
    else:
        check.ran(min_speculated=0, why="the fallback case: a near-zero acceptance cap, mostly verified steps")


def test_a_failed_verification_propagates(naive_results, knn_prompts, monkeypatch):
    """A search error inside a round (synchronous, or in the worker thread) reaches the caller."""
    knn, _ = naive_results["flat"]
    ds = knn.datastore
    real = ds.search
    calls = [0]

    def failing(queries, k):
        calls[0] += 1
        if calls[0] > 1:
            raise RuntimeError("search failed")
        return real(queries, k)

    monkeypatch.setattr(ds, "search", failing)
    for cfg in (C(os3=False, fixed_stride=2), C(async_verify=True, os3=False, fixed_stride=2)):
        calls[0] = 0
        with pytest.raises(RuntimeError, match="search failed"):
            SpeculativeKNNLM(knn, cfg).generate(knn_prompts[0])


def test_async_verification_searches_with_the_callers_faiss_threads(naive_results, knn_prompts, monkeypatch,
                                                                   caller_faiss_threads):
    """The overlapped search runs in the verification thread with the calling thread's FAISS
    (OpenMP) thread count (ralmspec.threads), not the all-cores default a new thread starts at:
    beside decoding that default spun against the LM (a 1-query search 28 ms vs 6 ms alone)."""
    import threading

    import faiss

    knn, naive = naive_results["flat"]
    ds = knn.datastore
    real = ds.search
    seen: list[tuple[str, int]] = []

    def recording(queries, k):
        seen.append((threading.current_thread().name, faiss.omp_get_max_threads()))
        return real(queries, k)

    n, _ = caller_faiss_threads  # not what a new thread starts at
    monkeypatch.setattr(ds, "search", recording)
    out = SpeculativeKNNLM(knn, C(async_verify=True, os3=False, fixed_stride=2)).generate(knn_prompts[0])
    assert out.tokens == naive[0].tokens and out.stats.speculated > 0
    overlapped = [t for name, t in seen if name.startswith("knnlm-verify")]
    assert overlapped and set(overlapped) == {n}, seen


@pytest.mark.parametrize("runner", ["static", "compiled"])
def test_speculative_equals_naive_on_the_static_runner(runner, tiny_lm, knn_datastores, knn_prompts):
    """kNN-LM decodes through the LM runner seam: on the static KV-slot runner (rollback = a
    length; each token one ``step_hidden``, compiled on the ``compiled`` runner) speculative ==
    naive, the speculation rolls back, and every slot is given back."""
    from ralmspec.knnlm.model import KNNLM, KNNLMConfig
    from ralmspec.lm.models import load_lm

    static_lm = load_lm("tiny", runner=runner)
    assert static_lm.runner.name == runner
    knn = KNNLM(static_lm, knn_datastores["flat"], KNNLMConfig(k=8, max_new_tokens=MAX_NEW_TOKENS))
    spec = SpeculativeKNNLM(knn, C(os3=False, fixed_stride=3, cache_capacity=3))
    check = SpeculationCheck()
    for p in knn_prompts[::4]:
        naive, res = knn.generate(p), spec.generate(p)
        check.same((res.tokens, res.text), (naive.tokens, naive.text), res.stats, where=p)
    check.ran(min_speculated=len(knn_prompts[::4]), min_rollbacks=1)
    runner = static_lm.runner
    assert len(runner._free) == runner.capacity  # noqa: SLF001 - no slot leaked by kNN-LM requests
    assert bool(runner.compiled_spans) == (runner.name == "compiled")  # the compiled step did run


@pytest.mark.parametrize("cfg", [C(os3=False, fixed_stride=4), C(os3=False, fixed_stride=3, cache_capacity=3),
                                 C(async_verify=True, os3=False, fixed_stride=3, cache_capacity=16)],
                         ids=["stride4", "tiny-cache", "async"])
def test_a_stop_rule_ends_both_decoders_at_the_same_token_and_only_verified_tokens_stream(
        naive_results, knn_prompts, cfg):
    """``stop_when`` (here a stop string's ``StopWatch``, as the kNN-LM server uses it) ends the
    speculative decoder where it ends the naive one, although the speculative decoder asks it on
    speculated output too; ``on_tokens`` receives exactly the returned tokens in order, so no
    token it was sent was ever rolled back (verified only)."""
    from ralmspec.engine.stop import StopWatch

    knn, naive = naive_results["flat"]
    tok = knn.lm.tokenizer
    spec = SpeculativeKNNLM(knn, cfg)
    check, cut = SpeculationCheck(), 0
    for p, a in zip(knn_prompts, naive):
        mid = len(a.text) // 2
        stop = a.text[mid:mid + 3]
        if not stop.strip():
            continue
        streamed: dict[str, list[int]] = {"naive": [], "spec": []}
        b = knn.generate(p, on_tokens=streamed["naive"].extend, stop_when=StopWatch(tok, [stop]).completed)
        s = spec.generate(p, on_tokens=streamed["spec"].extend, stop_when=StopWatch(tok, [stop]).completed)
        check.same(s.tokens, b.tokens, s.stats, where=(p, stop, cfg))
        assert streamed["naive"] == b.tokens and streamed["spec"] == s.tokens, (p, stop)
        assert stop in tok.decode(b.tokens) and b.tokens == a.tokens[:len(b.tokens)]
        assert stop not in tok.decode(b.tokens[:-1])  # the first token where it holds
        cut += len(b.tokens) < len(a.tokens)
    assert cut >= 10, "the stop strings should end most outputs early"
    check.ran(min_speculated=cut, min_rollbacks=int(cfg.cache_capacity <= 3))


def test_stats_of_a_request_that_speculated_nothing_are_valid_json():
    """``acceptance_rate`` is None, not NaN (``knnlm generate --json`` and the server's ``knnlm.stats``)."""
    import json

    from ralmspec.knnlm.speculative import SpeculativeStats

    assert SpeculativeStats().to_dict()["acceptance_rate"] is None
    json.dumps(SpeculativeStats().to_dict(), allow_nan=False)
    assert SpeculativeStats(speculated=4, accepted=3).to_dict()["acceptance_rate"] == 0.75
