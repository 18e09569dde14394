#!/usr/bin/env python3
"""Regenerate the embedded default data files in ``ralmspec/data/embedded/`` from /work/shared/data.

    python scripts/make_embedded_data.py [--data /work/shared/data] [--out ralmspec/data/embedded]

Writes (gzip, mtime 0, so the bytes are reproducible):
- ``passages.jsonl.gz``: WikiText-103 test + valid articles (the same Wikipedia articles as
  WikiText-2's test + valid, with far fewer ``<unk>``) cut into ~100-word titled passages
  (see ``ralmspec.data.wikitext``), one ``{"id", "title", "text"}`` per line, test first.
- ``nq_open_dev.jsonl.gz``: every NQ-open dev question as ``{"question", "answers"}``.
- with ``--embeddings``: ``passage_embeddings.npy`` + ``passage_embeddings.json``, the
  all-MiniLM-L6-v2 vectors of the passages in float16 with their manifest (encoder, corpus hash),
  so that the first use of a dense index skips the minutes of encoding
  (``ralmspec/retrieval/index.py``). Takes a few CPU minutes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
from dataclasses import asdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ralmspec.data.wikitext import read_passages  # noqa: E402


def write_jsonl_gz(path: str, rows: list[dict]) -> None:
    """Deterministic gzip (no file name, mtime 0) of one compact JSON object per line."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                  "ralmspec", "data", "embedded"))
    ap.add_argument("--words", type=int, default=100)
    ap.add_argument("--embeddings", action="store_true", help="also encode the passages (a few CPU minutes)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    passages = []
    for split in ("test", "valid"):
        articles, ps = read_passages(os.path.join(args.data, "wikitext-103", f"wiki.{split}.tokens"),
                                     prefix=f"wt103-{split}", words=args.words)
        print(f"wikitext-103/wiki.{split}.tokens: {len(articles)} articles -> {len(ps)} passages")
        passages += [asdict(p) for p in ps]
    write_jsonl_gz(os.path.join(args.out, "passages.jsonl.gz"), passages)

    questions = []
    with open(os.path.join(args.data, "nq_open", "NQ-open.dev.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                questions.append({"question": row["question"], "answers": list(row["answer"])})
    write_jsonl_gz(os.path.join(args.out, "nq_open_dev.jsonl.gz"), questions)
    print(f"nq_open/NQ-open.dev.jsonl: {len(questions)} questions")

    names = ["passages.jsonl.gz", "nq_open_dev.jsonl.gz"]
    if args.embeddings:
        from ralmspec.data.loaders import load_corpus
        from ralmspec.retrieval.encoder import QueryEncoder
        from ralmspec.retrieval.index import write_shipped_embeddings

        corpus = load_corpus(os.path.join(args.out, "passages.jsonl.gz"))
        write_shipped_embeddings(corpus, QueryEncoder(), args.out)
        names += ["passage_embeddings.npy", "passage_embeddings.json"]
    for name in names:
        path = os.path.join(args.out, name)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        print(f"{name}: {os.path.getsize(path)} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
