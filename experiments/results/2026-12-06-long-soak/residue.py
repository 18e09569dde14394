"""The RSS a periodic heap trim leaves behind, minute by minute, from a soak's JSON
(``experiments/soak.py --json``; its server trims every ``--malloc-trim-s``, 60 s by default).

RSS is sampled every ``--sample`` seconds, so each minute holds a low (just after that minute's
trim) and a high (just before the next). The low is the residue: what the trim could not give
back. Printed every ``--every`` minutes with the heap in use (``/v1/stats`` memory.heap) and the
residue's growth over the previous block, in MiB per minute; then a least-squares slope of the
residue over each third of the run after the warm-up.

    python residue.py soak-trim-110min.json.gz ../2026-12-06-heap-trim/soak-trim-60min.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json

MIB = 1 << 20


def load_soak(path: str) -> dict:
    """A soak's JSON (``soak.py --json``), plain or gzipped (``.gz``: how the repo keeps them)."""
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return json.load(f)


def per_minute(doc: dict) -> dict[int, dict]:
    """minute (1-based) -> {"low", "high": RSS MiB, "in_use": heap in use MiB at the minute's end}."""
    out: dict[int, dict] = {}
    for t, b in doc["rss"]:
        m = out.setdefault(int(t // 60) + 1, {"low": b / MIB, "high": b / MIB, "in_use": None})
        m["low"], m["high"] = min(m["low"], b / MIB), max(m["high"], b / MIB)
    for x in doc["server_stats"]:
        heap = (x.get("memory") or {}).get("heap")
        if heap and int(x["t"] // 60) + 1 in out:
            out[int(x["t"] // 60) + 1]["in_use"] = heap["in_use_bytes"] / MIB
    return out


def slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")


def report(path: str, every: int) -> None:
    doc = load_soak(path)
    s, cfg = doc["summary"], doc["settings"]
    rows = per_minute(doc)
    last = max(m for m in rows if m <= cfg["minutes"])  # whole minutes of load (the tail is the naive check)
    print(f"{path}: {cfg['command']}")
    print(f"{'minute':>6} {'RSS low':>8} {'RSS high':>8} {'heap in use':>11} {'residue MiB/min':>15}")
    prev = None
    warm = int(cfg["warmup_minutes"]) + 1
    for m in [warm] + list(range(every, last + 1, every)):
        r = rows.get(m)
        if r is None or (prev is not None and m <= prev[0]):
            continue
        rate = f"{(r['low'] - prev[1]) / (m - prev[0]):+15.2f}" if prev else f"{'':>15}"
        in_use = f"{r['in_use']:11.0f}" if r["in_use"] is not None else f"{'-':>11}"
        print(f"{m:>6} {r['low']:8.0f} {r['high']:8.0f} {in_use} {rate}")
        prev = (m, r["low"])
    span = [m for m in sorted(rows) if warm <= m <= last]
    thirds = [span[i * len(span) // 3:(i + 1) * len(span) // 3] for i in range(3)]
    fits = [f"min {t[0]}-{t[-1]}: {slope([(m, rows[m]['low']) for m in t]):+.2f}" for t in thirds if len(t) > 1]
    print("residue slope (MiB/min, least squares): " + "; ".join(fits))
    print(f"requests {s['requests']}, errors {s['errors']}, naive mismatches {s['naive_mismatches']} "
          f"({s['checked_answers']} answers checked), stream violations {s['stream_prefix_violations']}, "
          f"repeat mismatches {s['repeat_mismatches']}, {s['req_per_s_after_warmup']:.3f} req/s after the warm-up\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+")
    p.add_argument("--every", type=int, default=10, help="print every N minutes")
    a = p.parse_args()
    for path in a.json:
        report(path, a.every)
