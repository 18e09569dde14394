"""Texts for kNN-LM datastores (``knnlm build --corpus``) and perplexity (``knnlm eval --text``).

A text is a list of documents (strings); each document is tokenised and windowed on its own.
:func:`load_documents` accepts

- a named part of the shipped WikiText-103 text, ``wt103:SPLIT[:PART]``: ``SPLIT`` is ``test``
  (60 articles) or ``valid`` (60 articles), ``PART`` is ``all`` (default), ``first-half`` or
  ``second-half``. A document is one article, ``title + "\\n" + body`` (the body = the article's
  embedded passages joined by spaces, exactly what ``corpus_documents`` makes of the default
  corpus). The halves cut the body's whitespace words at ``len // 2``: the first half keeps the
  title, the second half is the remaining words alone (no title, starting mid-sentence): the
  halves are disjoint parts of the article (the title in the first only), and what a kNN-LM can
  use is what an article repeats (the in-domain setting of ``docs/knnlm.md``), sometimes verbatim (the
  first test article's body repeats sentences of its lead: ``knnlm eval`` reports that overlap);
- a passage corpus (``.jsonl[.gz]`` / ``.tsv[.gz]``, ``ralmspec.data.loaders``): consecutive
  passages with the same title form one document (``corpus_documents``);
- a raw WikiText file (``.tokens``, e.g. ``wiki.test.tokens``): one document per article, its
  tokenisation undone by ``ralmspec.data.wikitext`` (``<unk>`` kept);
- any other file: UTF-8 plain text, the whole file one document.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from ralmspec.errors import ConfigError

WIKITEXT_PREFIX = "wt103"
WIKITEXT_SPLITS = ("test", "valid")
WIKITEXT_PARTS = ("all", "first-half", "second-half")


def wikitext_names() -> list[str]:
    """Every accepted ``wt103:SPLIT:PART`` name."""
    return [f"{WIKITEXT_PREFIX}:{s}:{p}" for s in WIKITEXT_SPLITS for p in WIKITEXT_PARTS]


def embedded_articles(split: str) -> list[tuple[str, str]]:
    """``(title, body)`` of every article of the shipped WikiText-103 ``split``, in file order."""
    from ralmspec.data.loaders import default_corpus

    if split not in WIKITEXT_SPLITS:
        raise ConfigError(f"unknown WikiText-103 split {split!r}; choose one of {', '.join(WIKITEXT_SPLITS)}")
    articles: OrderedDict[str, tuple[str, list[str]]] = OrderedDict()
    for p in default_corpus():
        parts = p.source_id.split("-")  # wt103-{split}-{article:03d}-{chunk:03d}
        if len(parts) == 4 and parts[1] == split:
            articles.setdefault(parts[2], (p.title, []))[1].append(p.text)
    return [(title, " ".join(texts)) for title, texts in articles.values()]


def halve(title: str, body: str, part: str) -> str:
    """One document of an article: ``all`` = title + body; ``first-half`` = title + the first
    ``len(words) // 2`` words; ``second-half`` = the remaining words, without the title."""
    if part == "all":
        return f"{title}\n{body}"
    words = body.split()
    cut = len(words) // 2
    if part == "first-half":
        return f"{title}\n{' '.join(words[:cut])}"
    if part == "second-half":
        return " ".join(words[cut:])
    raise ConfigError(f"unknown WikiText-103 part {part!r}; choose one of {', '.join(WIKITEXT_PARTS)}")


def load_documents(source: str) -> list[str]:
    """The documents of ``source`` (module doc); ConfigError for an unknown name, a missing,
    unreadable or empty file."""
    if source.startswith(f"{WIKITEXT_PREFIX}:"):
        fields = source.split(":")[1:]
        if not 1 <= len(fields) <= 2:
            raise ConfigError(f"bad text name {source!r}; use one of {', '.join(wikitext_names())}")
        part = fields[1] if len(fields) == 2 else "all"
        if part not in WIKITEXT_PARTS:
            raise ConfigError(f"unknown WikiText-103 part {part!r} in {source!r}; choose one of "
                              f"{', '.join(WIKITEXT_PARTS)}")
        return [halve(title, body, part) for title, body in embedded_articles(fields[0])]
    if source.endswith((".jsonl", ".jsonl.gz", ".tsv", ".tsv.gz")):
        from ralmspec.data.loaders import load_corpus
        from ralmspec.knnlm.datastore import corpus_documents

        return corpus_documents(load_corpus(source))
    if not os.path.isfile(source):
        raise ConfigError(f"{source}: file not found (a text is a file or one of {', '.join(wikitext_names())})")
    try:
        with open(source, encoding="utf-8-sig") as f:  # a leading byte-order mark is not text
            raw = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read as UTF-8 text: {exc}") from exc
    if source.endswith(".tokens"):
        from ralmspec.data.wikitext import parse_wikitext

        docs = [f"{a.title}\n{' '.join(a.paragraphs)}" for a in parse_wikitext(raw)]
    else:
        docs = [raw]
    if not any(d.strip() for d in docs):
        raise ConfigError(f"{source}: the text is empty")
    return docs


__all__ = ["load_documents", "embedded_articles", "halve", "wikitext_names", "WIKITEXT_SPLITS", "WIKITEXT_PARTS"]
