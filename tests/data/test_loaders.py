"""Corpus / question loaders: formats, the embedded defaults, and every error path."""

from __future__ import annotations

import gzip
import json

import pytest

from ralmspec.data.corpus import Corpus, Passage
from ralmspec.data.loaders import (Question, corpus_sha256, default_corpus, default_questions, load_corpus,
                                   load_questions, save_corpus)
from ralmspec.errors import ConfigError


def _write(path, text: str, gz: bool = False):
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_corpus_title_and_id_optional(tmp_path):
    p = _write(tmp_path / "c.jsonl", '{"id": "a", "title": "T", "text": "one"}\n\n{"text": "two"}\n{"id": 7, "text": "x"}\n')
    c = load_corpus(p)
    assert list(c) == [Passage(0, "T", "one", "a"), Passage(1, "", "two", "1"), Passage(2, "", "x", "7")]
    assert c[0].content == "T\none"


def test_jsonl_gz_corpus(tmp_path):
    p = _write(tmp_path / "c.jsonl.gz", json.dumps({"id": "a", "title": "Tï", "text": "ünïcode"}) + "\n", gz=True)
    assert load_corpus(p)[0] == Passage(0, "Tï", "ünïcode", "a")


@pytest.mark.parametrize("header,row", [("id\ttext\ttitle", "d1\tsome text\tA Title"),
                                        ("id\ttitle\ttext", "d1\tA Title\tsome text"),
                                        (None, "d1\tsome text\tA Title")])
def test_tsv_corpus_header_detection(tmp_path, header, row):
    lines = ([header] if header else []) + [row, 'd2\t"quoted\ttab"\tB']
    if header == "id\ttitle\ttext":
        lines[-1] = 'd2\tB\t"quoted\ttab"'
    c = load_corpus(_write(tmp_path / "c.tsv", "\n".join(lines) + "\n"))
    assert list(c) == [Passage(0, "A Title", "some text", "d1"), Passage(1, "B", "quoted\ttab", "d2")]


@pytest.mark.parametrize("header", ["docid\tpassage\ttitle", "pid\tcontents", "id\tbody", "_id\ttitle\ttext"])
def test_a_header_with_other_column_names_is_an_error_not_a_passage(tmp_path, header):
    """It was read as the DPR order: a passage titled 'title' whose text was 'passage'."""
    p = _write(tmp_path / "c.tsv", f"{header}\nd1\tsome text\tT\n")
    with pytest.raises(ConfigError, match=r"c\.tsv:1: .*looks like a header.*id, text and optionally title"):
        load_corpus(p)


def test_a_first_passage_is_still_a_passage(tmp_path):
    """Only a line of column names is taken for a header: a short first passage is read."""
    c = load_corpus(_write(tmp_path / "c.tsv", "1\ttext\ttitle\n2\tbody\tname\n"))
    assert list(c) == [Passage(0, "title", "text", "1"), Passage(1, "name", "body", "2")]


@pytest.mark.parametrize("gz", [False, True])
def test_a_byte_order_mark_is_not_text(tmp_path, gz):
    """A UTF-8 BOM (Windows / spreadsheet exports): a TSV header it prefixed was not recognised
    and became a passage ('text' titled 'title'); a JSONL file was refused; a question kept it."""
    z = ".gz" if gz else ""
    tsv = load_corpus(_write(tmp_path / f"c.tsv{z}", "\ufeffid\ttext\ttitle\nd1\tsome text\tT\n", gz))
    assert list(tsv) == [Passage(0, "T", "some text", "d1")]
    jsonl = load_corpus(_write(tmp_path / f"c.jsonl{z}", '\ufeff{"id": "a", "text": "one"}\n', gz))
    assert list(jsonl) == [Passage(0, "", "one", "a")]
    assert load_questions(_write(tmp_path / "q.txt", "\ufeffwho?\n")) == [Question("who?", [])]


def test_save_and_hash_round_trip(tmp_path):
    c = Corpus([Passage(0, "T", "a", "x"), Passage(1, "", "b\nc", "y")])
    path = str(tmp_path / "s.jsonl.gz")
    save_corpus(c, path)
    assert list(load_corpus(path)) == list(c)
    assert corpus_sha256(load_corpus(path)) == corpus_sha256(c)
    assert corpus_sha256(Corpus([Passage(0, "T", "a", "x"), Passage(1, "", "b c", "y")])) != corpus_sha256(c)


@pytest.mark.parametrize("name,content,match", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": broken\n', r"bad\.jsonl:2: invalid JSON"),
    ("notext.jsonl", '{"text": "ok"}\n\n{"title": "x"}\n', r"notext\.jsonl:3: .*'text'"),
    ("list.jsonl", '["a", "b"]\n', r"list\.jsonl:1: expected a JSON object"),
    ("title.jsonl", '{"text": "a", "title": 3}\n', r"title\.jsonl:1: 'title' must be a string"),
    ("surrogate.jsonl", '{"text": "ok"}\n{"text": "caf\\udce9"}\n', r"surrogate\.jsonl:2: 'text' is not valid Unicode"),
    ("empty.jsonl", "\n\n", r"empty\.jsonl: the corpus is empty"),
    ("cols.tsv", "id\ttext\ttitle\nd1\ttext\tT\nd2\tonly-one-col-and\tT\textra\n", r"cols\.tsv:3: expected"),
    ("hdr.tsv", "id\ttext\tbody\n1\ta\tb\n", r"hdr\.tsv:1: header"),
    ("corpus.csv", "id,text\n", r"unsupported corpus file type"),
])
def test_corpus_errors_name_file_and_line(tmp_path, name, content, match):
    with pytest.raises(ConfigError, match=match):
        load_corpus(_write(tmp_path / name, content))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.jsonl: file not found"):
        load_corpus(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="is a directory"):
        (tmp_path / "d.jsonl").mkdir()
        load_corpus(str(tmp_path / "d.jsonl"))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match=r"bad\.jsonl\.gz"):
        load_corpus(str(tmp_path / "bad.jsonl.gz"))
    import gzip

    (tmp_path / "bad.tsv.gz").write_bytes(b"not gzip at all")  # BadGzipFile (an OSError) was a traceback
    with pytest.raises(ConfigError, match=r"bad\.tsv\.gz:1: cannot read"):
        load_corpus(str(tmp_path / "bad.tsv.gz"))
    whole = gzip.compress(("".join(f"{i}\tpassage number {i}\n" for i in range(2000))).encode())
    (tmp_path / "cut.tsv.gz").write_bytes(whole[:len(whole) // 2])  # EOFError
    with pytest.raises(ConfigError, match=r"cut\.tsv\.gz:\d+: cannot read"):
        load_corpus(str(tmp_path / "cut.tsv.gz"))
    (tmp_path / "quote.tsv").write_text('1\t"an opening quote never closed\n2\tthe next passage\n')
    with pytest.raises(ConfigError, match=r"quote\.tsv:\d+: malformed TSV"):  # was ONE passage, silently
        load_corpus(str(tmp_path / "quote.tsv"))
    (tmp_path / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")  # RecursionError
    with pytest.raises(ConfigError, match=r"deep\.jsonl:1: the JSON is nested too deeply"):
        load_corpus(str(tmp_path / "deep.jsonl"))
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.jsonl"):
        load_corpus(str(tmp_path / "latin.jsonl"))


def test_questions_answers_or_answer(tmp_path):
    p = _write(tmp_path / "q.jsonl", '{"question": "a?", "answers": ["x", "y"]}\n'
                                     '{"question": "b?", "answer": ["z"]}\n{"question": "c?", "answer": "w"}\n'
                                     '{"question": "d?"}\n')
    assert load_questions(p) == [Question("a?", ["x", "y"]), Question("b?", ["z"]), Question("c?", ["w"]),
                                 Question("d?", [])]
    assert load_questions(_write(tmp_path / "q.txt", "first?\n\nsecond?\n")) == [Question("first?"), Question("second?")]


@pytest.mark.parametrize("name,content,match", [
    ("q.jsonl", '{"question": "a?"}\n{"q": "b?"}\n', r"q\.jsonl:2: .*'question'"),
    ("a.jsonl", '{"question": "a?", "answers": [1]}\n', r"a\.jsonl:1: 'answers'"),
    ("s.jsonl", '{"question": "a?", "answers": ["x", "\\ud800"]}\n', r"s\.jsonl:1: 'answers\[1\]' is not valid Unicode"),
    ("e.jsonl", "", r"e\.jsonl: no questions"),
    ("q.csv", "a\n", "unsupported question file type"),
])
def test_question_errors(tmp_path, name, content, match):
    with pytest.raises(ConfigError, match=match):
        load_questions(_write(tmp_path / name, content))


def test_embedded_defaults():
    c = default_corpus()
    assert len(c) == 3832 and c is default_corpus()
    assert c[0].title == "Robert Boulter" and c[0].source_id == "wt103-test-000-000"
    assert all(p.title and p.text for p in c)
    assert not any("@-@" in p.text or "@,@" in p.text or "@.@" in p.text for p in c)
    words = [len(p.text.split()) for p in c]
    assert max(words) < 125 and sorted(words)[len(words) // 2] == 100
    qs = default_questions()
    assert len(qs) == 3610
    assert qs[0] == Question("when was the last time anyone was on the moon", ["14 December 1972 UTC", "December 1972"])
    assert all(q.question and q.answers for q in qs)
