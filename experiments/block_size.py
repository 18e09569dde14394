"""The LM's canonical prefill block size B (ralmspec/lm/hf.py), measured on the engine's own loop.

Every call of the HF backend recomputes the prompt block that holds its last position (1 to B
rows; the full blocks before it are reused), and a passage switch recomputes the prompt from the
passage on in blocks of B rows: a small B makes the first cheaper and the second dearer
(smaller GEMMs). This runs the grounded questions through the naive loop and the speculative
one for each B, one LM over the same weights per B, the B's taking turns round by round, every
run from cold caches (``reset_caches``), and reports seconds per answer, the LM's prefill and
decode seconds, the prompt positions computed, and whether each B's speculative answers equal
its naive ones. Answers may differ between two B's (a block's bits depend on its rows: the
reason B is fixed per backend), so their tokens are counted, not required equal.

    python experiments/block_size.py --blocks 16,32,64 --n 8 --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ralmspec.config import EngineConfig, GenerationConfig  # noqa: E402
from ralmspec.data.loaders import grounded_questions  # noqa: E402
from ralmspec.engine.core import RalmEngine, build_engine  # noqa: E402
from ralmspec.lm.hf import HFLanguageModel  # noqa: E402
from ralmspec.threads import set_threads  # noqa: E402


class TimedLM(HFLanguageModel):
    """The HF backend with its calls' prefill and decode seconds summed (``_account``)."""

    prefill_s = 0.0
    decode_s = 0.0

    def _account(self, stats) -> None:
        super()._account(stats)
        self.prefill_s += stats.prefill_s
        self.decode_s += stats.decode_s


def lm_with_block(lm: HFLanguageModel, block: int) -> TimedLM:
    """A backend over ``lm``'s model and tokenizer with prefill blocks of ``block`` positions
    (its own sessions and shared prefix blocks: none of another B's KV is ever reused)."""
    return TimedLM(lm.model, lm.tokenizer, eos_token_id=lm.eos_token_id, stop_token_ids=lm.stop_token_ids,
                   max_context=lm.max_context, device=lm.device, block_size=block, runner=lm.runner.name,
                   prefix_cache_bytes=lm.prefix_blocks.capacity_bytes)


def run(engine: RalmEngine, questions: list[str], gen: GenerationConfig, speculate: bool) -> tuple[dict, list]:
    lm = engine.lm
    engine.reset_caches()
    before = (lm.prefill_s, lm.decode_s, lm.prefill_tokens_computed, lm.decode_steps)
    t = time.perf_counter()
    results = [engine.generate_sync(q, gen=gen, speculate=speculate) for q in questions]
    wall = time.perf_counter() - t
    tokens = sum(len(r.token_ids) for r in results)
    row = {"mode": "speculative" if speculate else "naive", "s_per_answer": round(wall / len(questions), 3),
           "ms_per_token": round(1000 * wall / max(tokens, 1), 1), "tokens": tokens,
           "lm_prefill_s": round(lm.prefill_s - before[0], 2), "lm_decode_s": round(lm.decode_s - before[1], 2),
           "prefill_positions": lm.prefill_tokens_computed - before[2], "decode_steps": lm.decode_steps - before[3],
           "speculated": sum(int(r.stats.get("speculated", 0)) for r in results)}
    return row, results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--blocks", default="16,32,64", help="comma list of block sizes")
    p.add_argument("--threads", type=int, default=None, help="torch / FAISS threads (default: the library's)")
    p.add_argument("--n", type=int, default=8, help="grounded questions (the first n)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-speculative", action="store_true", help="the naive loop only")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    blocks = [int(b) for b in a.blocks.split(",")]
    if a.threads:
        set_threads(a.threads)
    cfg = EngineConfig(model=a.model)
    base = build_engine(cfg, show_progress=False)
    engines = {b: RalmEngine(lm_with_block(base.lm, b), base.retriever, cfg) for b in blocks}
    gen = replace(cfg.generation, max_new_tokens=a.max_new_tokens)
    questions = [q.question for q in grounded_questions()[: a.n]]
    rows, answers, bad = [], {}, []
    for r in range(a.rounds):
        for b in (blocks if r % 2 == 0 else blocks[::-1]):
            naive_row, naive = run(engines[b], questions, gen, speculate=False)
            new_rows = [naive_row]
            if not a.no_speculative:
                spec_row, spec = run(engines[b], questions, gen, speculate=True)
                same = [x.token_ids == y.token_ids for x, y in zip(spec, naive)]
                spec_row["identical"] = sum(same)
                if not all(same):
                    bad.append((b, r))
                new_rows.append(spec_row)
            answers[b] = [x.token_ids for x in naive]
            for row in new_rows:
                row |= {"block": b, "round": r, "n": len(questions)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    ref = blocks[-1]
    print(f"\n{'B':>4} {'mode':>12} {'s/answer':>9} {'ms/token':>9} {'prefill s':>9} {'decode s':>9} "
          f"{'positions':>9}  answers == B {ref}")
    for b in blocks:
        for mode in ("naive", "speculative"):
            mine = [x for x in rows if x["block"] == b and x["mode"] == mode]
            if not mine:
                continue
            k = len(mine)
            same = sum(x == y for x, y in zip(answers[b], answers[ref]))
            print(f"{b:>4} {mode:>12} {sum(x['s_per_answer'] for x in mine) / k:9.2f} "
                  f"{sum(x['ms_per_token'] for x in mine) / k:9.1f} {sum(x['lm_prefill_s'] for x in mine) / k:9.1f} "
                  f"{sum(x['lm_decode_s'] for x in mine) / k:9.1f} {mine[0]['prefill_positions']:>9}  "
                  f"{same}/{len(questions)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "rows": rows, "answers": answers}, indent=1))
    if bad:
        print(f"ERROR: speculative != naive at (block, round) {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
