"""The LM as Ray replicas (``ralmspec.lm.ray_replicas``): same tokens as one in-process backend.

- 2 replicas of ``tiny``: one batched call of 18 RaLM-shaped prompts equals the in-process
  backend (run with the replicas' torch thread count); with sessions, a second call with grown
  prompts still equals it, each session stays on its replica and that replica holds its KV.
- The full engine over the replicas: speculative == naive, and concurrent requests through the
  Scheduler (batches split across replicas) == the sequential naive outputs.
- A replica SIGKILLed during a call fails the WHOLE call with ``LMError`` (HTTP 503), never a
  partial answer; Ray restarts it and the next call is right again.
- A bad prompt is still a ``ConfigError`` (HTTP 400); without Ray, ``--lm-replicas`` says how to
  install it (this one runs without Ray too).

Ray (skipped only when ray is not importable): a local loopback cluster for this module.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import threading
import time

import pytest
import torch

from ralmspec.cli import main
from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
from ralmspec.engine.core import RalmEngine
from ralmspec.errors import ConfigError, LMError
from ralmspec.cluster import ray_available
from tests.identity import SpeculationCheck, forces_speculation, naive_then_scheduled

REPLICA_THREADS = 1
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_ray = pytest.mark.skipif(not ray_available(), reason='ray is not installed (pip install -e ".[ray]")')
GENS = [GenerationConfig(stride=s, query_len=16, max_new_tokens=10, passage_tokens=64) for s in (1, 2, 4)]


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the in-process reference with the replicas' thread count (CPU GEMM bits depend on it)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_lm_replicas_without_ray_say_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["serve", "--model", "tiny", "--lm-replicas", "2", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install 'ralmspec[ray]'" in err and "--lm-replicas" in err, err


def test_lm_error_is_503():
    from ralmspec.serving.app import error_for

    err = error_for(LMError("LM replica 1 is down"))
    assert err.status == 503 and err.code == "language_model_unavailable"


@pytest.fixture(scope="module")
def replicas(ray_cluster):
    from ralmspec.lm.ray_replicas import RayLMConfig, RayLMReplicas

    lm = RayLMReplicas("tiny", config=RayLMConfig(replicas=2, threads=REPLICA_THREADS, malloc_trim_s=0.2),
                       cluster=ray_cluster)
    yield lm
    lm.close()
    assert ray_cluster.ray.is_initialized()  # a cluster it did not start is left alone


@pytest.fixture(scope="module")
def questions():
    from ralmspec.data.loaders import default_questions

    return [q.question for q in default_questions()[200:210]]


@pytest.fixture(scope="module")
def ralm_prompts(tiny_lm, small_corpus, questions):
    """18 prompts shaped like the engine's: passage + question + some generated tokens."""
    tok = tiny_lm.tokenizer
    out = []
    for i in range(18):
        passage = tok.encode(small_corpus[(i * 13) % len(small_corpus)].content)[:64 + 7 * i]
        question = tok.encode(questions[i % len(questions)])
        out.append([101] + passage + [102] + question + [1024 + 37 * j % 20000 for j in range(i % 5)])
    return out


def _reference(tiny_lm, prompts, n):
    with torch_threads(REPLICA_THREADS):
        return tiny_lm.greedy(prompts, n)


@needs_ray
def test_replicas_agree_on_the_model(replicas, tiny_lm):
    assert replicas.eos_token_id == tiny_lm.eos_token_id and replicas.max_context == tiny_lm.max_context
    assert replicas.vocab_size == tiny_lm.vocab_size
    assert len({i["pid"] for i in replicas.infos}) == 2 and all(i["threads"] == REPLICA_THREADS for i in replicas.infos)
    text = "who wrote the song hey jude"
    assert replicas.tokenizer.encode(text) == tiny_lm.tokenizer.encode(text)


@needs_ray
def test_each_replica_trims_its_own_heap(replicas, ralm_prompts):
    """A replica decodes for as long as the server runs, so it trims its C heap like the server
    (``RayLMConfig.malloc_trim_s``, from ``--malloc-trim-s``), in its own process."""
    replicas.generate(ralm_prompts[:4], 4)
    deadline = time.monotonic() + 30
    while True:
        stats = [r["heap_trim"] for r in replicas.worker_memory(30.0)]
        if all(s["calls"] >= 2 for s in stats) or time.monotonic() > deadline or not GLIBC:
            break
        time.sleep(0.1)
    if GLIBC:
        assert all(s["interval_s"] == 0.2 and s["calls"] >= 2 and s["max_seconds"] > 0 for s in stats), stats
    else:
        assert all(s["interval_s"] == 0.0 and s["calls"] == 0 for s in stats), stats


@needs_ray
def test_replicas_report_their_own_process_memory(replicas):
    """``worker_memory``: one row per replica, read in the replica's process (the server's
    ``/v1/stats`` ``memory.workers``), its heap trims included."""
    rows = replicas.worker_memory(10.0)
    assert [(r["role"], r["index"], r["pid"]) for r in rows] == \
           [("lm_replica", i, info["pid"]) for i, info in enumerate(replicas.infos)]
    assert all(r["rss_bytes"] > 50 << 20 and (r["heap"] is not None) == GLIBC for r in rows), rows
    assert all(r["heap_trim"]["interval_s"] == (0.2 if GLIBC else 0.0) for r in rows), rows


def test_replica_trim_interval_is_checked():
    from ralmspec.lm.ray_replicas import RayLMConfig

    with pytest.raises(ConfigError, match="malloc_trim_s must be >= 0"):
        RayLMConfig(malloc_trim_s=-1)
    for bad in ({"actor_gpus": float("nan")}, {"actor_cpus": float("nan")}, {"call_timeout_s": float("nan")}):
        with pytest.raises(ConfigError):  # NaN passed "< 0" checks (--lm-replica-gpus nan)
            RayLMConfig(**bad)


@needs_ray
def test_one_batched_call_equals_in_process(replicas, tiny_lm, ralm_prompts):
    assert replicas.greedy(ralm_prompts, 8) == _reference(tiny_lm, ralm_prompts, 8)
    assert replicas.greedy([], 8) == []


@needs_ray
def test_sessions_pinned_with_kv_reuse_and_same_tokens(replicas, tiny_lm, ralm_prompts):
    sessions = [f"pin-{i}" for i in range(len(ralm_prompts))]
    first = replicas.greedy(ralm_prompts, 4, sessions)
    assert first == _reference(tiny_lm, ralm_prompts, 4)
    pins = [replicas.replica_of(s) for s in sessions]
    assert set(pins) == {0, 1} and abs(pins.count(0) - pins.count(1)) <= 1  # least-loaded spread
    assert replicas.cached_length(sessions[-1]) > 0  # KV kept on the pinned replica
    # second call of every session, prompts grown by their output (the RaLM loop), shuffled batch order
    grown = [p + o for p, o in zip(ralm_prompts, first)]
    order = list(reversed(range(len(grown))))
    second = replicas.greedy([grown[i] for i in order], 6, [sessions[i] for i in order])
    assert second == [_reference(tiny_lm, grown, 6)[i] for i in order]
    assert [replicas.replica_of(s) for s in sessions] == pins
    replicas.release(sessions[-1])
    assert replicas.replica_of(sessions[-1]) is None and replicas.cached_length(sessions[-1]) == 0
    for s in sessions[:-1]:
        replicas.release(s)


@needs_ray
def test_bad_prompt_is_a_config_error_not_an_lm_error(replicas):
    with pytest.raises(ConfigError):
        replicas.greedy([[101, 2023], [replicas.vocab_size + 5]], 3)


@needs_ray
def test_engine_over_replicas_speculative_equals_naive_and_in_process(replicas, tiny_lm, small_indexes, questions):
    """Half the requests take a fixed stride (they speculate whatever the timings), half OS^3
    without its naive fallback (which may choose one-step synchronous rounds, the naive loop)."""
    engine = RalmEngine(replicas, small_indexes["exact"], EngineConfig())
    local = RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())
    check, qs, forced = SpeculationCheck(), questions[:6], 0
    for i, q in enumerate(qs):
        g = GENS[i % 3]
        cfg = SpeculationConfig(prefetch=(1, 5)[i % 2], os3=i % 2 == 1, fixed_stride=3, naive_fallback=False)
        forced += forces_speculation(cfg)
        naive = engine.generate_sync(q, gen=g, speculate=False)
        spec = engine.generate_sync(q, gen=g, speculate=True, spec=cfg)
        check.same(spec.token_ids, naive.token_ids, spec.stats, where=(i, q))
        if i < 2:
            with torch_threads(REPLICA_THREADS):
                assert local.generate_sync(q, gen=g, speculate=False).token_ids == naive.token_ids, (i, q)
    check.ran(min_speculated=forced)


@needs_ray
def test_concurrent_requests_through_scheduler_equal_sequential_naive(replicas, small_indexes, questions):
    """No load governor and a fixed stride verified beside decoding: every speculative request
    speculates (OS^3, even without its naive fallback, may choose the naive loop)."""
    engine = RalmEngine(replicas, small_indexes["exact"], EngineConfig())
    qs = questions[:8]
    speculative = [bool(i % 4) for i in range(len(qs))]
    forced = SpeculationConfig(os3=False, fixed_stride=3, async_verify=True)

    oracle, results, stats = naive_then_scheduled(engine, [(q, GENS[i % 3], forced, speculative[i])
                                                           for i, q in enumerate(qs)])
    check = SpeculationCheck()
    for i, (a, b) in enumerate(zip(oracle, results)):
        check.same(b.token_ids, a.token_ids, b.stats, where=(i, qs[i]))
    check.ran(min_speculated=sum(speculative))
    assert stats["completed"] == len(qs) and stats["lm_batch_sizes"]["max"] > 1, stats
    assert not replicas._pins  # every request's session was released (and its pin forgotten)


@needs_ray
def test_replica_killed_mid_call_fails_whole_call_then_recovers(replicas, tiny_lm, ralm_prompts):
    prompts = ralm_prompts[:8]
    expected = _reference(tiny_lm, prompts, 5)
    outcome: dict = {}

    def call():
        try:
            outcome["out"] = replicas.greedy(prompts * 4, 200)  # long enough to be killed mid-call
        except Exception as exc:  # noqa: BLE001
            outcome["exc"] = exc

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.0)
    os.kill(replicas.infos[0]["pid"], signal.SIGKILL)
    t.join(120)
    assert "out" not in outcome, "a call whose replica died must not return"
    assert isinstance(outcome.get("exc"), LMError), outcome
    # Ray restarts the replica (it reloads the model); the next call waits for it and is right
    assert replicas.greedy(prompts, 5) == expected


def test_a_closed_replica_set_refuses_calls_with_a_closed_error():
    """``close()`` kills the replicas and empties ``actors``; a later ``generate`` raised
    ``IndexError: list index out of range`` (untyped), where the HF and vLLM backends (and the
    docs: "a closed LM refuses requests") give ``ClosedError``. A stand-in (no Ray needed)."""
    import itertools
    from collections import OrderedDict

    from ralmspec.errors import ClosedError
    from ralmspec.lm.ray_replicas import RayLMConfig, RayLMReplicas

    lm = object.__new__(RayLMReplicas)  # __init__ starts Ray actors
    lm.config, lm.name, lm.supports_sampling = RayLMConfig(replicas=2), "stand-in", True
    lm.ray = lm.cluster = None
    lm._own_cluster, lm.actors, lm._lock = False, [], threading.Lock()
    lm._pins, lm._pinned, lm._rr, lm._restarting = OrderedDict(), [0, 0], itertools.count(), set()
    lm.close()
    assert lm.closed
    with pytest.raises(ClosedError, match="closed"):
        lm.generate([[1, 2, 3]], 2, ["s"])
    lm.release("s")  # a late release stays harmless
