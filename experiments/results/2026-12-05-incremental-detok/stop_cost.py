"""Event-loop time of the loops' stop-string check (``RalmContext.finished`` after every chunk):
``StopWatch`` (session 12, a window after the longest stop-free prefix) vs decoding and searching
the whole answer at every chunk (before).

    python experiments/results/2026-12-05-incremental-detok/stop_cost.py

SmolLM2's tokenizer, a 4096-token answer (multi-byte text, then this repo's README) grown in
chunks of 4, one stop string that never occurs (the check runs after every chunk to the end);
then the same with a rollback of 1-3 chunks after every 8th chunk (speculation). Same answers.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from ralmspec.engine.stop import StopWatch, find_stop, stable_text
from ralmspec.lm.models import load_lm

REPO = Path(__file__).resolve().parents[3]


def growth(ids: list[int], rollbacks: bool) -> list[list[int]]:
    rng, out, n, k = random.Random(0), [], 0, 0
    while n < len(ids):
        k += 1
        if rollbacks and k % 8 == 0 and n > 12:
            n -= 4 * rng.randrange(1, 4)
        n = min(len(ids), n + 4)
        out.append(ids[:n])
    return out


def main():
    tok = load_lm("smollm2").tokenizer
    ids = tok.encode("Zürich – 東京 🎸🎸 naïve café. " * 50 + (REPO / "README.md").read_text())[:4096]
    stops = ["\u2603 never here"]
    rows = []
    for rollbacks in (False, True):
        steps = growth(ids, rollbacks)
        t = time.perf_counter()
        full = [find_stop(stable_text(tok, g), stops) is not None for g in steps]
        before = time.perf_counter() - t
        watch = StopWatch(tok, stops)
        t = time.perf_counter()
        windowed = [watch.completed(g) for g in steps]
        after = time.perf_counter() - t
        assert full == windowed
        rows.append({"tokens": len(ids), "checks": len(steps), "rollbacks": rollbacks,
                     "whole_answer_s": round(before, 4), "stop_watch_s": round(after, 4),
                     "ratio": round(before / after, 1)})
        print(json.dumps(rows[-1]), flush=True)
    Path(__file__).with_name("stop_cost.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
