"""Scale-out measurement: search latency and throughput of an EMULATED 1M-vector exact knowledge
base served by 1, 2 and 4 Ray shard actors, and the cost of the Ray hop itself.

    python -m experiments.shards                          # 1/2/4 shards, 1M EMULATED (a few minutes)
    python -m experiments.shards --pad 200000 --shards 1 2 --queries 24   # quick smoke run
    python -m experiments.shards --scan-rate --dim 768 --n 200000          # FAISS flat ns/vector (sizing)

What is measured (labelled EMULATED everywhere):

- The knowledge base is the real embedded exact index (3,832 passages) split into S shards, plus
  ``--pad`` synthetic unit vectors split evenly over the S shard actors (``emulated.PaddedShard``:
  every search also runs a real flat scan over the shard's part of the pad and throws it away).
  Answers are the real index's; the cost is that of an S-way sharded flat index of
  ``3,832 + pad`` vectors. Queries are encoded once before timing (encoding is the caller's work
  and the same for every S).
- ``in-process``: the same EMULATED knowledge base in this process (``PaddedCostRetriever`` over
  the whole exact index, one thread), the unsharded baseline.
- For every S: latency of one query (p50/p90), of one batch of ``--batch`` queries (a
  verification batch), and throughput (queries/s) with ``--clients`` threads each sending
  single-query searches.
- Ray hop: the real 3,832-passage index without pad, in-process vs one Ray shard, single query:
  what a fan-out costs beyond the scan (serialisation, two process hops, scheduling).

Every shard actor and every calling thread runs one FAISS/torch thread (``OMP_NUM_THREADS=1``);
the local Ray cluster gets ``--ray-cpus`` CPUs (this machine: 2 cores shared with the driver, so
more shards than cores mostly add hops).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np


def _pct(xs: Sequence[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _latencies(fn: Callable[[list[str]], Any], batches: Sequence[list[str]]) -> list[float]:
    out = []
    for b in batches:
        t = time.perf_counter()
        fn(b)
        out.append(time.perf_counter() - t)
    return out


def _throughput(fn: Callable[[list[str]], Any], queries: Sequence[str], clients: int, seconds: float) -> float:
    """Queries/s with ``clients`` threads each sending single-query searches for ``seconds``."""
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def client(c: int) -> None:
        i = c
        while time.perf_counter() < stop:
            fn([queries[i % len(queries)]])
            done[c] += 1
            i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(done) / (time.perf_counter() - t)


def measure(name: str, search: Callable[[list[str], int], Any], queries: list[str], k: int, batch: int,
            clients: int, seconds: float) -> dict[str, Any]:
    one = lambda qs: search(qs, k)  # noqa: E731
    for q in queries[:3]:  # warm-up (first GEMM, torch import in the actors, ...)
        one([q])
    one(queries[:batch])
    single = _latencies(one, [[q] for q in queries])
    batches = _latencies(one, [queries[i:i + batch] for i in range(0, len(queries) - batch + 1, batch)])
    qps = _throughput(one, queries, clients, seconds)
    row = {"config": name, "single_p50_ms": 1e3 * statistics.median(single), "single_p90_ms": 1e3 * _pct(single, 90),
           f"batch{batch}_p50_ms": 1e3 * statistics.median(batches), f"qps_{clients}_clients": qps}
    print(f"  {name:<34} single p50 {row['single_p50_ms']:8.2f} ms  p90 {row['single_p90_ms']:8.2f} ms  "
          f"batch{batch} p50 {row[f'batch{batch}_p50_ms']:8.2f} ms  {qps:7.1f} q/s ({clients} clients)", flush=True)
    return row


def scan_rate(n: int, dim: int, repeats: int = 20) -> dict[str, float]:
    """FAISS IndexFlatIP over ``n`` random ``dim``-d vectors, one thread: ns per vector per query."""
    import faiss

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    index = faiss.IndexFlatIP(dim)
    for s in range(0, n, 100_000):
        x = rng.standard_normal((min(100_000, n - s), dim), dtype=np.float32)
        index.add(x)
    q = rng.standard_normal((repeats + 2, dim), dtype=np.float32)
    index.search(q[:2], 20)  # warm
    ts = []
    for i in range(repeats):
        t = time.perf_counter()
        index.search(q[2 + i:3 + i], 20)
        ts.append(time.perf_counter() - t)
    t = time.perf_counter()
    index.search(q[:8], 20)
    t8 = time.perf_counter() - t
    med = statistics.median(ts)
    out = {"n": n, "dim": dim, "one_query_ms": 1e3 * med, "ns_per_vector": 1e9 * med / n,
           "batch8_ms": 1e3 * t8, "ns_per_vector_query_batch8": 1e9 * t8 / (8 * n),
           "bytes_per_vector": 4 * dim, "GB_per_s": 4 * dim * n / med / 1e9}
    print(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pad", type=int, default=1_000_000 - 3_832, help="EMULATED synthetic vectors (total)")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--queries", type=int, default=48, help="grounded questions used as queries")
    p.add_argument("--k", type=int, default=20, help="top-k of every search (the engine's prefetch)")
    p.add_argument("--batch", type=int, default=8, help="queries of one verification batch")
    p.add_argument("--clients", type=int, default=4, help="concurrent single-query callers (throughput)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each throughput run")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--scan-rate", action="store_true", help="only measure FAISS flat ns/vector (--n, --dim)")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=768)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # one OpenMP thread in EVERY thread (omp_set_num_threads only sets the calling thread's), here
    # and in the Ray workers (they inherit the environment): throughput clients do not oversubscribe
    os.environ["OMP_NUM_THREADS"] = "1"
    if a.scan_rate:
        scan_rate(a.n, a.dim)
        return 0

    from ralmspec.cluster import RayCluster, RayShardConfig
    from ralmspec.config import RetrievalConfig
    from ralmspec.data.loaders import default_corpus, grounded_questions
    from ralmspec.retrieval.emulated import PaddedCostRetriever, build_pad_index, emulated_label
    from ralmspec.retrieval.encoder import QueryEncoder
    from ralmspec.retrieval.index import ensure_default_index, load_retriever
    from ralmspec.retrieval.ray_shards import open_ray_sharded
    from ralmspec.retrieval.shard_index import ensure_sharded_index
    from ralmspec.retrieval.index import EMBEDDED_SOURCE
    from ralmspec.threads import set_threads

    set_threads(1)
    cfg = RetrievalConfig(kind="exact")
    encoder = QueryEncoder()
    queries = [q.question for q in grounded_questions()[: a.queries]]
    encoder.encode_queries(queries)  # encoded once, before any timing
    whole = load_retriever(ensure_default_index("exact", cfg, encoder, show_progress=False), cfg, encoder)
    label = emulated_label(len(whole.corpus), a.pad)
    print(f"knowledge base: {label}; k={a.k}, batch={a.batch}, {len(queries)} queries, "
          f"Ray CPUs {a.ray_cpus}, 1 thread per shard", flush=True)
    rows = []
    t = time.perf_counter()
    rows.append(measure("real 3,832, in-process (no pad)", whole.search_sync, queries, a.k, a.batch, a.clients,
                        a.seconds / 2))
    if a.pad:
        padded = PaddedCostRetriever(whole, build_pad_index(a.pad, encoder.dim))
        rows.append(measure("EMULATED, in-process, unsharded", padded.search_sync, queries, a.k, a.batch,
                            a.clients, a.seconds))
        del padded
    cluster = RayCluster(RayShardConfig(num_cpus=a.ray_cpus))
    try:
        for s in a.shards:
            d = ensure_sharded_index(default_corpus(), "exact", s, cfg, encoder, show_progress=False,
                                     corpus_source=EMBEDDED_SOURCE)
            if s == 1:  # the Ray hop alone: the real index, no pad, one actor
                r = open_ray_sharded(d, cfg, RayShardConfig(), encoder)
                rows.append(measure("real 3,832, 1 Ray shard (no pad)", r.search_sync, queries, a.k, a.batch,
                                    a.clients, a.seconds / 2))
                r.close()
            r = open_ray_sharded(d, replace(cfg, emulate_pad=a.pad), RayShardConfig(start_timeout_s=600), encoder)
            rows.append(measure(f"EMULATED, {s} Ray shard{'s' if s > 1 else ''}", r.search_sync, queries, a.k,
                                a.batch, a.clients, a.seconds))
            r.close()
    finally:
        cluster.close()
    by_name = {r["config"]: r for r in rows}
    ray1 = by_name.get("real 3,832, 1 Ray shard (no pad)")
    hop = ray1["single_p50_ms"] - by_name["real 3,832, in-process (no pad)"]["single_p50_ms"] if ray1 else None
    out = {"knowledge_base": label, "k": a.k, "batch": a.batch, "queries": len(queries), "ray_cpus": a.ray_cpus,
           "threads_per_shard": 1, "cpus": os.cpu_count(), "rows": rows,
           "ray_hop_single_ms": hop, "wall_s": time.perf_counter() - t,
           "date": time.strftime("%Y-%m-%d"), "command": "python -m experiments.shards " + " ".join(argv or sys.argv[1:])}
    if hop is not None:
        print(f"Ray hop (1 shard minus in-process, single query, no pad): {hop:.2f} ms")
    print(f"wall {out['wall_s']:.0f}s")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
