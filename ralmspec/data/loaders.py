"""Loaders for passage corpora and question sets, and the embedded defaults.

Corpus files (doc ids are 0..N-1 in file order; the file's own id is kept as ``source_id``):

- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line with ``text`` (required, a string),
  ``title`` (optional, default ``""``) and ``id`` (optional, default the line's doc number).
  Blank lines are skipped.
- ``.tsv`` / ``.tsv.gz``: tab-separated, quoted like DPR's ``psgs_w100.tsv``. A header line
  naming the columns (``id``, ``text``, ``title`` in any order; ``title`` optional) is detected
  and used; without one the DPR order ``id<TAB>text<TAB>title`` is assumed. A first line of
  other column names (``docid<TAB>passage``, ...) is an error, not a passage.

Question files: ``.jsonl`` / ``.jsonl.gz`` with ``question`` (required) and ``answers`` or
``answer`` (a list of strings or one string; optional, default ``[]``), or ``.txt`` with one
question per non-blank line.

Files are UTF-8; a byte-order mark at the start is skipped.

Every problem raises :class:`~ralmspec.errors.ConfigError` naming the file and, where it has
one, the line.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import IO, Iterator

from ralmspec.config import invalid_text_field
from ralmspec.data.corpus import Corpus, Passage
from ralmspec.errors import ConfigError

EMBEDDED_PACKAGE = "ralmspec.data"
EMBEDDED_PASSAGES = "embedded/passages.jsonl.gz"
EMBEDDED_QUESTIONS = "embedded/nq_open_dev.jsonl.gz"
EMBEDDED_GROUNDED = "embedded/grounded_qa.jsonl"
# names of the embedded question sets (--questions NAME)
QUESTION_SETS = {"grounded": EMBEDDED_GROUNDED, "nq-open": EMBEDDED_QUESTIONS}

_CORPUS_SUFFIXES = (".jsonl", ".jsonl.gz", ".tsv", ".tsv.gz")
_QUESTION_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt")


@dataclass(frozen=True)
class Question:
    """One QA item. ``answers`` may be empty (latency studies only need the question)."""

    question: str
    answers: list[str] = field(default_factory=list)


def _open_text(path: str) -> IO[str]:
    if not os.path.exists(path):
        raise ConfigError(f"{path}: file not found")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, expected a file")
    try:
        # utf-8-sig: a byte-order mark at the start (Windows / spreadsheet exports) is dropped, not
        # read as text (a TSV header it prefixes was not recognised, and became a passage)
        if path.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
        return open(path, encoding="utf-8-sig")
    except OSError as e:
        raise ConfigError(f"{path}: cannot open: {e}") from e


def _iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a text file, gz or not; decode errors -> ConfigError."""
    with _open_text(path) as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):  # noqa: B007
                yield lineno, line
        except (UnicodeDecodeError, OSError, EOFError) as e:
            raise ConfigError(f"{path}:{lineno + 1}: cannot read: {e}") from e


def _iter_json_objects(path: str) -> Iterator[tuple[int, dict]]:
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
        except RecursionError:
            raise ConfigError(f"{path}:{lineno}: the JSON is nested too deeply") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        field = invalid_text_field(obj)  # the file decoded as UTF-8, but JSON lets "\ud800" through
        if field is not None:
            raise ConfigError(f"{path}:{lineno}: '{field}' is not valid Unicode: it holds a lone surrogate "
                              "(an unpaired \\uD800-\\uDFFF escape)")
        yield lineno, obj


def _check_suffix(path: str, allowed: tuple[str, ...], what: str) -> None:
    if not path.endswith(allowed):
        raise ConfigError(f"{path}: unsupported {what} file type; use one of {', '.join(allowed)}")


def _corpus_from_jsonl(path: str) -> list[Passage]:
    out: list[Passage] = []
    for lineno, obj in _iter_json_objects(path):
        text = obj.get("text")
        if not isinstance(text, str):
            raise ConfigError(f"{path}:{lineno}: passage needs a string 'text' field (keys: id, title, text)")
        title = obj.get("title", "")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise ConfigError(f"{path}:{lineno}: 'title' must be a string")
        sid = obj.get("id", len(out))
        if not isinstance(sid, (str, int)) or isinstance(sid, bool):
            raise ConfigError(f"{path}:{lineno}: 'id' must be a string or an integer")
        out.append(Passage(len(out), title, text, str(sid)))
    return out


# first-line cells that name columns in other corpora's headers (a line of only these is not a passage)
_HEADER_WORDS = {"id", "text", "title", "docid", "doc_id", "pid", "_id", "passage_id", "passage", "passages",
                 "contents", "content", "body", "document", "doc", "name", "url"}


def _corpus_from_tsv(path: str) -> list[Passage]:
    csv.field_size_limit(1 << 30)
    out: list[Passage] = []
    with _open_text(path) as f:
        # strict: an unmatched quote is an error, not the rest of the file read as one passage
        reader = csv.reader(f, delimiter="\t", quotechar='"', strict=True)
        cols = {"id": 0, "text": 1, "title": 2}
        ncols_min = 2
        try:
            for row in reader:
                lineno = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if lineno == 1:
                    names = [c.strip().lower() for c in row]
                    if set(names) <= _HEADER_WORDS and not {"text", "id"} <= set(names):
                        raise ConfigError(f"{path}:1: {row!r} looks like a header, but the columns must be named "
                                          "id, text and optionally title (without a header the DPR order "
                                          "id<TAB>text<TAB>title is read, and this line would be a passage)")
                    if "text" in names and "id" in names:
                        if len(set(names)) != len(names) or not set(names) <= {"id", "text", "title"}:
                            raise ConfigError(f"{path}:1: header must name the columns id, text and "
                                              f"optionally title, got {row!r}")
                        cols = {n: i for i, n in enumerate(names)}
                        ncols_min = len(names)
                        continue
                if len(row) < ncols_min or len(row) > 3:
                    raise ConfigError(f"{path}:{lineno}: expected {'id<TAB>text<TAB>title' if 'title' in cols else 'id<TAB>text'}"
                                      f" ({ncols_min}-3 tab-separated columns), got {len(row)}")
                title = row[cols["title"]] if "title" in cols and cols["title"] < len(row) else ""
                out.append(Passage(len(out), title, row[cols["text"]], row[cols["id"]]))
        except csv.Error as e:
            raise ConfigError(f"{path}:{reader.line_num}: malformed TSV: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}:{reader.line_num + 1}: cannot decode as UTF-8: {e}") from e
        except (OSError, EOFError) as e:  # a damaged or truncated .gz
            raise ConfigError(f"{path}:{reader.line_num + 1}: cannot read: {e}") from e
    return out


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Load a passage corpus (.jsonl, .jsonl.gz, .tsv, .tsv.gz). Raises ConfigError if bad/empty."""
    p = os.fspath(path)
    _check_suffix(p, _CORPUS_SUFFIXES, "corpus")
    passages = _corpus_from_tsv(p) if p.endswith((".tsv", ".tsv.gz")) else _corpus_from_jsonl(p)
    if not passages:
        raise ConfigError(f"{p}: the corpus is empty (no passages)")
    return Corpus(passages)


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Load a question set (.jsonl, .jsonl.gz with question + answers/answer; .txt one per line)."""
    p = os.fspath(path)
    _check_suffix(p, _QUESTION_SUFFIXES, "question")
    out: list[Question] = []
    if p.endswith(".txt"):
        out = [Question(line.strip(), []) for _, line in _iter_lines(p) if line.strip()]
    else:
        for lineno, obj in _iter_json_objects(p):
            q = obj.get("question")
            if not isinstance(q, str) or not q.strip():
                raise ConfigError(f"{p}:{lineno}: needs a non-empty string 'question' field")
            ans = obj.get("answers", obj.get("answer", []))
            if isinstance(ans, str):
                ans = [ans]
            if not isinstance(ans, list) or not all(isinstance(a, str) for a in ans):
                raise ConfigError(f"{p}:{lineno}: 'answers' must be a list of strings")
            out.append(Question(q, list(ans)))
    if not out:
        raise ConfigError(f"{p}: no questions found")
    return out


def embedded_path(name: str) -> str:
    """Filesystem path of a file shipped in ``ralmspec/data/`` (e.g. ``EMBEDDED_PASSAGES``)."""
    path = str(resources.files(EMBEDDED_PACKAGE).joinpath(name))
    if not os.path.exists(path):
        raise ConfigError(f"embedded data file {name} is missing from the installed package ({path}); "
                          "reinstall ralmspec (from a checkout: regenerate it with `python scripts/make_embedded_data.py`)")
    return path


@functools.lru_cache(maxsize=1)
def default_corpus() -> Corpus:
    """The embedded WikiText-103 knowledge base (3,832 passages). Loaded once, then shared (immutable)."""
    return load_corpus(embedded_path(EMBEDDED_PASSAGES))


def default_questions() -> list[Question]:
    """The embedded NQ-open dev questions (3,610), in file order. A fresh list on every call.
    Latency only: their topics are not in the embedded knowledge base (see grounded_questions)."""
    return load_questions(embedded_path(EMBEDDED_QUESTIONS))


def grounded_questions() -> list[Question]:
    """The embedded questions about the embedded knowledge base, each with its gold answers."""
    return load_questions(embedded_path(EMBEDDED_GROUNDED))


def resolve_questions(name_or_path: str | None) -> str:
    """Path of a question file: an embedded set's name ("grounded" = the default, "nq-open"),
    or a file path as given."""
    if name_or_path in (None, "default"):
        name_or_path = "grounded"
    if name_or_path in QUESTION_SETS:
        return embedded_path(QUESTION_SETS[name_or_path])
    return name_or_path


def corpus_sha256(corpus: Corpus) -> str:
    """Content hash of a corpus (every passage's source id, title and text, in doc-id order)."""
    h = hashlib.sha256()
    for p in corpus:
        h.update(json.dumps([p.source_id, p.title, p.text], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def save_corpus(corpus: Corpus, path: str) -> None:
    """Write ``corpus`` as ``.jsonl.gz`` (``{"id", "title", "text"}``); ``load_corpus`` reads it back equal."""
    if not path.endswith(".jsonl.gz"):
        raise ConfigError(f"{path}: save_corpus writes .jsonl.gz only")
    with gzip.GzipFile(path, mode="wb", compresslevel=6, mtime=0) as gz:
        for p in corpus:
            row = {"id": p.source_id, "title": p.title, "text": p.text}
            gz.write((json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
