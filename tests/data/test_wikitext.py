"""WikiText -> passages: detokenisation, article parsing, chunking, and reproducible embedded files."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import pytest

from ralmspec.data.wikitext import Article, detokenize, parse_wikitext, read_passages, split_passages

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = "/work/shared/data"


@pytest.mark.parametrize("raw,clean", [
    (" He had a guest @-@ starring role in 1 @,@ 000 films , rated 3 @.@ 5 . ",
     "He had a guest-starring role in 1,000 films, rated 3.5."),
    (' a role as " Craig " in " Teddy \'s Story " ( 2004 ) ; done ', 'a role as "Craig" in "Teddy\'s Story" (2004); done'),
    (" Robert <unk> is n't here ", "Robert <unk> isn't here"),
])
def test_detokenize(raw, clean):
    assert detokenize(raw) == clean


def test_parse_and_split():
    raw = (" \n = First Article = \n \n Intro words here . \n \n = = Section = = \n \n"
           " = = = Sub = = = \n Body one two . \n \n = Second = \n Only text . \n")
    arts = parse_wikitext(raw)
    assert arts == [Article("First Article", ("Intro words here.", "Body one two.")),
                    Article("Second", ("Only text.",))]
    # a formula broken across lines is text, not a new article (WikiText-103 "Constant k filter")
    raw = " \n = Filter = \n \n A frequency of ωc \n = 1 rad / s and k = \n 1 Ω . \n"
    assert parse_wikitext(raw) == [Article("Filter", ("A frequency of ωc", "= 1 rad / s and k =", "1 Ω."))]
    long = [Article("T", (" ".join(f"w{i}" for i in range(230)),))]
    ps = split_passages(long, "x", words=100, min_words=31)  # a 30-word tail < 31: merged
    assert [len(p.text.split()) for p in ps] == [100, 130]
    ps = split_passages(long, "x", words=100, min_words=30)  # not shorter than 30: kept
    assert [len(p.text.split()) for p in ps] == [100, 100, 30]
    assert [p.id for p in ps] == ["x-000-000", "x-000-001", "x-000-002"] and ps[0].title == "T"


def test_read_passages_is_parse_then_split(tmp_path):
    raw = " \n = Café = \n \n " + " ".join(f"w{i}" for i in range(150)) + " . \n \n = Two = \n Short one . \n"
    path = tmp_path / "wiki.txt"
    path.write_text(raw, encoding="utf-8")
    articles, passages = read_passages(str(path), "p", words=100)
    assert articles == parse_wikitext(raw)
    assert passages == split_passages(articles, "p", words=100)
    assert [p.id for p in passages] == ["p-000-000", "p-000-001", "p-001-000"]


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="needs /work/shared/data")
def test_embedded_files_regenerate_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_embedded_data.py"), "--data", SHARED,
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("passages.jsonl.gz", "nq_open_dev.jsonl.gz"):
        shipped = os.path.join(REPO, "ralmspec", "data", "embedded", name)
        with gzip.open(shipped) as a, gzip.open(tmp_path / name) as b:  # content, not zlib's bytes
            assert a.read() == b.read(), name
