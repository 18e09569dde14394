"""Timeline of one request: naive vs speculative variants, each on its own panel (LM chunks,
guesses, verification rounds and rollbacks on a shared time axis), from the requests' traces.

    python -m experiments.timeline --model tiny --emulate-pad 1000000 --threads 1 --question 3 \
        --variants all,all-sync --out experiments/results/DIR/timeline.png

Writes the PNG and, beside it, ``timeline.jsonl`` (every request's full result with its trace).
Each request starts from cold cross-request caches (``RalmEngine.reset_caches``), as in bench,
and each variant carries OS^3's cost memory (``engine.costs``) from its own warm-up request alone
(variants with one guesser shared it: ``all-sync`` started from the costs and acceptance ``all``
had just measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import replace

VARIANTS = {
    "all": {},
    "all-sync": {"async_verify": False},
    "all-eager": {"eager_verify": True},
    "async-s3": {"os3": False, "fixed_stride": 3},  # every round verified beside decoding
    "+prefetch": {"os3": False, "fixed_stride": 3, "async_verify": False},
}


def main(argv: list[str] | None = None) -> int:
    from ralmspec.config import EngineConfig, GenerationConfig, RetrievalConfig
    from ralmspec.data.loaders import grounded_questions
    from ralmspec.engine.core import build_engine
    from ralmspec.threads import set_threads
    from experiments.plots import plot_timeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--retriever", default="exact")
    p.add_argument("--emulate-pad", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--question", type=int, default=0, help="index into the grounded questions")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--variants", default="all,all-sync", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", required=True, help="PNG path")
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    questions = grounded_questions()
    if not 0 <= a.question < len(questions):
        print(f"error: --question must be in [0, {len(questions) - 1}]", file=sys.stderr)
        return 2
    set_threads(a.threads or None)
    cfg = EngineConfig(model=a.model, retrieval=RetrievalConfig(kind=a.retriever, emulate_pad=a.emulate_pad),
                       generation=GenerationConfig(max_new_tokens=a.max_new_tokens))
    engine = build_engine(cfg, show_progress=False)  # EMULATED with --emulate-pad (retrieval/open.py)
    q = questions[a.question].question

    costs: dict[str, dict] = {v: {} for v in names}  # OS^3's cost memory per variant

    async def go():
        out = []
        for warm in (True, False):  # one warm-up pass (not plotted), then the measured one
            runs = []
            engine.reset_caches()
            runs.append(("naive", (await engine.generate(q, speculate=False)).to_dict()))
            for v in names:
                engine.reset_caches()
                engine.costs = costs[v]
                spec = replace(cfg.speculation, enabled=True, **VARIANTS[v])
                runs.append((v, (await engine.generate(q, spec=spec, speculate=True)).to_dict()))
            out = runs if not warm else out
        return out

    runs = asyncio.run(go())
    naive = runs[0][1]
    for name, r in runs[1:]:
        if r["token_ids"] != naive["token_ids"]:
            print(f"error: {name} tokens differ from the naive loop", file=sys.stderr)
            return 3
    kb = (f"EMULATED {len(engine.retriever.corpus) + a.emulate_pad:,}" if a.emulate_pad
          else f"real {len(engine.retriever.corpus):,} passages")
    titles = [(f"{name}: {r['latency_s']:.2f} s" + ("" if name == "naive" else
               f" ({naive['latency_s'] / r['latency_s']:.2f}x, acceptance "
               f"{(r['stats'].get('acceptance_rate') or 0):.2f}, overlap {r['stats'].get('overlap', 0):.2f})"), r)
              for name, r in runs]
    footer = (f"{time.strftime('%Y-%m-%d')} · {platform.node()} {os.cpu_count()} CPUs · model {a.model} · "
              f"{a.retriever} over {kb} · question {a.question} · {a.max_new_tokens} new tokens · "
              f"threads {a.threads} · outputs identical")
    plot_timeline(titles, a.out, footer)
    with open(os.path.join(os.path.dirname(a.out) or ".", "timeline.jsonl"), "w") as f:
        for name, r in runs:
            f.write(json.dumps({"variant": name, **r}) + "\n")
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
