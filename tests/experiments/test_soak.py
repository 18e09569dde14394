"""experiments/soak.py end to end, shortened: tiny model, two clients (one streaming), 15 s in
5-second rows, the answers re-checked against the naive loop, JSON and plot written. The spawned
server speculates whatever the load (fixed stride, no load governor), so the naive re-check is
of speculative answers."""

from __future__ import annotations

import json
import platform

from experiments import soak


def test_minute_table_buckets_by_completion_time():
    done = [{"t": 1.0, "latency_s": 1.0}, {"t": 2.0, "latency_s": 3.0}, {"t": 7.0, "latency_s": 2.0}]
    rows = soak.minute_table(done, [(6.0, "x")], [(0.5, 100 * soak.MIB), (9.0, 110 * soak.MIB)], 10.0, 5.0)
    assert [r["requests"] for r in rows] == [2, 1] and [r["errors"] for r in rows] == [0, 1]
    assert rows[0]["p50_s"] in (1.0, 3.0) and rows[1]["p99_s"] == 2.0
    assert [r["rss_mib"] for r in rows] == [100.0, 110.0]
    assert [r["heap_free_mib"] for r in rows] == [None, None]  # no heap samples given
    heap = [(4.0, {"in_use_bytes": 50 * soak.MIB, "free_bytes": 2 * soak.MIB}),
            (6.0, {"in_use_bytes": 60 * soak.MIB, "free_bytes": 3 * soak.MIB})]
    rows = soak.minute_table(done, [], [], 10.0, 5.0, heap)
    assert [(r["heap_in_use_mib"], r["heap_free_mib"]) for r in rows] == [(50.0, 2.0), (60.0, 3.0)]
    assert [r["workers_rss_mib"] for r in rows] == [None, None]  # one process: no workers
    w = {"role": "lm_replica", "pid": 1, "heap": None, "heap_trim": None}
    workers = [(4.0, [{**w, "index": 0, "rss_bytes": 10 * soak.MIB}, {**w, "index": 1, "rss_bytes": 12 * soak.MIB}]),
               (6.0, [{**w, "index": 0, "rss_bytes": 11 * soak.MIB}, {"role": "lm_replica", "index": 1, "error": "x"}])]
    rows = soak.minute_table(done, [], [], 10.0, 5.0, heap, workers)
    assert [r["workers_rss_mib"] for r in rows] == [22.0, None]  # a silent worker: no sum that looks like a drop
    assert [r["workers_rss_low_mib"] for r in rows] == [22.0, None]
    # each worker's own low in the minute, summed: the trims of two workers need not coincide
    workers = [(1.0, [{**w, "index": 0, "rss_bytes": 10 * soak.MIB}, {**w, "index": 1, "rss_bytes": 15 * soak.MIB}]),
               (3.0, [{**w, "index": 0, "rss_bytes": 14 * soak.MIB}, {**w, "index": 1, "rss_bytes": 12 * soak.MIB}]),
               (6.0, [{**w, "index": 0, "rss_bytes": 9 * soak.MIB}, {"role": "lm_replica", "index": 1, "error": "x"}]),
               (8.0, [{**w, "index": 0, "rss_bytes": 8 * soak.MIB}, {**w, "index": 1, "rss_bytes": 13 * soak.MIB}])]
    rows = soak.minute_table(done, [], [], 10.0, 5.0, heap, workers)
    assert [r["workers_rss_low_mib"] for r in rows] == [22.0, 21.0]  # min(10, 14) + min(15, 12); 8 + 13
    assert [r["workers_rss_mib"] for r in rows] == [26.0, 21.0]
    assert soak.workers_rss_low_mib([[{**w, "index": 0, "error": "x"}]]) is None  # it never answered


def test_speculation_counters_read_from_metrics():
    text = "# HELP x\nralmspec_speculated_steps_total 12\nralmspec_accepted_steps_total 10\nralmspec_rollbacks_total 2\n"
    assert soak.speculation_counters(text) == {"speculated_steps": 12.0, "accepted_steps": 10.0, "rollbacks": 2.0}


def test_soak_short_run(tmp_path):
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    rc = soak.main(["--model", "tiny", "--clients", "2", "--minutes", "0.25", "--warmup-minutes", "0.05",
                    "--bucket", "5", "--sample", "2", "--verify", "4", "--max-tokens", "8",
                    "--json", str(out), "--plot", str(png), "--", "--no-os3", "--no-load-governor"])
    assert rc == 0
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert s["errors"] == 0 and s["requests"] >= 2 and s["streamed_requests"] >= 1
    assert s["checked_questions"] >= 1 and s["checked_answers"] >= 1 and s["naive_mismatches"] == 0
    assert s["stream_prefix_violations"] == 0 and s["repeat_mismatches"] == 0
    assert s["speculated_steps"] >= s["requests"], s  # every answer speculated (fixed stride, 8 tokens)
    assert s["accepted_steps"] + s["rollbacks"] <= s["speculated_steps"]  # a rollback rejects one of them
    assert s["rss_start_mib"] > 0 and s["rss_growth_after_warmup"] is not None
    if platform.libc_ver()[0] == "glibc":  # the server's C heap, sampled from /v1/stats
        assert s["heap_end"]["in_use_mib"] > 10 and s["heap_after_warmup"]["free_mib"] >= 0
        assert any(r["heap_in_use_mib"] for r in doc["minutes"])
    assert s["workers"] == 0 and s["workers_rss_end_mib"] is None  # one process
    assert len(doc["minutes"]) >= 3 and sum(r["requests"] for r in doc["minutes"]) == s["requests"]
    assert doc["settings"]["clients"] == 2 and doc["settings"]["loadavg_before"] is not None
    assert png.stat().st_size > 1000
