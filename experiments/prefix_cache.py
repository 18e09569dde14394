"""The LM's shared prefix blocks (--lm-prefix-cache-mib), on vs off, on the same engine.

Grounded questions on the embedded knowledge base, naive loop, requests ``--concurrency`` at a
time (as a server's scheduler runs them). Each ``--repeat`` asks every question that many times
(a closed-loop load test's clients cycle through one question list, so passages recur across
requests; ``--repeat 1`` is the no-repeat case). Off and on alternate ``--rounds`` times, each
round from cold caches (``reset_caches``); every answer is compared between off and on.
Reports wall seconds, prompt positions computed by prefill forwards, and positions imported.

    python experiments/prefix_cache.py --model smollm2 --threads 2 --n 8 --repeat 1 2 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ralmspec.config import EngineConfig, GenerationConfig  # noqa: E402
from ralmspec.data.loaders import grounded_questions  # noqa: E402
from ralmspec.engine.core import build_engine  # noqa: E402
from ralmspec.threads import set_threads  # noqa: E402


async def serve(engine, questions: list[str], gen: GenerationConfig, concurrency: int) -> list[list[int]]:
    sem = asyncio.Semaphore(concurrency)

    async def one(q: str) -> list[int]:
        async with sem:
            return (await engine.generate(q, gen=gen, speculate=False)).token_ids

    return list(await asyncio.gather(*(one(q) for q in questions)))


def measure(engine, questions, gen, concurrency: int, mib: int) -> tuple[dict, list[list[int]]]:
    lm = engine.lm
    engine.reset_caches()
    lm.prefix_blocks.capacity_bytes = mib << 20
    computed, shared = lm.prefill_tokens_computed, lm.shared_tokens
    t = time.perf_counter()
    tokens = asyncio.run(serve(engine, questions, gen, concurrency))
    wall = time.perf_counter() - t
    return {"mib": mib, "wall_s": round(wall, 3), "prefill_computed": lm.prefill_tokens_computed - computed,
            "shared_imported": lm.shared_tokens - shared, "tokens": sum(map(len, tokens))}, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=8, help="distinct grounded questions")
    p.add_argument("--repeat", type=int, nargs="+", default=[1, 2], help="times each question is asked")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--mib", type=int, default=512, help="the table's size when on")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    set_threads(a.threads)
    engine = build_engine(EngineConfig(model=a.model, lm_prefix_cache_mib=a.mib), show_progress=False)
    gen = GenerationConfig(max_new_tokens=a.max_new_tokens)
    base = [q.question for q in grounded_questions()[: a.n]]
    rows = []
    for rep in a.repeat:
        questions = [q for _ in range(rep) for q in base]  # every question once, then again
        for r in range(a.rounds):
            order = (0, a.mib) if r % 2 == 0 else (a.mib, 0)
            outs = {}
            for mib in order:
                row, outs[mib] = measure(engine, questions, gen, a.concurrency, mib)
                row |= {"repeat": rep, "round": r, "requests": len(questions)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            if outs[0] != outs[a.mib]:
                print("ERROR: answers differ with the table on and off", file=sys.stderr)
                return 1
    for rep in a.repeat:
        off = [x for x in rows if x["repeat"] == rep and x["mib"] == 0]
        on = [x for x in rows if x["repeat"] == rep and x["mib"] == a.mib]
        speed = sum(x["wall_s"] for x in off) / sum(x["wall_s"] for x in on)
        saved = 1 - on[0]["prefill_computed"] / off[0]["prefill_computed"]
        print(f"repeat {rep}: off/on wall {speed:.2f}x, prefill positions computed {off[0]['prefill_computed']} -> "
              f"{on[0]['prefill_computed']} ({saved:.0%} fewer), answers identical")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
