"""`ralmspec knnlm build | reindex | generate | bench` end to end (tiny LM, small datastore)."""

from __future__ import annotations

import argparse
import json

from ralmspec.knnlm.cli import add_knnlm_subparsers, main
from tests.identity import SpeculationCheck


def test_cli_end_to_end(tmp_path, capsys):
    ds = tmp_path / "ds"
    assert main(["build", "--model", "tiny", "--out", str(ds), "--max-tokens", "3000", "--window", "64",
                 "--context-stride", "48", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == 3000 and info["model"] == "tiny"

    assert main(["reindex", "--datastore", str(ds), "--out", str(tmp_path / "hnsw"), "--index", "hnsw",
                 "--hnsw-m", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["index"]["kind"] == "hnsw"

    prompt = "robert is an english film, television and theatre actor"
    assert main(["generate", prompt, "--datastore", str(ds), "--no-speculate", "--max-new-tokens", "8", "--json"]) == 0
    naive = json.loads(capsys.readouterr().out)
    assert main(["generate", prompt, "--datastore", str(ds), "--max-new-tokens", "8", "--json", "--async",
                 "--stride", "3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert naive["mode"] == "naive" and spec["mode"] == "speculative"
    check = SpeculationCheck()
    check.same((spec["tokens"], spec["text"]), (naive["tokens"], naive["text"]), spec["stats"])
    check.ran(min_speculated=1)  # --stride 3: a fixed stride
    assert len(naive["tokens"]) == 8
    assert "acceptance_rate" in spec["stats"] and naive["limit"] > 1.0

    out = tmp_path / "bench.json"
    assert main(["bench", "--datastore", str(tmp_path / "hnsw"), "--n", "3", "--max-new-tokens", "6", "--json",
                 str(out), "--prompts", "questions", "--warmup", "0", "--stride", "2", "--lm-runner", "static"]) == 0
    b = json.loads(out.read_text())
    s = b["summary"]
    bench = SpeculationCheck()  # the bench compared the tokens; a fixed stride speculates in each prompt
    for r in b["records"]:
        bench.same(r["identical"], True, r)
    bench.ran(min_speculated=len(b["records"]))
    assert s["all_identical"] and s["prompts"] == 3 and s["limit"] > 1.0 and s["speedup"] > 0
    assert len(b["records"]) == 3 and b["settings"]["datastore"]["entries"] == 3000
    assert b["settings"]["datastore"]["index"] == "hnsw"
    assert b["settings"]["lm"] == {"device": "cpu", "runner": "static"}  # --lm-runner reached the LM


def test_cli_errors_are_typed(tmp_path, capsys):
    assert main(["generate", "hi", "--datastore", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["build", "--model", "tiny", "--out", str(tmp_path / "x"), "--index", "flat",
                 "--max-tokens", "0", "--quiet"]) == 2
    # each of these crashed (a SIGSEGV in FAISS, a FAISS RuntimeError) or was taken silently
    assert main(["build", "--model", "tiny", "--out", str(tmp_path / "h"), "--index", "hnsw", "--hnsw-m", "1",
                 "--max-tokens", "100", "--quiet"]) == 2
    assert "hnsw_m must be >= 2" in capsys.readouterr().err
    assert main(["build", "--model", "tiny", "--out", str(tmp_path / "p"), "--index", "ivf", "--pq-m", "8",
                 "--max-tokens", "100", "--quiet"]) == 2
    assert "at least 256 entries" in capsys.readouterr().err
    for flags, says in ((["--prompt-tokens", "0"], "--prompt-tokens"), (["--warmup", "-5"], "--warmup"),
                        (["--stride", "0"], "fixed_stride")):
        assert main(["bench", "--datastore", str(tmp_path / "missing"), *flags]) == 2
        assert says in capsys.readouterr().err


def test_cli_output_paths_are_checked_before_the_work(tmp_path, capsys):
    """An --out below a file (build, reindex) or a --json that is a folder (bench, eval) was a
    FileExistsError / IsADirectoryError traceback, after the build or the whole run."""
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    missing = str(tmp_path / "missing")  # never opened: the path check comes first
    for argv, says in ((["build", "--model", "tiny", "--max-tokens", "100", "--quiet", "--out", str(a_file / "ds")],
                        f"--out {a_file / 'ds'}: {a_file} is a file, not a folder"),
                       (["reindex", "--datastore", missing, "--index", "flat", "--out", str(a_file)],
                        "exists and is not a folder"),
                       (["bench", "--datastore", missing, "--json", str(tmp_path)], "is a folder; give a file path"),
                       (["eval", "--datastore", missing, "--text", "wt103:test", "--json", str(tmp_path)],
                        "is a folder; give a file path")):
        assert main(argv) == 2
        assert says in capsys.readouterr().err, argv


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch):
    import ralmspec.knnlm.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_generate", interrupted)
    try:
        rc = main(["generate", "hi", "--datastore", "d"])
    except KeyboardInterrupt:  # escaping, it would stop the whole test session
        rc = "KeyboardInterrupt escaped main"
    assert rc == 130


def test_subparser_wiring():
    parser = argparse.ArgumentParser(prog="ralmspec")
    add_knnlm_subparsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["knnlm", "bench", "--datastore", "d", "--n", "5", "--json", "o.json"])
    assert args.command == "knnlm" and args.knnlm_command == "bench" and args.n == 5 and callable(args.func)
    args = parser.parse_args(["knnlm", "build", "--out", "o", "--index", "ivf", "--max-tokens", "100"])
    assert args.index == "ivf" and args.max_tokens == 100 and args.model == "smollm2"
