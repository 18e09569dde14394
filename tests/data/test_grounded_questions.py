"""The embedded grounded question set: every item is answerable from one cited KB passage."""

from __future__ import annotations

import json

import pytest

from ralmspec.data.loaders import Question, default_corpus, embedded_path, load_questions

GROUNDED_QA = "embedded/grounded_qa.jsonl"
KEYS = {"question", "answers", "article", "passage"}


@pytest.fixture(scope="module")
def items() -> list[dict]:
    with open(embedded_path(GROUNDED_QA), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def by_id() -> dict:
    return {p.source_id: p for p in default_corpus()}


def test_project_loader_reads_it(items):
    qs = load_questions(embedded_path(GROUNDED_QA))  # the extra keys article/passage are ignored
    assert len(qs) == len(items) >= 60
    assert all(isinstance(q, Question) for q in qs)
    assert [(q.question, q.answers) for q in qs] == [(it["question"], it["answers"]) for it in items]


def test_shape_and_uniqueness(items):
    for it in items:
        assert set(it) == KEYS, it
        assert isinstance(it["question"], str) and it["question"].strip() == it["question"] != ""
        assert isinstance(it["answers"], list) and it["answers"], it
        assert all(isinstance(a, str) and a.strip() for a in it["answers"]), it
        assert len(set(it["answers"])) == len(it["answers"]), it
    questions = [it["question"] for it in items]
    assert len(set(questions)) == len(questions)


def test_no_unk(items):
    for it in items:
        for s in [it["question"], it["article"], *it["answers"]]:
            assert "<unk>" not in s, it


def test_grounded_in_cited_passage(items, by_id):
    titles = {p.title for p in default_corpus()}
    for it in items:
        assert it["article"] in titles, it
        p = by_id.get(it["passage"])
        assert p is not None, f"unknown passage id {it['passage']}"
        assert p.title == it["article"], it
        text = p.text.lower()
        for a in it["answers"]:
            assert a.lower() in text, f"{a!r} not in passage {it['passage']}"


def test_spread_over_articles(items):
    per_article: dict[str, int] = {}
    for it in items:
        per_article[it["article"]] = per_article.get(it["article"], 0) + 1
    assert len(per_article) >= 40
    assert max(per_article.values()) <= 3
