#!/usr/bin/env python3
"""Quick retrieval benchmark on the embedded knowledge base (not a test; numbers vary by machine).

    RALMSPEC_HOME=/tmp/rbench python scripts/bench_retrieval.py [--kinds exact,hnsw,ivf,bm25] [--reps 5]

1. Builds every kind's index of the full embedded corpus into a fresh root (the first dense
   build encodes the corpus; the others reuse the embeddings) and prints the build times.
2. Search latency per batch for batch sizes 1, 8, 64 (NQ-open dev questions), with query vectors
   already cached (retrieval only), plus the cost of encoding one query.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ralmspec.config import RetrievalConfig  # noqa: E402
from ralmspec.data.loaders import default_corpus, default_questions  # noqa: E402
from ralmspec.retrieval.encoder import QueryEncoder  # noqa: E402
from ralmspec.retrieval.index import build_index, default_index_root, index_dir_name, load_retriever  # noqa: E402
from ralmspec.data.loaders import corpus_sha256  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="exact,hnsw,ivf,bm25")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch + FAISS threads (0: library default)")
    args = ap.parse_args()
    if args.threads:
        import faiss
        import torch
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        print(f"threads: {args.threads}")
    print(f"load average at start: {os.getloadavg()}", flush=True)
    corpus = default_corpus()
    t = time.perf_counter()
    enc = QueryEncoder()
    print(f"encoder load: {time.perf_counter() - t:.2f}s", flush=True)
    root = default_index_root()
    h = corpus_sha256(corpus)
    questions = [q.question for q in default_questions()]
    for kind in args.kinds.split(","):
        cfg = RetrievalConfig(kind=kind)
        d = os.path.join(root, index_dir_name(kind, cfg, h))
        cpu = time.process_time()
        if not os.path.exists(os.path.join(d, "manifest.json")):
            build_index(corpus, kind, d, cfg, enc, show_progress=False, corpus_source="embedded")
        cpu = time.process_time() - cpu
        m = json.load(open(os.path.join(d, "manifest.json")))
        print(f"[{kind}] n={m['n']} build wall: {json.dumps(m['build_seconds'])}, process CPU {cpu:.1f}s "
              f"(embeddings reused: {m.get('embeddings_reused_from') is not None})", flush=True)
        r = load_retriever(d, cfg, enc)
        for bs in (1, 8, 64):
            times, cpus = [], []
            for rep in range(args.reps):
                batch = questions[rep * 64: rep * 64 + bs]
                if kind != "bm25":
                    enc.encode_queries(batch)  # warm the query cache: time retrieval only
                t, c = time.perf_counter(), time.process_time()
                r.search_sync(batch, args.k)
                times.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
            med, cmed = statistics.median(times), statistics.median(cpus)
            print(f"[{kind}] batch {bs:3d}, k={args.k}: wall median {med * 1e3:8.2f} ms/batch "
                  f"({med * 1e3 / bs:7.3f} ms/query), min {min(times) * 1e3:.2f} ms; "
                  f"CPU median {cmed * 1e3:8.2f} ms/batch", flush=True)
    fresh = enc.with_cache(0)
    qs = questions[1000:1020]
    t, c = time.perf_counter(), time.process_time()
    fresh.encode_queries(qs)
    print(f"query encoding (uncached, one at a time): wall {(time.perf_counter() - t) / len(qs) * 1e3:.1f} ms/query, "
          f"CPU {(time.process_time() - c) / len(qs) * 1e3:.1f} ms/query")
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
