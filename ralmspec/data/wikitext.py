"""WikiText (-2 or -103) -> titled ~100-word passages (how the embedded knowledge base is made).

WikiText is word-tokenised text: every punctuation mark is its own token, numbers are split as
``1 @,@ 000`` / ``3 @.@ 5`` and hyphenated words as ``guest @-@ starring``. An article starts with
a line `` = Title = `` after a blank line (a formula broken across lines can look like one
and is text); sections with `` = = Section = = `` (deeper levels add more ``=``).

:func:`detokenize` undoes the tokenisation enough to read naturally (``@-@``/``@,@``/``@.@`` are
joined back to ``-``, ``,``, ``.``; no space before ``, . ; : ! ? ) 's n't`` ...; no space inside
``( )`` or paired double quotes). The ``<unk>`` token (rare words replaced by WikiText) is KEPT:
dropping it would silently change the text ("Robert <unk> is an actor" -> "Robert is an actor").

:func:`split_passages` cuts every article's body (section headings dropped) into consecutive,
non-overlapping passages of ``words`` whitespace words (DPR-style); an article's last piece is
merged into the previous passage when it is shorter than ``min_words``. The result is a pure
function of the input text, so the embedded files are reproducible.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TITLE = re.compile(r"^ = (?!=)(.*) = $")
_HEADING = re.compile(r"^ (= )+.*( =)+ $")
_AT_TOKENS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_NO_SPACE_BEFORE = re.compile(r" (?=[,.;:!?)\]}%]|'s\b|'S\b|n't\b|'re\b|'ve\b|'m\b|'ll\b|'d\b|' )")
_NO_SPACE_AFTER = re.compile(r"(?<=[(\[{$]) ")


@dataclass(frozen=True)
class Article:
    title: str
    paragraphs: tuple[str, ...]  # detokenised body paragraphs, headings dropped


@dataclass(frozen=True)
class RawPassage:
    id: str
    title: str
    text: str


def detokenize(line: str) -> str:
    """Undo WikiText's word tokenisation on one line (see module docstring). Keeps ``<unk>``."""
    s = " " + line.strip() + " "
    for tok, rep in _AT_TOKENS:
        s = s.replace(tok, rep)
    s = s.strip()
    # Paired double quotes: the 1st, 3rd, ... open, the 2nd, 4th, ... close.
    words = s.split(" ")
    out: list[str] = []
    open_quote = False
    glue_next = False
    for w in words:
        if w == '"':
            if not open_quote:
                out.append('"')
                glue_next = True
            else:
                if out:
                    out[-1] = out[-1] + '"'
                else:
                    out.append('"')
            open_quote = not open_quote
            continue
        if glue_next and out:
            out[-1] = out[-1] + w
            glue_next = False
        else:
            out.append(w)
    s = " ".join(out)
    s = _NO_SPACE_BEFORE.sub("", s)
    s = _NO_SPACE_AFTER.sub("", s)
    return s


def parse_wikitext(raw: str) -> list[Article]:
    """Split a WikiText file into articles (title + body paragraphs), in file order."""
    articles: list[Article] = []
    title: str | None = None
    paras: list[str] = []
    lines = raw.split("\n")
    for i, line in enumerate(lines):
        # A title (or heading) follows a blank line: a formula broken across lines
        # ("... cut-off frequency of ωc\n = 1 rad / s and a nominal impedance k = \n 1 Ω") is text.
        alone = i == 0 or not lines[i - 1].strip()
        m = _TITLE.match(line) if alone else None
        if m:  # `` = = X = = `` does not match: ``(?!=)`` rejects sections
            if title is not None:
                articles.append(Article(title, tuple(paras)))
            title, paras = detokenize(m.group(1)), []
            continue
        if not line.strip() or (alone and _HEADING.match(line)):
            continue
        if title is None:
            continue  # text before the first title (none in WikiText)
        paras.append(detokenize(line))
    if title is not None:
        articles.append(Article(title, tuple(paras)))
    return articles


def split_passages(articles: list[Article], prefix: str, words: int = 100,
                   min_words: int = 25) -> list[RawPassage]:
    """Cut each article into ``words``-word passages (ids ``{prefix}-{article:03d}-{chunk:03d}``)."""
    if words < 1 or min_words < 0:
        raise ValueError("words must be >= 1 and min_words >= 0")
    out: list[RawPassage] = []
    for a_idx, art in enumerate(articles):
        toks = " ".join(art.paragraphs).split()
        chunks = [toks[i:i + words] for i in range(0, len(toks), words)]
        if len(chunks) > 1 and len(chunks[-1]) < min_words:
            tail = chunks.pop()
            chunks[-1] = chunks[-1] + tail
        for c_idx, chunk in enumerate(chunks):
            out.append(RawPassage(f"{prefix}-{a_idx:03d}-{c_idx:03d}", art.title, " ".join(chunk)))
    return out


def read_passages(path: str, prefix: str, words: int = 100) -> tuple[list[Article], list[RawPassage]]:
    """One WikiText file (UTF-8): its articles (:func:`parse_wikitext`) and their passages
    (:func:`split_passages` with ids under ``prefix``)."""
    with open(path, encoding="utf-8") as f:
        articles = parse_wikitext(f.read())
    return articles, split_passages(articles, prefix=prefix, words=words)
