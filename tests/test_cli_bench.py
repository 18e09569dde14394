"""`ralmspec bench` end to end on the small real index: JSON fields, identity, EMULATED padding."""

from __future__ import annotations

import json

from ralmspec.cli import main


def test_bench_json_and_emulated_pad(small_indexes, tmp_path, capsys):
    index = small_indexes["exact"].index_dir
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "tiny", "--retriever", "exact", "--index", index, "--n", "2",
               "--max-new-tokens", "8", "--emulate-pad", "5000", "--threads", "1", "--json", str(out),
               "--lm-runner", "compiled"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "EMULATED" in table
    r = json.loads(out.read_text())
    for key in ("n", "retriever", "identical_fraction", "naive_latency_s", "speculative_latency_s",
                "speedup", "limit", "acceptance_rate", "rollbacks"):
        assert key in r
    assert r["n"] == 2 and r["identical_fraction"] == 1.0 and r["settings"]["emulate_pad"] == 5000
    assert r["limit"] >= 1.0 and r["speedup"] > 0
    # what the runner did: the compiled step ran (at least its first span); no graphs on the CPU
    s = r["settings"]
    assert s["lm_runner"] == "compiled" and s["lm_compiled_spans"] and s["lm_cuda_graphs"] == 0


def test_bench_counts_what_the_identity_check_covered(small_indexes, tmp_path, capsys):
    """Forced speculation (fixed stride, no OS^3, synchronous; prefetch 1 and 4-token queries so
    that guesses miss): the JSON and the table carry speculated / verified steps, accepted and
    rollbacks, and the summary says "identical over K speculated steps" with K > 0. Requests that
    end after their first chunk never speculate: the summary says so instead of claiming identity."""
    index = small_indexes["exact"].index_dir
    out, rows_out = tmp_path / "bench.json", tmp_path / "rows.jsonl"
    rc = main(["bench", "--model", "tiny", "--retriever", "exact", "--index", index, "--n", "2",
               "--max-new-tokens", "24", "--stride", "2", "--query-len", "4", "--threads", "1", "--no-os3",
               "--fixed-stride", "3", "--no-async", "--prefetch", "1", "--json", str(out), "--outputs", str(rows_out)])
    assert rc == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    # the per-request file holds what the summary is made of: tokens (identity), stats, latencies
    rows = [json.loads(line) for line in rows_out.read_text().splitlines()]
    by_mode = {m: [row for row in rows if row["mode"] == m] for m in ("naive", "speculative")}
    assert [len(v) for v in by_mode.values()] == [2, 2]
    assert all(a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == a["tokens"]
               for a, b in zip(*by_mode.values()))
    assert sum(row["stats"]["speculated"] for row in by_mode["speculative"]) == r["speculated_steps"]
    assert sum(row["stats"]["rollbacks"] for row in by_mode["speculative"]) == r["rollbacks"]
    for mode, key in (("naive", "naive"), ("speculative", "speculative")):
        lat = sorted(row["latency_s"] for row in by_mode[mode])
        q = r["latency_quantiles"][key]
        assert set(q) == {"p50", "p90", "max"}
        assert [round(q["p50"], 4), round(q["p90"], 4), round(q["max"], 4)] == [lat[0], lat[1], lat[1]]
    k, v, acc, rb = r["speculated_steps"], r["verified_steps"], r["accepted"], r["rollbacks"]
    assert all(isinstance(x, int) for x in (k, v, acc, rb))
    assert k > 0 and r["identical_fraction"] == 1.0
    assert rb > 0, f"no rollback in {k} speculated steps: the case was built to make guesses miss"
    assert acc + rb <= k and v >= r["n"]  # a rollback rejects one step at least; one real first step per request
    assert r["acceptance_rate"] == acc / k and r["rollbacks_per_request"] == rb / r["n"]
    fb, held = r["fallback_steps"], r["held_steps"]
    assert fb == held == 0  # no OS^3: every verified step is a request's first
    assert f"| {k} | {v} | {fb} ({held}) | {acc} | {rb} |" in printed
    want = f"2/2 requests identical to the naive loop over {k} speculated steps (accepted {acc}, rollbacks {rb};"
    assert want in printed

    rc = main(["bench", "--model", "tiny", "--retriever", "exact", "--index", index, "--n", "2",
               "--max-new-tokens", "2", "--stride", "2", "--threads", "1", "--no-os3", "--fixed-stride", "3",
               "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert (r["speculated_steps"], r["verified_steps"], r["accepted"], r["rollbacks"]) == (0, 2, 0, 0)
    assert "over 0 speculated steps: speculation never ran" in capsys.readouterr().out


def test_bench_oracle_bound_next_to_a_real_guesser(small_indexes, tmp_path, capsys):
    """`--guessers exact,oracle`: the oracle bound (taught by each naive run) is always right;
    an unknown name is refused with the list of guessers."""
    index = small_indexes["exact"].index_dir
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "tiny", "--retriever", "exact", "--index", index, "--n", "2",
               "--max-new-tokens", "16", "--threads", "1", "--no-os3", "--fixed-stride", "4",
               "--guessers", "exact,oracle", "--json", str(out)])
    assert rc == 0
    variants = {v["variant"]: v for v in json.loads(out.read_text())["variants"]}
    assert set(variants) == {"speculative[exact]", "speculative[oracle]"}
    assert all(v["identical_fraction"] == 1.0 for v in variants.values())
    assert variants["speculative[oracle]"]["acceptance_rate"] == 1.0
    rc = main(["bench", "--model", "tiny", "--retriever", "exact", "--index", index, "--n", "1",
               "--guessers", "exact,psychic"])
    assert rc == 2 and "oracle" in capsys.readouterr().err


def test_bench_emulation_needs_exact(small_indexes, capsys):
    rc = main(["bench", "--model", "tiny", "--retriever", "bm25", "--index", small_indexes["bm25"].index_dir,
               "--n", "1", "--emulate-pad", "100"])
    assert rc == 2
    assert "--retriever exact" in capsys.readouterr().err


def test_bench_reports_answer_match_on_the_grounded_questions(small_indexes, tmp_path, capsys):
    """The default questions are the grounded set (with answers): answer_match is in the JSON
    and the table; `--no-retrieval` gives the closed-book figure in the same format."""
    index = small_indexes["bm25"].index_dir
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "tiny", "--retriever", "bm25", "--index", index, "--n", "2",
               "--max-new-tokens", "4", "--json", str(out)])
    assert rc == 0
    assert "answer match" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["settings"]["questions"] == "grounded" and r["settings"]["prompt_format"] == "plain"
    assert isinstance(r["answer_match"], float) and 0.0 <= r["answer_match"] <= 1.0
    closed, outputs = tmp_path / "closed.json", tmp_path / "closed.jsonl"
    rc = main(["bench", "--model", "tiny", "--retriever", "bm25", "--index", index, "--n", "2",
               "--max-new-tokens", "4", "--no-retrieval", "--json", str(closed), "--outputs", str(outputs)])
    assert rc == 0
    assert "no retrieval (closed book)" in capsys.readouterr().out
    c = json.loads(closed.read_text())
    assert c["mode"] == "no-retrieval" and c["n"] == 2 and isinstance(c["answer_match"], float)
    rows = [json.loads(line) for line in outputs.read_text().splitlines()]
    assert [(r["i"], r["mode"]) for r in rows] == [(0, "no-retrieval"), (1, "no-retrieval")]
    assert all(r["answers"] and isinstance(r["match"], bool) and r["passages"] == [] for r in rows)
    assert c["answer_match"] == sum(r["match"] for r in rows) / 2


def test_bench_takes_the_nq_open_set_by_name(small_indexes, tmp_path):
    out = tmp_path / "nq.json"
    rc = main(["bench", "--model", "tiny", "--retriever", "bm25", "--index", small_indexes["bm25"].index_dir,
               "--n", "1", "--max-new-tokens", "4", "--questions", "nq-open", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["settings"]["questions"] == "nq-open" and isinstance(r["answer_match"], float)


def test_bench_bad_prompt_format_for_a_model_without_template(small_indexes, capsys):
    rc = main(["bench", "--model", "tiny", "--retriever", "bm25", "--index", small_indexes["bm25"].index_dir,
               "--n", "1", "--prompt-format", "chat"])
    assert rc == 2
    assert "chat template" in capsys.readouterr().err


def test_bench_refuses_an_output_path_it_cannot_write_before_the_run(small_indexes, tmp_path, capsys):
    """--json / --outputs naming a folder (or a path below a file) were an IsADirectoryError /
    FileExistsError traceback after the whole run; now a one-line error before the model loads."""
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    base = ["bench", "--model", "tiny", "--retriever", "bm25", "--index", small_indexes["bm25"].index_dir,
            "--n", "1", "--max-new-tokens", "2"]
    for flags, says in ((["--json", str(tmp_path)], "--json"), (["--outputs", str(tmp_path)], "--outputs"),
                        (["--json", str(a_file / "b.json")], "--json")):
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {says} ") and "[1/1]" not in err, err
