"""The RSS each Ray worker keeps after its heap trims, from a soak's JSON (``experiments/soak.py
--json``, run with ``-- --lm-replicas N`` and/or ``--shards N``: every ``/v1/stats`` sample then
holds ``memory.workers``, one row per LM replica / knowledge-base shard actor).

Each worker trims its own heap every ``--malloc-trim-s`` (60 s by default) on its own clock, and
``/v1/stats`` is sampled every ``--sample`` seconds, so each minute of a worker holds a low (just
after its trim: the residue, what the trim could not give back) and a high. Printed per worker
every ``--every`` minutes, then a least-squares slope of each worker's residue over each third of
the run after the warm-up, and the trims each worker made (``heap_trim``).

    python worker_residue.py soak-workers.json.gz
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "2026-12-06-long-soak"))
from residue import MIB, load_soak, slope  # noqa: E402  (the server's residue, read the same way)


def per_worker_minute(doc: dict) -> dict[str, dict[int, dict]]:
    """"role index" -> minute (1-based) -> {"low", "high": RSS MiB, "in_use": heap in use MiB at
    the minute's end}; rows with an ``error`` (a worker down or silent) are skipped."""
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for x in doc["server_stats"]:
        for w in (x.get("memory") or {}).get("workers") or []:
            if "rss_bytes" not in w:
                continue
            b, m = w["rss_bytes"] / MIB, int(x["t"] // 60) + 1
            r = out[f"{w['role']} {w['index']}"].setdefault(m, {"low": b, "high": b, "in_use": None})
            r["low"], r["high"] = min(r["low"], b), max(r["high"], b)
            if w.get("heap"):
                r["in_use"] = w["heap"]["in_use_bytes"] / MIB
    return dict(out)


def last_trims(doc: dict) -> dict[str, dict]:
    """"role index" -> its last ``heap_trim`` report (trims made, seconds spent, longest)."""
    out: dict[str, dict] = {}
    for x in doc["server_stats"]:
        for w in (x.get("memory") or {}).get("workers") or []:
            if w.get("heap_trim"):
                out[f"{w['role']} {w['index']}"] = w["heap_trim"]
    return out


def report(path: str, every: int) -> None:
    doc = load_soak(path)
    s, cfg = doc["summary"], doc["settings"]
    workers = per_worker_minute(doc)
    print(f"{path}: {cfg['command']}")
    warm = int(cfg["warmup_minutes"]) + 1
    for name, rows in sorted(workers.items()):
        last = max(m for m in rows if m <= cfg["minutes"])
        marks = [m for m in [warm] + list(range(every, last + 1, every)) if m in rows and m >= warm]
        print(f"{name}: minute " + " ".join(f"{m:>6}" for m in marks))
        print(f"{'':>{len(name)}}  RSS low " + " ".join(f"{rows[m]['low']:6.0f}" for m in marks))
        print(f"{'':>{len(name)}}  RSS high" + " ".join(f"{rows[m]['high']:6.0f}" for m in marks))
        print(f"{'':>{len(name)}}  in use  " + " ".join(f"{rows[m]['in_use']:6.0f}" if rows[m]["in_use"] is not None
                                                      else f"{'-':>6}" for m in marks))
        span = [m for m in sorted(rows) if warm <= m <= last]
        thirds = [span[i * len(span) // 3:(i + 1) * len(span) // 3] for i in range(3)]
        fits = [f"min {t[0]}-{t[-1]}: {slope([(m, rows[m]['low']) for m in t]):+.2f}" for t in thirds if len(t) > 1]
        print(f"{'':>{len(name)}}  residue slope (MiB/min): " + "; ".join(fits))
    for name, t in sorted(last_trims(doc).items()):
        print(f"{name}: {t}")
    print(f"requests {s['requests']}, errors {s['errors']}, naive mismatches {s['naive_mismatches']} "
          f"({s['checked_answers']} answers checked), {s['req_per_s_after_warmup']:.3f} req/s after the warm-up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("soak_json", nargs="+", help="soak.py --json outputs")
    parser.add_argument("--every", type=int, default=10, help="print every N minutes")
    args = parser.parse_args()
    for path in args.soak_json:
        report(path, args.every)


if __name__ == "__main__":
    main()
