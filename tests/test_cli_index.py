"""`ralmspec index build`: bad flags are one-line errors before anything is built."""

from __future__ import annotations

import json

from ralmspec.cli import main


def _corpus(tmp_path) -> str:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"passage {i} about Oslo and Rome"}) + "\n" for i in range(3)))
    return str(path)


def test_index_build_refuses_hnsw_m_1(tmp_path, capsys):
    """FAISS's HNSW crashed the process (SIGSEGV, exit status 139) adding to a graph of M 1."""
    rc = main(["index", "build", "--corpus", _corpus(tmp_path), "--retriever", "hnsw", "--hnsw-m", "1",
               "--out", str(tmp_path / "ix")])
    assert rc == 2 and "hnsw_m must be >= 2, got 1" in capsys.readouterr().err


def test_index_build_out_below_a_file_is_a_clear_error(tmp_path, capsys):
    """Was a FileExistsError traceback from os.makedirs, after the corpus was loaded."""
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    rc = main(["index", "build", "--corpus", _corpus(tmp_path), "--retriever", "bm25",
               "--out", str(a_file / "ix")])
    assert rc == 2 and f"{a_file} is a file, not a folder" in capsys.readouterr().err
