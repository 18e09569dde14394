"""Code shape of the speculation path: no function in ``ralmspec/speculation`` or
``ralmspec/engine`` longer than 80 lines (a round must stay readable), and one rollback."""

from __future__ import annotations

import ast
from pathlib import Path

import ralmspec

ROOT = Path(ralmspec.__file__).resolve().parent
MAX_LINES = 80


def long_functions(folder: Path, limit: int = MAX_LINES) -> list[str]:
    """``file:function (lines)`` for every function or method longer than ``limit`` lines."""
    out = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.name}:{node.name} ({n})")
    return out


def test_no_long_functions_in_the_speculation_path():
    for folder in ("speculation", "engine"):
        assert (ROOT / folder).is_dir()
        assert long_functions(ROOT / folder) == [], f"functions over {MAX_LINES} lines in ralmspec/{folder}"


def test_the_checker_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path) == [f"m.py:long ({MAX_LINES + 1})"]


def test_tokens_are_cut_in_one_place():
    """Rollback is the driver's: no other module of the speculation path deletes a slice of a
    token or step list."""
    cutters = []
    for folder in ("speculation", "engine", "knnlm"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Delete) and any(isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Slice)
                                                        for t in node.targets):
                    cutters.append(f"{folder}/{path.name}:{node.lineno}")
    assert [c.split(":")[0] for c in cutters] == ["speculation/driver.py", "speculation/rounds.py"], cutters
