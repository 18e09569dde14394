"""Event-loop time a stream spends detokenizing a long answer: the windowed
``IncrementalDetokenizer`` (session 12) vs decoding the whole answer at every push (before).

    python experiments/results/2026-12-05-incremental-detok/cost.py

SmolLM2's tokenizer and the tiny model's, a 4096-token answer (this repo's README with
multi-byte text), pushed in verified chunks of 1, 4 and 8 tokens; both produce the same text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ralmspec.engine.stream import IncrementalDetokenizer
from ralmspec.lm.models import load_lm

REPO = Path(__file__).resolve().parents[3]


class WholeDecode:
    """The algorithm before session 12: decode every token so far at every push."""

    def __init__(self, tok):
        self.tok, self.ids, self.sent = tok, [], ""

    def push(self, ids):
        self.ids += ids
        text = self.tok.decode(self.ids).rstrip("\ufffd")
        if text.startswith(self.sent) and len(text) > len(self.sent):
            delta, self.sent = text[len(self.sent):], text
            return delta
        return ""

    def finish(self):
        text = self.tok.decode(self.ids)
        delta, self.sent = text[len(self.sent):], text
        return delta


def run(cls, tok, ids, size):
    d = cls(tok)
    t = time.perf_counter()
    out = "".join(d.push(ids[i:i + size]) for i in range(0, len(ids), size)) + d.finish()
    return time.perf_counter() - t, out


def main():
    text = "Zürich – 東京 🎸🎸 naïve café. " * 50 + (REPO / "README.md").read_text()
    rows = []
    for model in ("smollm2", "tiny"):
        tok = load_lm(model).tokenizer
        ids = tok.encode(text)[:4096]
        for size in (1, 4, 8):
            before, a = run(WholeDecode, tok, ids, size)
            after, b = run(IncrementalDetokenizer, tok, ids, size)
            assert a == b == tok.decode(ids)
            rows.append({"tokenizer": model, "tokens": len(ids), "chunk": size, "whole_decode_s": round(before, 4),
                         "windowed_s": round(after, 4), "ratio": round(before / after, 1)})
            print(json.dumps(rows[-1]), flush=True)
    Path(__file__).with_name("cost.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
