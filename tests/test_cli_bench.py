"""`ralmspec bench` end to end on the small real index: JSON fields, identity, EMULATED padding."""

from __future__ import annotations

import json

from ralmspec.cli import main


def test_bench_json_and_emulated_pad(small_indexes, tmp_path, capsys):
    index = small_indexes["exact"].index_dir
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "tiny", "--retriever", "exact", "--index", index, "--n", "2",
               "--max-new-tokens", "8", "--emulate-pad", "5000", "--threads", "1", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "EMULATED" in table
    r = json.loads(out.read_text())
    for key in ("n", "retriever", "identical_fraction", "naive_latency_s", "speculative_latency_s",
                "speedup", "limit", "acceptance_rate", "rollbacks"):
        assert key in r
    assert r["n"] == 2 and r["identical_fraction"] == 1.0 and r["settings"]["emulate_pad"] == 5000
    assert r["limit"] >= 1.0 and r["speedup"] > 0


def test_bench_emulation_needs_exact(small_indexes, capsys):
    rc = main(["bench", "--model", "tiny", "--retriever", "bm25", "--index", small_indexes["bm25"].index_dir,
               "--n", "1", "--emulate-pad", "100"])
    assert rc == 2
    assert "--retriever exact" in capsys.readouterr().err
