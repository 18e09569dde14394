"""Query encoding cost, one query per forward (``single``) vs fixed-shape shared forwards
(``pinned``: 8 rows x a length bucket), for verification-sized batches, interleaved in one process:

    python experiments/encoder_batching.py --device cpu --threads 1 --rounds 5
    python experiments/encoder_batching.py --device cuda --rounds 20 --json enc.json   # a GPU

The queries are real: 24-word windows of the embedded knowledge base's passages (about the
32 LM tokens of a default ``--query-len``), different in every round so no cache helps (both
encoders run with cache 0). Each round encodes a fresh batch of k queries with each mode back to
back; medians and minima per batch. It also checks that the pinned vectors of a batch are the
bits of the same queries encoded alone (the property identity rests on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

BATCHES = (1, 2, 4, 8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: library default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--words", type=int, default=24, help="words per query")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import numpy as np
    import torch

    from ralmspec.data.loaders import default_corpus
    from ralmspec.retrieval.encoder import QueryEncoder

    if a.threads:
        torch.set_num_threads(a.threads)
    encoders = {mode: QueryEncoder(device=a.device, batching=mode, cache_size=0) for mode in ("single", "pinned")}
    corpus = default_corpus()
    windows = (" ".join(p.text.split()[:a.words]) for p in corpus if len(p.text.split()) >= a.words)

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    for enc in encoders.values():  # warm-up (kernels, allocator)
        enc.encode_queries([next(windows) for _ in range(8)])
    times = {(mode, k): [] for mode in encoders for k in BATCHES}
    for r in range(a.rounds):
        for k in BATCHES:
            batch = [next(windows) for _ in range(k)]
            for mode, enc in encoders.items():
                sync()
                t = time.perf_counter()
                enc.encode_queries(batch)
                sync()
                times[(mode, k)].append((time.perf_counter() - t) * 1e3)
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
    check = [next(windows) for _ in range(8)]
    pinned = encoders["pinned"]
    together = pinned.encode_queries(check)
    alone = np.stack([pinned.encode_queries([q])[0] for q in check])
    med = {key: statistics.median(v) for key, v in times.items()}
    rows = [{"queries": k, "mode": mode, "median_ms": round(med[(mode, k)], 2),
             "min_ms": round(min(times[(mode, k)]), 2)} for k in BATCHES for mode in encoders]
    print(f"device {a.device}, threads {torch.get_num_threads()}, {a.rounds} rounds, {a.words}-word queries")
    print("| queries | single median ms | pinned median ms | pinned / single |")
    print("|---|---|---|---|")
    for k in BATCHES:
        s, p = med[("single", k)], med[("pinned", k)]
        print(f"| {k} | {s:.1f} | {p:.1f} | {p / s:.2f} |")
    same = bool(np.array_equal(together, alone))
    print(f"pinned: 8 queries together == each alone, bit for bit: {same}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"device": a.device, "threads": torch.get_num_threads(), "rounds": a.rounds,
                       "words": a.words, "rows": rows, "pinned_batch_invariant": same}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
