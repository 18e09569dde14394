"""experiments/load.py: the fair load test's plan (fresh server per cell, modes alternating) and
a short end-to-end run with --json (tiny model, one client, one round)."""

from __future__ import annotations

import json

from experiments import load

CELL_FIELDS = ("round", "mode", "clients", "req_per_s", "tok_per_s", "p50_s", "p95_s", "p99_s", "errors",
               "rss_start_mib", "rss_end_mib", "queries_per_search", "requests_per_search", "acceptance",
               "speculated_steps", "verified_steps", "accepted", "rollbacks")


def test_flags_after_the_first_double_dash_go_to_the_server():
    assert load.split_server_args(["--n", "2", "--", "--stride", "2", "--", "x"]) == (["--n", "2"], ["--stride", "2", "--", "x"])
    assert load.split_server_args(["--n", "2"]) == (["--n", "2"], [])
    assert load.split_server_args(["--"]) == ([], [])


def test_plan_alternates_which_mode_goes_first():
    plan = load.plan_cells(2, [1, 8], ["naive", "speculative"])
    assert plan == [(0, 1, "naive"), (0, 1, "speculative"), (0, 8, "speculative"), (0, 8, "naive"),
                    (1, 1, "speculative"), (1, 1, "naive"), (1, 8, "naive"), (1, 8, "speculative")]
    qs = [f"q{i}" for i in range(20)]
    assert load.question_order(qs, 0, 1) == load.question_order(qs, 0, 1) != load.question_order(qs, 0, 0)
    assert sorted(load.question_order(qs, 3, 0)) == sorted(qs)


def test_bad_flags_are_one_line_errors_before_any_server_starts(tmp_path, capsys):
    """A question file that cannot be read was a ConfigError traceback; a NaN or infinite
    --duration / --warmup ran (NaN: every rate NaN; inf: forever); a negative --n-questions
    meant "all" in silence; a --json folder failed after the first cell."""
    for flags, says in ((["--questions", str(tmp_path / "missing.jsonl")], "missing.jsonl: file not found"),
                        (["--duration", "nan"], "--duration a finite number > 0"),
                        (["--duration", "inf"], "--duration a finite number > 0"),
                        (["--warmup", "nan"], "--warmup a finite number >= 0"),
                        (["--n-questions", "-3"], "--n-questions >= 0"),
                        (["--json", str(tmp_path)], "is a folder; give a file path")):
        assert load.main(["--model", "tiny", *flags]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and "server up" not in err, (flags, err)


def test_an_unreachable_url_is_a_one_line_error(capsys):
    """--url with no server there was an aiohttp ClientConnectorError traceback."""
    rc = load.main(["--model", "tiny", "--url", "http://127.0.0.1:1", "--concurrency", "1", "--rounds", "1",
                    "--modes", "naive", "--warmup", "0", "--duration", "0.1"])
    assert rc == 2 and "error: cannot reach the server at http://127.0.0.1:1" in capsys.readouterr().err


def test_ctrl_c_exits_130(monkeypatch, tmp_path):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(load, "_run", interrupted)
    assert load.main(["--model", "tiny", "--questions", "grounded"]) == 130


def test_load_json_schema(tmp_path, capsys):
    out = tmp_path / "load.json"
    rc = load.main(["--model", "tiny", "--concurrency", "1", "--rounds", "1", "--duration", "2.5",
                    "--warmup", "0.5", "--max-tokens", "8", "--json", str(out), "--", "--stride", "2", "--no-os3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "speculative / naive" in printed
    doc = json.loads(out.read_text())
    s = doc["settings"]
    for key in ("command", "model", "retriever", "max_tokens", "duration_s", "warmup_s", "rounds", "server_flags",
                "machine", "loadavg_before", "loadavg_after", "knowledge_base"):
        assert key in s, key
    flags = ["--stride", "2", "--no-os3"]
    assert s["model"] == "tiny" and s["fresh_server_per_cell"] and s["extra_server_flags"] == flags
    assert s["server_flags"][-3:] == flags and s["machine"]["cpu_count"] >= 1
    assert s["knowledge_base"].startswith("real ") and s["warning"] is None
    cells = doc["cells"]
    assert sorted(c["mode"] for c in cells) == ["naive", "speculative"]
    for c in cells:
        for key in CELL_FIELDS:
            assert key in c, key
        assert c["clients"] == 1 and c["round"] == 0 and c["errors"] == 0
        assert c["requests"] >= 1 and c["req_per_s"] > 0 and c["tok_per_s"] > 0 and c["p50_s"] > 0
        assert c["rss_start_mib"] > 0 and c["rss_end_mib"] > 0
        assert c["queries_per_search"] >= 1 and c["requests_per_search"] >= 1
    naive = next(c for c in cells if c["mode"] == "naive")
    assert naive["acceptance"] is None and naive["speculated_steps"] == naive["verified_steps"] == 0
    # --no-os3: a fixed stride, so the speculative cell speculated (8 tokens = 4 steps of 2 per request)
    spec = next(c for c in cells if c["mode"] == "speculative")
    assert spec["speculated_steps"] > 0 and spec["verified_steps"] >= spec["requests"]
    assert spec["accepted"] + spec["rollbacks"] <= spec["speculated_steps"]
    assert spec["acceptance"] == spec["accepted"] / spec["speculated_steps"]
    assert doc["ratios"][0]["clients"] == 1 and doc["ratios"][0]["req_per_s_ratio"] > 0


def test_cells_without_a_completed_request_are_warned_of():
    cells = [{"round": 0, "mode": m, "clients": 8, "requests": n} for m, n in (("naive", 0), ("speculative", 3))]
    warning = load.empty_cells(cells, 3.0)
    assert warning.startswith("warning: 1 of 2 cells") and "round 0 naive x8" in warning and "--duration" in warning
    assert load.empty_cells(cells[1:], 3.0) is None


def test_requests_for_each_endpoint():
    path, body = load.request_for("chat", "m", "who wrote hamlet", 8, "speculative")
    assert path == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": "who wrote hamlet"}]
    assert "prompt" not in body and body["ralm"] == {"speculate": True} and body["max_tokens"] == 8
    path, body = load.request_for("completions", "m", "who wrote hamlet", 8, "naive")
    assert path == "/v1/completions" and body["prompt"] == "who wrote hamlet" and body["ralm"] == {"speculate": False}


def test_load_drives_the_chat_endpoint(tmp_path, smollm2_lm):
    """A short run against the chat endpoint of the real instruct model (the one with a chat template);
    one mode is enough here (both modes' cells: test_load_json_schema)."""
    out = tmp_path / "chat.json"
    rc = load.main(["--model", "smollm2", "--endpoint", "chat", "--modes", "speculative", "--concurrency", "1",
                    "--rounds", "1",
                    "--duration", "4", "--warmup", "6", "--max-tokens", "4", "--n-questions", "8",
                    "--json", str(out), "--", "--stride", "2"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["endpoint"] == "chat" and [c["mode"] for c in doc["cells"]] == ["speculative"]
    for c in doc["cells"]:
        assert c["endpoint"] == "chat" and c["errors"] == 0 and c["warmup_errors"] == 0
        assert c["requests"] + c["warmup_requests"] >= 1  # answered (a loaded machine may need the warm-up)


def test_a_server_that_exits_at_start_says_how_and_why():
    """What a one-off 'server did not start' leaves to read: the exit status, how long it ran,
    the command and the server's last lines."""
    import pytest

    with pytest.raises(RuntimeError) as e:
        load.Server(["--model", "no-such-model"])
    msg = str(e.value)
    assert msg.startswith("server did not start (exit status 2, ") and "--model no-such-model" in msg
    assert "error: model 'no-such-model' is neither a model name" in msg
