"""Time the candidate paths of an exact flat index per batch size on THIS machine.

    python -m experiments.flat_scan_paths --n 1000000 --dim 384 --k 36 --batches 1,2,4,8,16 --reps 5

Builds ``n`` random unit vectors (the EMULATED pad's generator), then times, for every batch size,
FAISS's own flat search (one scan per query below its BLAS threshold), one GEMM over all vectors
(``gemm_top_ip``) and the block-by-block product (``blocked_top_ip``), interleaved per repetition,
and prints the medians in milliseconds. ``FlatScan`` makes the same comparison online (its first
calls of every batch class) and keeps the faster batch path; this script shows the whole curve.
Threads: torch and FAISS one each (``--threads``), as ``ralmspec bench --threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=36, help="candidates per query (k + re-scoring margin)")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    if a.n < 1 or a.dim < 1 or a.k < 1 or a.reps < 1 or not batches or min(batches) < 1:
        ap.error("--n, --dim, --k, --reps and every batch size must be >= 1")

    import faiss
    import numpy as np
    import torch

    from ralmspec.retrieval.dense import blocked_top_ip, flat_ip_view, gemm_top_ip
    from ralmspec.retrieval.emulated import build_pad_index

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    print(f"building {a.n:,} x {a.dim} random unit vectors ...", flush=True)
    index = build_pad_index(a.n, a.dim)
    vectors = flat_ip_view(index)
    tensor = torch.from_numpy(vectors)
    paths = {"faiss": lambda q: index.search(q, a.k), "gemm": lambda q: gemm_top_ip(tensor, q, a.k),
             "blocked": lambda q: blocked_top_ip(vectors, q, a.k)}
    rng = np.random.default_rng(1)
    print("| queries | " + " | ".join(f"{p} ms" for p in paths) + " |")
    print("|---|" + "---|" * len(paths))
    for b in batches:
        q = rng.standard_normal((b, a.dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        seconds: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(a.reps):
            for name, fn in paths.items():
                t = time.perf_counter()
                fn(q)
                seconds[name].append(time.perf_counter() - t)
        print(f"| {b} | " + " | ".join(f"{1000 * statistics.median(v):.0f}" for v in seconds.values()) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
