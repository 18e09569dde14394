"""Every ``ralmspec ...`` command line in the fenced code blocks of README.md, docs/*.md and
experiments/README.md parses with the real command line parser (``ralmspec.cli.build_parser``):
a renamed or removed flag, a subcommand that moved or a bad value in a documented command fails
here, not in a user's shell.
Nothing is run and no model is loaded: parsing only (a good line parses, a bad one is argparse's
exit 2). docs/lm-runner.md's GPU steps (``rs ...``) are checked by
tests/experiments/test_gpu_steps.py.

How a documented line becomes an argv: ``\\`` continuations are joined, then
``tests.shell.shell_commands`` splits it into commands (``# comments``, redirections, ``VAR=value``
prefixes, ``time`` and a ``$`` prompt dropped; shared with tests/experiments/test_gpu_steps.py),
and ``python -m ralmspec.cli`` counts as ``ralmspec``. The docs' usage notation is read as a
user reads it: ``[--flag X]`` is optional (parsed with it, the longer form), ``{a,b,c}`` and
``a|b|c`` are choices (parsed with the first), and the placeholder ``N`` stands for a number."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shlex

import pytest

from ralmspec.cli import build_parser
from tests.shell import shell_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
        "experiments/README.md"]
PLACEHOLDERS = {"N": "2"}  # `--threads N`, `--max-tokens N`: a number


def fenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each logical line inside ``` fences, continuations joined."""
    out, inside, lines, i = [], False, text.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            start = i
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            out.append((start + 1, line))
        i += 1
    return out


def argvs(line: str) -> list[list[str]]:
    """The argv (after ``ralmspec``) of each ``ralmspec`` command on a shell line
    (``tests.shell.shell_commands``)."""
    try:
        commands = shell_commands(line)
    except ValueError:  # not shell (an unbalanced quote in an output block), unless it names the command
        if re.search(r"(^|[\s$])ralmspec\s", line):
            raise
        return []
    out = []
    for cmd in commands:
        if cmd[:3] in (["python", "-m", "ralmspec.cli"], ["python3", "-m", "ralmspec.cli"]):
            cmd = cmd[2:]
        if cmd[:1] in (["ralmspec"], ["ralmspec.cli"]):
            out.append([usage_word(w) for w in cmd[1:] if w.strip("[]")])
    return out


def usage_word(w: str) -> str:
    """A word of the docs' usage notation as a user would type it (module doc)."""
    w = w.strip("[]")
    if re.fullmatch(r"\{[^{}]+\}", w):
        w = w[1:-1].split(",")[0]
    elif "|" in w and not w.startswith("-") and "://" not in w:
        w = w.split("|")[0]
    return PLACEHOLDERS.get(w, w)


def documented_commands() -> list[tuple[str, list[str]]]:
    """("file:line", argv) of every ``ralmspec`` command in a fenced block of the docs."""
    found = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = f.read()
        for lineno, line in fenced_lines(text):
            found.extend((f"{doc}:{lineno}", argv) for argv in argvs(line))
    return found


COMMANDS = documented_commands()


def parse_error(argv: list[str]) -> str | None:
    """None when ``argv`` parses, else argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    return None


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses(where, argv):
    error = parse_error(argv)
    assert error is None, f"{where}: `ralmspec {shlex.join(argv)}` does not parse: {error}"


def test_the_docs_have_commands_to_check():
    """The extraction still finds the docs' commands (one in README's first block, every main one)."""
    assert len(COMMANDS) >= 40
    assert {argv[0] for _, argv in COMMANDS} >= {"generate", "index", "bench", "serve", "knnlm", "info"}


def test_a_stale_flag_fails_the_check():
    """The check can fail: a flag no parser has, a bad value, a missing subcommand."""
    text = "```bash\nFOO=1 ralmspec generate \"q\" --retriever {exact,bm25} [--threads N] \\\n   --json  # c\n```\n"
    (_, line), = fenced_lines(text)
    assert argvs(line) == [["generate", "q", "--retriever", "exact", "--threads", "2", "--json"]]
    assert parse_error(argvs(line)[0]) is None
    assert "unrecognized arguments: --no-such-flag" in parse_error(["bench", "--n", "3", "--no-such-flag"])
    assert "invalid int value" in parse_error(["bench", "--n", "three"])
    assert parse_error(["knnlm", "--datastore", "ds/"]) is not None
    assert argvs("ralmspec knnlm build --out ds/ && ralmspec knnlm bench --n 3 | tail -1") == [
        ["knnlm", "build", "--out", "ds/"], ["knnlm", "bench", "--n", "3"]]
    assert argvs("$ time python -m ralmspec.cli info --json > info.json") == [["info", "--json"]]
    assert argvs("ralmspec bench --n 2 2>&1 >log.txt") == [["bench", "--n", "2"]]
