#!/usr/bin/env python3
"""Write the held-out workload of the decoupled-speculation study (issue 12) from /work/shared/data.

    python scripts/make_heldout_workload.py [--data /work/shared/data] [--out /tmp/heldout]

- ``wt2.jsonl``: WikiText-2 test + valid (word level, rare words as ``<unk>``) cut into ~100-word
  titled passages exactly as the embedded knowledge base is cut (``ralmspec.data.wikitext``):
  3,832 passages. The embedded KB is WikiText-103's text of the same articles, so this corpus is
  NOT the one the engine was tuned on (different tokenization, ``<unk>`` everywhere).
- ``q8.jsonl``: NQ-open dev questions 100-107 (never used by the engine's own studies, which
  take the first questions or the grounded set).

Then: ``ralmspec bench --questions OUT/q8.jsonl --corpus OUT/wt2.jsonl --retriever exact --n 8
--max-new-tokens 64 --threads 1 --emulate-pad 1000000 --ablations`` (the first use builds the
index of the corpus: ~3 CPU minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ralmspec.data.wikitext import read_passages  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--out", default="/tmp/heldout")
    ap.add_argument("--first", type=int, default=100, help="first NQ-open dev question (0-based)")
    ap.add_argument("--n", type=int, default=8, help="number of questions")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    passages = [p for split in ("test", "valid")
                for p in read_passages(os.path.join(args.data, "wikitext-2", f"{split}.txt"), f"wt2-{split}")[1]]
    with open(os.path.join(args.out, "wt2.jsonl"), "w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps(asdict(p)) + "\n")
    with open(os.path.join(args.data, "nq_open", "NQ-open.dev.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][args.first:args.first + args.n]
    with open(os.path.join(args.out, f"q{args.n}.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"question": r["question"], "answers": r["answer"]}) + "\n")
    print(f"{len(passages)} passages -> {args.out}/wt2.jsonl; {len(rows)} questions -> {args.out}/q{args.n}.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
