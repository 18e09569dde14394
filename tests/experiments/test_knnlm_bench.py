"""experiments/knnlm_bench.py: its lists and paths are checked before anything loads."""

from __future__ import annotations

import pytest

from experiments import knnlm_bench


@pytest.mark.parametrize("flags, says", [
    (["--variants", "os3,turbo"], "unknown: turbo"),  # was a KeyError traceback
    (["--indexes", "flat,faiss"], "unknown: faiss"),  # was a ConfigError traceback after the LM loaded
    (["--sizes", "1000,abc"], "--sizes takes a comma list of entry counts >= 1 or 'all', got 'abc'"),  # ValueError
    (["--sizes", "0"], "got '0'"),
    (["--sizes", ","], "each take a non-empty comma list"),
])
def test_bad_lists_are_one_line_errors(tmp_path, capsys, flags, says):
    assert knnlm_bench.main(["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err, err


def test_a_missing_source_and_ctrl_c(tmp_path, capsys, monkeypatch):
    assert knnlm_bench.main(["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err  # was an IndexNotFoundError traceback

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(knnlm_bench, "_main", interrupted)
    assert knnlm_bench.main(["--source", "x"]) == 130
