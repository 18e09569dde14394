"""Per-minute memory of a soak (``experiments/soak.py --json``), from the server's own
``/v1/stats`` memory samples: RSS, the C heap in use and freed-but-kept, the prefix table, the
encoder cache, and what the periodic heap trims gave back.

    python heap_table.py soak-no-trim.json soak-trim.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "2026-12-06-long-soak"))
from residue import MIB, load_soak  # noqa: E402  (plain or gzipped, as the repo keeps them)


def table(path: str) -> None:
    doc = load_soak(path)
    last: dict[int, dict] = {}
    for x in doc["server_stats"]:
        if x.get("memory"):
            last[int(x["t"] // 60) + 1] = x["memory"]
    print(path, doc["settings"]["command"])
    print(f"{'minute':>6} {'RSS':>6} {'heap in use':>11} {'heap free':>9} {'prefix':>6} {'enc':>5} "
          f"{'trims':>5} {'trim max ms':>11} {'released':>8}")
    for m, mem in sorted(last.items()):
        h, t = mem["heap"], mem.get("heap_trim") or {}
        print(f"{m:>6} {mem['rss_bytes'] // MIB:>6} {h['in_use_bytes'] // MIB:>11} {h['free_bytes'] // MIB:>9} "
              f"{mem['lm']['prefix_bytes'] // MIB:>6} {mem['encoder_cache']['size']:>5} {t.get('calls', '-'):>5} "
              f"{1000 * t['max_seconds'] if t else float('nan'):>11.1f} "
              f"{t['released_bytes'] // MIB if t else '-':>8}")
    s = doc["summary"]
    print(f"requests {s['requests']}, errors {s['errors']}, naive mismatches {s['naive_mismatches']}, "
          f"p50 {s['p50_s']:.2f} s, p95 {s['p95_s']:.2f} s, {s['req_per_s_after_warmup']:.3f} req/s after the "
          f"warm-up; RSS {s['rss_after_warmup_mib']} -> {s['rss_end_mib']} MiB "
          f"({100 * s['rss_growth_after_warmup']:+.1f}%)\n")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        table(p)
