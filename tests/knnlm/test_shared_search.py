"""SharedSearch: decoding threads' datastore searches that meet run as one search, and each gets
what the datastore answers it alone (ralmspec/knnlm/shared_search.py)."""

from __future__ import annotations

import numpy as np

from ralmspec.errors import ConfigError
from ralmspec.knnlm.shared_search import SharedSearch
from ralmspec.rendezvous import Rendezvous
from tests.concurrent import raised, run_together


def test_searches_of_threads_share_calls_and_equal_each_search_alone(knn_datastores):
    ds = knn_datastores["flat"]
    rng = np.random.default_rng(5)
    keys = ds.key_vectors(rng.choice(ds.n, 40, replace=False)).astype(np.float32)
    # per thread: a list of (queries, k) calls: single queries (naive tokens), blocks (verifications)
    plans = [[(keys[(t * 7 + j) % 40][None, :] + rng.normal(0, 0.05, (1, ds.dim)).astype(np.float32), 8)
              if j % 3 else (keys[j:j + 1 + t % 4] * 1.01, 4 + t % 2) for j in range(12)] for t in range(5)]
    expected = [[ds.search(q, k) for q, k in plan] for plan in plans]
    rv = Rendezvous()
    shared = SharedSearch(ds, rv, gather_s=0.05)

    def worker(t: int) -> list:
        with rv.member():
            return [shared.search(q, k) for q, k in plans[t]]

    got = run_together(len(plans), worker)
    assert not raised(got), raised(got)
    for exp, out in zip(expected, got):
        assert len(out) == len(exp)
        for (ei, ed), (oi, od) in zip(exp, out):
            assert np.array_equal(ei, oi) and np.array_equal(ed, od)
    sizes = shared.stats()["batches_by_size"]
    assert sum(int(k) * v for k, v in sizes.items()) == sum(len(p) for p in plans)
    assert max(int(k) for k in sizes) >= 2, sizes  # searches really met


def test_a_bad_call_fails_alone(knn_datastores):
    ds = knn_datastores["flat"]
    rv = Rendezvous()
    shared = SharedSearch(ds, rv, gather_s=5.0)
    good = ds.key_vectors(np.array([3])).astype(np.float32)

    def call(i: int):
        with rv.member():
            return shared.search((good, np.zeros((1, ds.dim + 1)))[i], 4)

    out_good, out_bad = run_together(2, call)
    assert isinstance(out_bad, ConfigError)
    ids, d = out_good
    exp_ids, exp_d = ds.search(good, 4)
    assert np.array_equal(ids, exp_ids) and np.array_equal(d, exp_d)


def test_an_asynchronous_verification_searches_beside_the_decoding_threads(tiny_lm, knn_datastores, knn_prompts):
    """With asynchronous verification a round's search runs in the request's worker thread, no
    member of the decoding threads' rendezvous: it searches the datastore itself (a call at the
    shared lane would wait its turn among the members' batches, one at a time, instead of running
    beside the request's LM steps). The tokens are the naive ones; the lane served only the
    request's own searches (here its first token's: every round is overlapped)."""
    from ralmspec.knnlm.model import KNNLM, KNNLMConfig
    from ralmspec.knnlm.speculative import SpeculativeKNNConfig, SpeculativeKNNLM
    from ralmspec.lm.shared_runner import SharedRunner
    from ralmspec.lm.static import StaticRunner

    ds = knn_datastores["flat"]
    rv = Rendezvous()
    shared = SharedSearch(ds, rv)
    runner = SharedRunner(StaticRunner(tiny_lm.model, max_len=256, capacity=4, batch_rows=4), rv)
    knn = KNNLM(tiny_lm, ds, KNNLMConfig(max_new_tokens=24), runner=runner, search=shared.search)
    spec = SpeculativeKNNLM(knn, SpeculativeKNNConfig(async_verify=True, os3=False, fixed_stride=4))
    with rv.member():
        naive = knn.generate(knn_prompts[0])
        calls = shared.stats()["calls"]
        out = spec.generate(knn_prompts[0])
    assert out.tokens == naive.tokens
    assert out.stats.real_searches > 2 and out.stats.speculated > 0
    assert shared.stats()["calls"] - calls == out.stats.verified_steps == 1
