"""Documented shell lines as commands: the one splitting that tests/test_docs.py (the docs'
``ralmspec`` lines) and tests/experiments/test_gpu_steps.py (docs/lm-runner.md's GPU steps)
both read them with."""

from __future__ import annotations

import re
import shlex

SEPARATORS = {"&&", "||", ";", "|"}
REDIRECTIONS = {">", ">>", "<", "2>", "&>"}
_REDIRECTION_WORD = re.compile(r"[0-9&]?>>?&?.+|<.+")  # 2>&1, >out.json, <in.txt
_PREFIX_WORD = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")  # VAR=value before a command


def shell_commands(line: str) -> list[list[str]]:
    """The words of each command on a shell ``line``, in order: ``shlex`` words, ``# comments``
    dropped, split at ``&&`` / ``||`` / ``;`` / ``|`` (a pipe's reader is a command too),
    redirections and their files dropped (``> out.json``, ``2>&1``), and a ``$`` prompt, ``time``
    and ``VAR=value`` prefixes skipped. Empty commands are left out. Raises ``ValueError`` for a
    line that is not shell (an unbalanced quote)."""
    commands, current, skip = [], [], False
    for w in shlex.split(line, comments=True):
        if skip:  # a redirection's file
            skip = False
        elif w in REDIRECTIONS:
            skip = True
        elif _REDIRECTION_WORD.fullmatch(w):
            continue
        elif w in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(w)
    commands.append(current)
    out = []
    for cmd in commands:
        while cmd and (cmd[0] in ("$", "time") or _PREFIX_WORD.fullmatch(cmd[0])):
            cmd = cmd[1:]
        if cmd:
            out.append(cmd)
    return out
