"""Sharded knowledge bases: the exact merge, in-process shards and Ray shard actors.

- Pure policy (no I/O): ranges, routing, and the merge property on random hit lists with ties.
- In process (no Ray): every kind split into 2 and 3 shards; ``exact``, ``ivf`` and ``bm25``
  equal the whole index bit for bit (ids, order, float64 scores, ``score``/``rank``); ``hnsw``
  equals the exact merge of its shards' own answers.
- Ray (skipped only when ray is not importable): a local loopback cluster for this module;
  2 and 3 Ray shards of the FULL embedded knowledge base (3,832 passages) equal the whole index
  for exact and bm25 on 260 queries (198 grounded questions, 56 passage snippets, edge cases),
  batched and one at a time; ivf/hnsw through Ray equal the in-process merge; a shard actor
  killed mid-search fails that search with RetrievalError, Ray restarts it, the next search is
  right again.
"""

from __future__ import annotations

import os
import platform
import threading
import time

import numpy as np
import pytest

from ralmspec.cluster import RayShardConfig, ray_available
from ralmspec.config import RetrievalConfig
from ralmspec.data.loaders import grounded_questions
from ralmspec.errors import ConfigError, RetrievalError
from ralmspec.retrieval.base import rank_hits
from ralmspec.retrieval.open import open_index
from ralmspec.retrieval.ray_shards import open_ray_sharded
from ralmspec.retrieval.shard_index import load_shard, shard_index
from ralmspec.retrieval.sharded import ShardRange, contiguous_ranges, merge_topk, route_ids
from tests.retrieval.conftest import KINDS, kb_config

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_ray = pytest.mark.skipif(not ray_available(), reason='ray is not installed (pip install -e ".[ray]")')


# --------------------------------------------------------------------------- pure policy


def test_contiguous_ranges_tile_the_ids():
    assert contiguous_ranges(10, 3) == (ShardRange(0, 4), ShardRange(4, 7), ShardRange(7, 10))
    assert contiguous_ranges(5, 5)[-1] == ShardRange(4, 5)
    for bad in (0, 6, True):
        with pytest.raises(ConfigError):
            contiguous_ranges(5, bad)


def test_route_ids_keeps_positions():
    ranges = contiguous_ranges(10, 3)
    routes = route_ids([9, 0, 4, 3, 7, 4], ranges)
    assert [(s, pos.tolist(), ids.tolist()) for s, pos, ids in routes] == \
           [(0, [1, 3], [0, 3]), (1, [2, 5], [4, 4]), (2, [0, 4], [9, 7])]


def test_merge_of_shard_topk_is_the_global_topk():
    """For random scores with many exact ties, merging every shard's own top-k gives the global
    top-k (ids, order, scores) for every k and every cut of the ids."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 60))
        scores = rng.integers(0, 6, n).astype(np.float64) / 4  # few distinct values: ties everywhere
        ids = np.arange(n)
        shards = int(rng.integers(1, min(n, 5) + 1))
        for k in (1, 3, n, n + 5):
            per = [rank_hits(ids[r.start:r.stop], scores[r.start:r.stop], k) for r in contiguous_ranges(n, shards)]
            assert merge_topk(per, k) == rank_hits(ids, scores, k), (trial, k)


# --------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def split_dirs(kb_index_dirs, tmp_path_factory):
    """(kind, shards) -> a sharded copy of the session's small index of that kind."""
    root = tmp_path_factory.mktemp("sharded")
    return {(kind, n): shard_index(kb_index_dirs[kind], str(root / f"{kind}-{n}"), n)
            for kind in KINDS for n in (2, 3)}


def _probe_ids(n: int) -> list[int]:
    return sorted({0, n - 1, *range(1, n, 7)})


@pytest.mark.parametrize("kind", ["exact", "ivf", "bm25"])
@pytest.mark.parametrize("shards", [2, 3])
def test_local_shards_equal_the_whole_index(kind, shards, split_dirs, kb_retrievers, kb_queries, encoder):
    whole = kb_retrievers[kind]
    sharded = open_index(split_dirs[(kind, shards)], kb_config(kind), encoder)
    assert sharded.n_shards == shards and sharded.kind == kind and len(sharded.corpus) == len(whole.corpus)
    for k in (1, 5, 40, 500):
        assert sharded.search_sync(kb_queries, k) == whole.search_sync(kb_queries, k), k
    for q in kb_queries[:8]:
        assert sharded.search_sync([q], 3) == whole.search_sync([q], 3)
        ids = _probe_ids(len(whole.corpus))
        assert sharded.score(q, ids) == whole.score(q, ids)
        assert sharded.rank(q, ids[::-1], k=4) == whole.rank(q, ids[::-1], k=4)
    with pytest.raises(ConfigError):
        sharded.score(kb_queries[0], [len(whole.corpus)])
    with pytest.raises(ConfigError):
        sharded.search_sync(kb_queries[:1], 0)


@pytest.mark.parametrize("shards", [2, 3])
def test_local_hnsw_shards_are_the_exact_merge_of_their_answers(shards, split_dirs, kb_retrievers, kb_queries,
                                                                encoder):
    d = split_dirs[("hnsw", shards)]
    cfg = kb_config("hnsw")
    sharded = open_index(d, cfg, encoder)
    parts = [load_shard(os.path.join(d, f"shard-{i:03d}"), cfg) for i in range(shards)]
    qv = encoder.encode_queries(kb_queries)
    for k in (1, 10):
        per = [p.search(qv, k) for p in parts]
        want = [merge_topk([rows[i] for rows in per], k) for i in range(len(kb_queries))]
        assert sharded.search_sync(kb_queries, k) == want
    # the scores are the canonical metric over the same stored vectors: the exact index's numbers
    q, ids = kb_queries[3], _probe_ids(len(sharded.corpus))
    assert sharded.score(q, ids) == kb_retrievers["exact"].score(q, ids)


def test_sharding_refuses_bad_input(kb_index_dirs, split_dirs, tmp_path):
    with pytest.raises(ConfigError, match="already a sharded index"):
        shard_index(split_dirs[("exact", 2)], str(tmp_path / "again"), 2)
    with pytest.raises(ConfigError, match="non-empty shards"):
        shard_index(kb_index_dirs["bm25"], str(tmp_path / "many"), 10_000)
    with pytest.raises(ConfigError, match="sharded 'exact' index"):
        open_index(split_dirs[("exact", 2)], kb_config("bm25"))


def test_index_build_cli_splits_or_builds_sharded_indexes(kb_index_dirs, tmp_path, capsys):
    from ralmspec.cli import main
    from ralmspec.retrieval.index import read_manifest

    out = tmp_path / "ivf-2"
    assert main(["index", "build", "--retriever", "ivf", "--shards", "2", "--from-index", kb_index_dirs["ivf"],
                 "--out", str(out)]) == 0
    m = read_manifest(str(out))
    assert m["kind"] == "ivf" and [(s["start"], s["stop"]) for s in m["shards"]] == [(0, 80), (80, 160)]
    assert main(["index", "build", "--retriever", "exact", "--shards", "2", "--from-index", kb_index_dirs["ivf"],
                 "--out", str(tmp_path / "x")]) == 2
    assert "use --retriever ivf" in capsys.readouterr().err
    # no --from-index: build the whole index (the embedded knowledge base here), then split it
    assert main(["index", "build", "--retriever", "bm25", "--shards", "3", "--out", str(tmp_path / "bm25-3")]) == 0
    m = read_manifest(str(tmp_path / "bm25-3"))
    assert len(m["shards"]) == 3 and m["global_stats"]["num_docs"] == m["n"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def many_queries(embedded_indexes) -> list[str]:
    corpus = embedded_indexes["exact"].corpus
    qs = [q.question for q in grounded_questions()]
    qs += [" ".join(corpus[i].text.split()[4:16]) for i in range(0, len(corpus), 70)]
    qs += ["", "the of and", "zzqxv wqqj", corpus[100].title, corpus[100].content]
    qs = list(dict.fromkeys(qs))
    assert len(qs) >= 200
    return qs


@pytest.fixture(scope="module")
def embedded_split(embedded_indexes, tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded-sharded")
    return {(kind, n): shard_index(embedded_indexes[kind].index_dir, str(root / f"{kind}-{n}"), n)
            for kind in ("exact", "bm25") for n in (2, 3)}


@needs_ray
@pytest.mark.parametrize("kind", ["exact", "bm25"])
def test_ray_shards_equal_the_whole_embedded_index(kind, ray_cluster, embedded_indexes, embedded_split,
                                                   many_queries, encoder):
    whole = embedded_indexes[kind]
    want = {k: whole.search_sync(many_queries, k) for k in (1, 20)}
    rng = np.random.default_rng(1)
    n = len(whole.corpus)
    for shards in (2, 3):
        # exact over 2 shards also carries an EMULATED pad split over the shard actors (each
        # calibrates its scan): the same answers
        pad = 4000 if (kind, shards) == ("exact", 2) else 0
        sharded = open_ray_sharded(embedded_split[(kind, shards)], RetrievalConfig(kind=kind, emulate_pad=pad),
                                   RayShardConfig(), encoder, shards=shards)
        try:
            assert [(i["start"], i["stop"]) for i in sharded.backend.infos] == \
                   [(r.start, r.stop) for r in contiguous_ranges(n, shards)]
            if pad:
                assert [i["pad"] for i in sharded.backend.infos] == [pad // 2] * 2
            for k, hits in want.items():
                assert sharded.search_sync(many_queries, k) == hits, (shards, k)
            for i in range(0, len(many_queries), 25):  # one at a time: the same answer as in a batch
                assert sharded.search_sync([many_queries[i]], 20) == [want[20][i]]
            for q in many_queries[::40]:
                ids = sorted(set(rng.integers(0, n, 30).tolist()) | {0, n - 1})
                assert sharded.score(q, ids) == whole.score(q, ids)
                assert sharded.rank(q, ids, k=5) == whole.rank(q, ids, k=5)
        finally:
            sharded.close()


@needs_ray
def test_ray_ivf_and_hnsw_shards_equal_the_in_process_merge(ray_cluster, split_dirs, kb_retrievers, kb_queries,
                                                             encoder):
    for kind in ("ivf", "hnsw"):
        cfg = kb_config(kind)
        local = open_index(split_dirs[(kind, 2)], cfg, encoder)
        remote = open_ray_sharded(split_dirs[(kind, 2)], cfg, RayShardConfig(), encoder)
        try:
            for k in (1, 10):
                got = remote.search_sync(kb_queries, k)
                assert got == local.search_sync(kb_queries, k)
                if kind == "ivf":  # split from one trained index: the unsharded IVF answer too
                    assert got == kb_retrievers["ivf"].search_sync(kb_queries, k)
        finally:
            remote.close()


@needs_ray
def test_ray_shard_killed_mid_search_fails_cleanly_then_recovers(ray_cluster, embedded_indexes, embedded_split,
                                                                 many_queries, encoder, monkeypatch, kill_during,
                                                                 when_sent):
    import ralmspec.cluster

    whole = embedded_indexes["exact"]
    qs = many_queries[:16]
    config = RayShardConfig(emulated_latency_s=2.5, call_timeout_s=20.0, start_timeout_s=170.0)
    waits: list[float] = []  # the restart waits' timeouts: a restart reloads the shard (a start)
    wait = ralmspec.cluster.wait_restarted
    monkeypatch.setattr(ralmspec.cluster, "wait_restarted", lambda *a: (waits.append(a[5]), wait(*a))[1])
    sharded = open_ray_sharded(embedded_split[("exact", 2)], RetrievalConfig(kind="exact"), config, encoder)
    try:
        before = sharded.backend.pids()
        sent = when_sent(sharded.backend)  # the search's calls are sent to both shards
        # killed 0.4 s after the search was sent (its queries' encoding comes first), while it is in
        # flight on both shards (each sleeps 2.5 s first)
        out = kill_during(lambda: sharded.search_sync(qs, 5), before[1], after_s=0.4, sent=sent)
        assert "result" not in out and isinstance(out["error"], RetrievalError) and "shard 1" in str(out["error"])
        assert sharded.search_sync(qs, 5) == whole.search_sync(qs, 5)  # waits for the restarted actor
        after = sharded.backend.pids()
        assert after[0] == before[0] and after[1] != before[1], "Ray restarted only the killed shard"
        assert waits and set(waits) == {config.start_timeout_s}
        ids = [5, 2000, 3000]
        assert sharded.score(qs[0], ids) == whole.score(qs[0], ids)
    finally:
        sharded.close()


@needs_ray
def test_shard_actors_report_their_memory_while_busy_and_trim_their_heaps(ray_cluster, embedded_indexes,
                                                                          embedded_split, many_queries, encoder,
                                                                          when_sent):
    """Each shard actor trims its own C heap (``malloc_trim_s``) and answers ``memory()`` from
    its stats concurrency group: with ONE call slot per actor, busy in a search that sleeps 6 s
    (EMULATED latency), the memory read still comes back while the search is in flight. An actor
    gone for good is a row with ``error``, never an exception."""
    config = RayShardConfig(emulated_latency_s=6.0, max_concurrency=1, malloc_trim_s=0.2, call_timeout_s=60.0)
    sharded = open_ray_sharded(embedded_split[("exact", 2)], RetrievalConfig(kind="exact"), config, encoder)
    try:
        pids = [i["pid"] for i in sharded.backend.infos]
        out: dict = {}
        submitted = when_sent(sharded.backend)  # the search's calls are sent
        t = threading.Thread(target=lambda: out.setdefault("hits", sharded.search_sync(many_queries[:8], 5)))
        t.start()
        assert submitted.wait(60)
        time.sleep(0.5)  # the search holds each actor's only call slot for 6 s
        rows = sharded.worker_memory(4.5)
        assert t.is_alive(), "the memory read waited for the search"
        assert [(r["role"], r["index"], r["pid"]) for r in rows] == [("kb_shard", 0, pids[0]), ("kb_shard", 1, pids[1])]
        assert all("error" not in r and r["rss_bytes"] > 1 << 20 for r in rows), rows
        t.join(60)
        assert out["hits"] == embedded_indexes["exact"].search_sync(many_queries[:8], 5)
        deadline = time.monotonic() + 30
        while GLIBC and time.monotonic() < deadline:
            rows = sharded.worker_memory(10.0)
            if all(r["heap_trim"]["calls"] >= 2 for r in rows):
                break
            time.sleep(0.1)
        for r in rows:
            trim = r["heap_trim"]
            assert (trim["interval_s"], trim["calls"] >= 2, r["heap"] is not None) == ((0.2, True, True) if GLIBC
                                                                                        else (0.0, False, False))
        sharded.backend.ray.kill(sharded.backend.actors[1], no_restart=True)
        deadline = time.monotonic() + 30  # ray.kill returns before the actor is gone: a read may still reach it
        while True:
            rows = sharded.worker_memory(5.0)
            if "error" in rows[1] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "error" not in rows[0] and rows[1]["error"] and set(rows[1]) == {"role", "index", "error"}, rows
    finally:
        sharded.close()


@needs_ray
def test_wrong_shard_count_is_a_config_error(ray_cluster, embedded_split, encoder):
    with pytest.raises(ConfigError, match="--shards 3 but the index"):
        open_ray_sharded(embedded_split[("bm25", 2)], RetrievalConfig(kind="bm25"), shards=3)


def test_ray_shard_config_refuses_nan_and_negatives():
    from ralmspec.cluster import RayShardConfig

    RayShardConfig(actor_cpus=0.5)
    for bad in ({"actor_cpus": float("nan")}, {"actor_cpus": -1.0}, {"emulated_latency_s": float("nan")},
                {"call_timeout_s": float("nan")}, {"start_timeout_s": 0}):
        with pytest.raises(ConfigError):  # NaN passed "< 0" checks (--shard-cpus nan)
            RayShardConfig(**bad)


@pytest.mark.parametrize("manifest", [{"shards": [{"dir": "x"}]}, {}, {"shards": [{"start": "a", "stop": 1}]},
                                      {"shards": 5}])
def test_a_malformed_shard_list_is_an_index_error(manifest):
    """A damaged sharded manifest was a KeyError / TypeError traceback."""
    from ralmspec.errors import IndexNotFoundError
    from ralmspec.retrieval.shard_index import shard_ranges

    with pytest.raises(IndexNotFoundError, match="malformed shard list"):
        shard_ranges(manifest)


def test_a_sharded_build_keeps_its_whole_index_locked_until_it_is_split(small_corpus, tmp_path, monkeypatch):
    """``build_sharded_index`` builds the whole index aside, then splits it. Built AS its locked
    staging folder, the whole index's publish swapped in an unlocked folder, so another process's
    build of the same output (``remove_stale_staging``) took it for a killed build's leftover and
    deleted it under the split. Here another process sweeps the moment the split starts: the
    whole index must still be there, and nothing is left beside the output after."""
    import subprocess
    import sys

    from ralmspec.retrieval import shard_index as module

    out = tmp_path / "kb"
    prefix = f".{out.name}.whole-"
    sweeps = []

    def split_after_a_sweep(src, out_dir, shards):
        sweep = ("import sys; from ralmspec.paths import remove_stale_staging; "
                 "print(len(remove_stale_staging(sys.argv[1], sys.argv[2])))")
        run = subprocess.run([sys.executable, "-c", sweep, str(tmp_path), prefix], capture_output=True, text=True,
                             timeout=120)
        sweeps.append(run.stdout.strip() or run.stderr)
        assert os.path.isfile(os.path.join(src, "manifest.json")), f"the whole index was swept: {sweeps}"
        return shard_index(src, out_dir, shards)

    monkeypatch.setattr(module, "shard_index", split_after_a_sweep)
    module.build_sharded_index(small_corpus, "bm25", str(out), 2, RetrievalConfig(kind="bm25"), show_progress=False)
    assert sweeps == ["0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kb"]
    assert (out / "manifest.json").is_file()
