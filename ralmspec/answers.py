"""Answer quality: does a generated text contain a gold answer?

``normalize`` lower-cases, turns every punctuation or symbol character into a space and folds
white space, so "Tang dynasty." / "the TANG-dynasty" / "Tang  Dynasty" all compare equal on the
words. ``contains_answer`` is a whole-word containment of a normalized answer in the normalized
text ("Tang" matches "the Tang dynasty" but not "tangent"). ``answer_match`` is the fraction of
requests whose text contains at least one of its gold answers.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence


def normalize(text: str) -> str:
    """Lower-case; punctuation and symbols -> spaces; accents kept; white space folded."""
    text = unicodedata.normalize("NFKC", text).lower()
    out = [" " if unicodedata.category(ch)[0] in "PSZC" else ch for ch in text]
    return " ".join("".join(out).split())


def contains_answer(text: str, answers: Sequence[str]) -> bool:
    """True if the normalized ``text`` contains one normalized answer as whole words."""
    hay = f" {normalize(text)} "
    return any(f" {a} " in hay for a in (normalize(x) for x in answers) if a)


def answer_match(texts: Sequence[str], answers: Sequence[Sequence[str]]) -> float | None:
    """Fraction of ``texts`` containing one of their ``answers``; ``None`` if no item has answers."""
    if len(texts) != len(answers):
        raise ValueError(f"{len(texts)} texts but {len(answers)} answer lists")
    scored = [contains_answer(t, a) for t, a in zip(texts, answers) if a]
    return sum(scored) / len(scored) if scored else None
