"""One decode step, interleaved in one process: the static runner's 1-row step vs the batched
runner's fixed-shape step with all its rows live and with one live row (a lone request).

    python experiments/batched_step.py --model smollm2 --threads 2 --rounds 7

Each round runs the three steps back to back (so machine load hits them alike) on slots holding
a ``--prompt``-token prefix, then rolls the slots back; medians and minima over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: library default)")
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch

    from ralmspec.lm.hf import BATCH_ROWS
    from ralmspec.lm.models import load_lm
    from ralmspec.lm.static import StaticRunner

    if a.threads:
        torch.set_num_threads(a.threads)
    lm = load_lm(a.model)
    one = StaticRunner(lm.model, max_len=512, capacity=1)
    bat = StaticRunner(lm.model, max_len=512, capacity=BATCH_ROWS, batch_rows=BATCH_ROWS)
    rng = random.Random(0)
    slot1, slots = one.open(), [bat.open() for _ in range(BATCH_ROWS)]
    tok = torch.full((BATCH_ROWS,), 1234)
    cases = {"static, 1 row": lambda: one.step_logits(slot1, 1234),
             f"batched, {BATCH_ROWS} live rows": lambda: bat._step_rows(slots, tok),
             "batched, 1 live row": lambda: bat._step_rows(slots[:1], tok)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for runner, slot in [(one, slot1)] + [(bat, s) for s in slots]:
            runner.prefill_block(slot, [rng.randrange(1000, 30000) for _ in range(a.prompt)], last=True,
                                 want_hidden=False)
        for _ in range(a.rounds + 1):  # the first round warms up
            for name, step in cases.items():
                t = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - t) * 1e3)
            for slot in [slot1, *slots]:
                slot.length = a.prompt
    rows = {name: {"median_ms": round(statistics.median(v[1:]), 1), "min_ms": round(min(v[1:]), 1)}
            for name, v in times.items()}
    for name, r in rows.items():
        print(f"{name:>22}: median {r['median_ms']:.1f} ms, min {r['min_ms']:.1f} ms", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "threads": torch.get_num_threads(), "batch_rows": BATCH_ROWS,
                       "prompt": a.prompt, "rounds": a.rounds, "torch": torch.__version__, "steps": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
