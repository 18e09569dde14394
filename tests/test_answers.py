"""answer_match: case-, punctuation- and whitespace-insensitive whole-word containment."""

from __future__ import annotations

import pytest

from ralmspec.answers import answer_match, contains_answer, normalize


def test_normalize():
    assert normalize("  The TANG-dynasty,  (618–907)! ") == "the tang dynasty 618 907"
    assert normalize("Dallas, Texas.") == "dallas texas"
    assert normalize("Pathé") == "pathé"  # accents are kept


@pytest.mark.parametrize("text,answers,expected", [
    ("The dynasty was the Tang Dynasty.", ["Tang dynasty"], True),
    ("It is in DALLAS,TEXAS", ["Dallas, Texas"], True),
    ("Francis Bacon painted it", ["francis  bacon"], True),
    ("a tangent line", ["Tang"], False),  # whole words only
    ("in 1990s", ["1990"], False),
    ("nothing here", ["Tang", "Dallas"], False),
    ("anything", [], False),
    ("anything", ["", "!!"], False),  # an answer that normalizes to nothing never matches
])
def test_contains_answer(text, answers, expected):
    assert contains_answer(text, answers) is expected


def test_answer_match_fraction_ignores_items_without_answers():
    texts = ["Tang", "Song", "whatever"]
    assert answer_match(texts, [["Tang"], ["Tang"], []]) == 0.5
    assert answer_match(texts, [[], [], []]) is None
    with pytest.raises(ValueError):
        answer_match(texts, [["x"]])
