"""Soak test: N closed-loop clients against ONE speculative server for many minutes.

What it checks (issue 13, "holding load"):
- no request fails (every error is counted by kind, per minute);
- no unverified token reaches a client: half of the clients STREAM, and every streamed prefix
  must be a prefix of the final text; at the end a sample of the answered questions is asked
  again with speculation OFF (the naive loop, on the same server) and every speculative answer to
  those questions, streamed or not, must equal it; a question answered several times during the
  soak must get the same text each time (greedy decoding);
- memory: the server's RSS every ``--sample`` seconds; growth is reported from the end of the
  warm-up to the end (goal < 10%); and its C heap as glibc sees it (``/v1/stats`` memory.heap:
  in use vs freed-but-kept, after the warm-up and at the end), which says whether RSS growth is
  live memory or fragmentation (run it again with ``MALLOC_ARENA_MAX=2`` etc. in the environment:
  the spawned server inherits it, and ``settings.allocator_env`` records it); with
  ``-- --lm-replicas N`` or ``-- --shards N`` also the Ray workers' RSS (``/v1/stats``
  memory.workers: two columns and lines in the plot, the sum at each minute's end and the sum of
  each worker's low in the minute, what its heap trims leave; ``workers_rss_*`` in the summary;
  every worker's own samples are in the JSON's ``server_stats``);
- latency per minute: p50 / p95 / p99 of the requests that completed in that minute, plotted
  with the RSS (``--plot``).

    python experiments/soak.py --clients 32 --minutes 20 --json soak.json --plot soak.png
    python experiments/soak.py --model tiny --clients 8 --minutes 2   # smoke run

Flags after ``--`` go to the spawned ``ralmspec serve``. A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.load import (  # noqa: E402
    MIB, Server, api_headers, load_workload, loadavg, percentile, rss_bytes, split_server_args, sse_chunks,
)


async def _one(s: Any, url: str, body: dict, stream: bool) -> tuple[str, dict, list[str]]:
    """POST one completion; returns (text, usage, the streamed pieces). Raises on non-200."""
    body = dict(body, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with s.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        if not stream:
            data = await r.json(content_type=None)
            return data["choices"][0]["text"], data.get("usage") or {}, []
        pieces, usage = [], {}
        async for chunk in sse_chunks(r):
            if chunk.get("choices"):
                pieces.append(chunk["choices"][0].get("text") or "")
            if chunk.get("usage"):
                usage = chunk["usage"]
        return "".join(pieces), usage, pieces


def speculation_counters(metrics_text: str) -> dict[str, float]:
    """Speculated / accepted steps and rollbacks since the server started, from /metrics."""
    names = {"ralmspec_speculated_steps_total": "speculated_steps", "ralmspec_accepted_steps_total": "accepted_steps",
             "ralmspec_rollbacks_total": "rollbacks"}
    out = {v: 0.0 for v in names.values()}
    for line in metrics_text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in names:
            out[names[parts[0]]] = float(parts[1])
    return out


def minute_table(done: list[dict], errors: list[tuple[float, str]], rss: list[tuple[float, int]],
                 total_s: float, bucket_s: float = 60.0,
                 heap: list[tuple[float, dict[str, int]]] = (),
                 workers: list[tuple[float, list[dict[str, Any]]]] = ()) -> list[dict[str, Any]]:
    """Per-minute (``bucket_s``) rows: completions, errors, latency percentiles, RSS at the end
    and the C heap's in-use / freed-but-kept bytes at the end (``heap``: ``(t, /v1/stats
    memory.heap)`` samples; None where the server's libc gives none), and the RSS of the
    server's Ray workers summed (``workers``: ``(t, memory.workers)`` samples; None without
    workers, or where one did not answer): at the minute's end (``workers_rss_mib``) and each
    worker's lowest in the minute, summed (``workers_rss_low_mib``: what their heap trims leave;
    each worker trims on its own clock, so the end reads a sawtooth at whatever phase it is)."""
    rows = []
    for m in range(max(1, math.ceil(total_s / bucket_s - 1e-9))):
        lo, hi = bucket_s * m, bucket_s * (m + 1)
        lat = [d["latency_s"] for d in done if lo <= d["t"] < hi]
        r = [b for t, b in rss if t < hi]
        h = [x for t, x in heap if t < hi]
        w = [x for t, x in workers if t < hi]
        w_minute = [x for t, x in workers if lo <= t < hi]
        rows.append({"minute": m + 1, "requests": len(lat), "errors": sum(1 for t, _ in errors if lo <= t < hi),
                     "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "p99_s": percentile(lat, 99),
                     "rss_mib": round(r[-1] / MIB, 1) if r else None,
                     "heap_in_use_mib": round(h[-1]["in_use_bytes"] / MIB, 1) if h else None,
                     "heap_free_mib": round(h[-1]["free_bytes"] / MIB, 1) if h else None,
                     "workers_rss_mib": workers_rss_mib(w[-1]) if w else None,
                     "workers_rss_low_mib": workers_rss_low_mib(w_minute)})
    return rows


def workers_rss_low_mib(samples: list[list[dict[str, Any]]]) -> float | None:
    """Each Ray worker's lowest RSS over ``samples`` (``memory.workers`` lists), summed; None
    without samples, or when a worker answered none of them."""
    lows: dict[tuple[str, int], int] = {}
    names: set[tuple[str, int]] = set()
    for rows in samples:
        for r in rows:
            key = (r["role"], r["index"])
            names.add(key)
            if "rss_bytes" in r:
                lows[key] = min(lows.get(key, r["rss_bytes"]), r["rss_bytes"])
    if not names or set(lows) != names:
        return None
    return round(sum(lows.values()) / MIB, 1)


def workers_rss_mib(rows: list[dict[str, Any]]) -> float | None:
    """The RSS of a server's Ray workers (``/v1/stats`` memory.workers) summed; None if there
    are none or one did not answer (a sum without it would look like a drop)."""
    if not rows or any("error" in r for r in rows):
        return None
    return round(sum(r["rss_bytes"] for r in rows) / MIB, 1)


def at_warmup(samples: list[tuple[float, Any]], warmup_s: float) -> Any:
    """The last ``(t, value)`` sample's value at the end of the warm-up (the first sample's if
    none came that early; None without samples)."""
    return ([v for t, v in samples if t <= warmup_s] or [v for _, v in samples[:1]] or [None])[-1]


def plot(rows: list[dict], rss: list[tuple[float, int]], warmup_min: float, path: str, title: str,
         bucket_s: float = 60.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    xs = [r["minute"] * bucket_s / 60.0 for r in rows]
    for key, style in (("p50_s", "o-"), ("p95_s", "s-"), ("p99_s", "^-")):
        ax.plot(xs, [r[key] for r in rows], style, label=key[:-2])
    ax.set_ylabel("latency (s), requests completed\nin the minute ending here")
    ax.legend()
    ax.set_title(title, fontsize=9)
    bx.plot([t / 60.0 for t, _ in rss], [b / MIB for _, b in rss], "-", label="RSS")
    hx = [(r["minute"] * bucket_s / 60.0, r["heap_in_use_mib"], r["heap_free_mib"]) for r in rows
          if r["heap_in_use_mib"] is not None]
    if hx:
        bx.plot([x for x, _, _ in hx], [u for _, u, _ in hx], ".--", label="C heap in use")
        bx.plot([x for x, _, _ in hx], [f for _, _, f in hx], ".:", label="C heap freed, kept")
    for key, style, label in (("workers_rss_mib", ".-", "Ray workers' RSS (sum, minute's end)"),
                              ("workers_rss_low_mib", "x-", "Ray workers' RSS after their trims (sum)")):
        wx = [(r["minute"] * bucket_s / 60.0, r[key]) for r in rows if r.get(key) is not None]
        if wx:
            bx.plot([x for x, _ in wx], [w for _, w in wx], style, label=label)
    bx.axvline(warmup_min, color="grey", linestyle=":", label="end of warm-up")
    bx.set_ylabel("memory (MiB)")
    bx.set_xlabel("minute")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def soak(a: argparse.Namespace, url: str, pid: int, questions: list[str]) -> dict[str, Any]:
    import aiohttp

    done: list[dict] = []
    errors: list[tuple[float, str]] = []
    rss: list[tuple[float, int]] = []
    prefix_violations: list[dict] = []
    stats_samples: list[dict] = []
    t0 = time.perf_counter()
    t_end = t0 + 60.0 * a.minutes

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=a.request_timeout), headers=api_headers(),
                                     connector=aiohttp.TCPConnector(limit=a.clients + 8)) as s:
        async def client(c: int) -> None:
            i, stream = c, c % 2 == 1
            while time.perf_counter() < t_end:
                qi = i % len(questions)
                i += a.clients
                body = {"model": a.model, "prompt": questions[qi], "max_tokens": a.max_tokens,
                        "ralm": {"speculate": True}}
                t = time.perf_counter()
                try:
                    text, usage, pieces = await _one(s, url, body, stream)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - counted, the soak goes on
                    errors.append((time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc)[:120]}"))
                    await asyncio.sleep(0.5)
                    continue
                now = time.perf_counter()
                got = ""
                for p in pieces:  # every prefix a streaming client saw is a prefix of the answer
                    got += p
                    if not text.startswith(got):
                        prefix_violations.append({"question": qi, "prefix": got, "text": text})
                        break
                done.append({"t": now - t0, "latency_s": now - t, "question": qi, "text": text, "stream": stream,
                             "tokens": usage.get("completion_tokens")})

        async def sampler() -> None:
            shown = -1
            while True:
                b = rss_bytes(pid)
                if b is not None:
                    rss.append((time.perf_counter() - t0, b))
                try:
                    async with s.get(f"{url}/v1/stats") as r:
                        st = await r.json()
                    stats_samples.append({"t": round(time.perf_counter() - t0, 1), "active": st.get("active"),
                                          "queued": st.get("queued"), "governor": st.get("governor"),
                                          "memory": st.get("memory")})
                except Exception:  # noqa: BLE001 - a missed sample is not a failure
                    pass
                el = time.perf_counter() - t0
                if int(el // 60) != shown:
                    shown = int(el // 60)
                    print(f"  {el / 60:5.1f} min: {len(done)} requests, {len(errors)} errors, "
                          f"rss {rss[-1][1] / MIB if rss else float('nan'):.0f} MiB", file=sys.stderr, flush=True)
                await asyncio.sleep(a.sample)

        tasks = [asyncio.create_task(client(c)) for c in range(a.clients)]
        samp = asyncio.create_task(sampler())
        await asyncio.gather(*tasks, return_exceptions=True)
        samp.cancel()
        await asyncio.gather(samp, return_exceptions=True)
        b = rss_bytes(pid)
        if b is not None:
            rss.append((time.perf_counter() - t0, b))
        soak_s = time.perf_counter() - t0
        # how much speculation the soak really did (the load governor may pause it under load)
        async with s.get(f"{url}/metrics") as r:
            spec_counts = speculation_counters(await r.text())

        # the naive loop on the same server for a sample of answered questions
        answered = sorted({d["question"] for d in done})[: a.verify]
        print(f"  checking {len(answered)} questions against the naive loop ...", file=sys.stderr, flush=True)
        naive: dict[int, str] = {}
        sem = asyncio.Semaphore(a.verify_concurrency)

        async def ref(qi: int) -> None:
            async with sem:
                body = {"model": a.model, "prompt": questions[qi], "max_tokens": a.max_tokens,
                        "ralm": {"speculate": False}}
                naive[qi] = (await _one(s, url, body, False))[0]

        await asyncio.gather(*(ref(qi) for qi in answered))

    by_q: dict[int, set[str]] = {}
    answers: dict[int, int] = {}
    for d in done:
        by_q.setdefault(d["question"], set()).add(d["text"])
        answers[d["question"]] = answers.get(d["question"], 0) + 1
    mismatches = [{"question": d["question"], "stream": d["stream"], "speculative": d["text"],
                   "naive": naive[d["question"]]}
                  for d in done if d["question"] in naive and d["text"] != naive[d["question"]]]
    repeat_mismatch = [q for q, texts in by_q.items() if len(texts) > 1]
    warm_rss = [bt for t, bt in rss if t <= 60.0 * a.warmup_minutes]
    rss_warm = warm_rss[-1] if warm_rss else (rss[0][1] if rss else None)
    rss_end = rss[-1][1] if rss else None
    # the C heap (glibc): in use vs freed-but-kept, after the warm-up and at the end
    heaps = [(x["t"], (x.get("memory") or {}).get("heap")) for x in stats_samples]
    heaps = [(t, h) for t, h in heaps if h]
    heap_warm = at_warmup(heaps, 60.0 * a.warmup_minutes)
    heap_end = heaps[-1][1] if heaps else None
    # the server's Ray workers (LM replicas, shard actors; ``-- --lm-replicas N`` / ``--shards N``)
    workers = [(x["t"], (x.get("memory") or {}).get("workers")) for x in stats_samples]
    workers = [(t, w) for t, w in workers if w]
    workers_warm = at_warmup(workers, 60.0 * a.warmup_minutes)

    def heap_mib(h: dict[str, int] | None) -> dict[str, float] | None:
        return {k.removesuffix("_bytes") + "_mib": round(v / MIB, 1) for k, v in h.items()} if h else None

    measured = [d for d in done if d["t"] >= 60.0 * a.warmup_minutes]
    lat = [d["latency_s"] for d in measured]
    # requests still running at the end finish after it: the table runs to the last completion
    rows = minute_table(done, errors, rss, max([60.0 * a.minutes] + [d["t"] for d in done]), a.bucket, heaps,
                        workers)
    return {
        "summary": {
            "requests": len(done), "errors": len(errors), "error_kinds": sorted({k for _, k in errors}),
            "soak_s": round(soak_s, 1), "requests_after_warmup": len(measured),
            "req_per_s_after_warmup": len(measured) / max(1e-9, soak_s - 60.0 * a.warmup_minutes),
            "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "p99_s": percentile(lat, 99),
            "streamed_requests": sum(1 for d in done if d["stream"]),
            "stream_prefix_violations": len(prefix_violations),
            "checked_questions": len(naive), "checked_answers": sum(1 for d in done if d["question"] in naive),
            "naive_mismatches": len(mismatches),
            "questions_answered_twice_or_more": sum(1 for n in answers.values() if n > 1),
            "repeat_mismatches": len(repeat_mismatch),
            **spec_counts,
            "governor_paused_s": (stats_samples[-1].get("governor") or {}).get("paused_s") if stats_samples else None,
            "rss_start_mib": round(rss[0][1] / MIB, 1) if rss else None,
            "rss_after_warmup_mib": round(rss_warm / MIB, 1) if rss_warm else None,
            "rss_end_mib": round(rss_end / MIB, 1) if rss_end else None,
            "rss_growth_after_warmup": (rss_end - rss_warm) / rss_warm if rss_warm and rss_end else None,
            "heap_after_warmup": heap_mib(heap_warm), "heap_end": heap_mib(heap_end),
            "workers": len(workers[-1][1]) if workers else 0,
            "workers_rss_after_warmup_mib": workers_rss_mib(workers_warm),
            "workers_rss_end_mib": workers_rss_mib(workers[-1][1]) if workers else None,
            # the server's own accounting at the end (/v1/stats memory: LM caches, encoder cache)
            "memory_end": stats_samples[-1].get("memory") if stats_samples else None,
        },
        "minutes": rows, "rss": [(round(t, 1), b) for t, b in rss], "errors": errors,
        "mismatches": mismatches[:20], "prefix_violations": prefix_violations[:20], "server_stats": stats_samples,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model the spawned server loads and the requests name")
    p.add_argument("--retriever", default="exact", help="knowledge base of the spawned server")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients (every second one streams)")
    p.add_argument("--minutes", type=float, default=20.0, help="how long the clients keep sending")
    p.add_argument("--warmup-minutes", type=float, default=2.0, help="RSS growth is measured from here")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per answer")
    p.add_argument("--questions", default="grounded", help="'grounded', 'nq-open' or a questions .jsonl")
    p.add_argument("--sample", type=float, default=10.0, help="seconds between RSS / stats samples")
    p.add_argument("--bucket", type=float, default=60.0, help="seconds per row of the latency table (a minute)")
    p.add_argument("--verify", type=int, default=24, help="answered questions re-asked with speculation off")
    p.add_argument("--verify-concurrency", type=int, default=8)
    p.add_argument("--request-timeout", type=float, default=1800.0, help="client-side seconds per request")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: p50/p95/p99 per minute and RSS over time")
    return p


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_server_args(argv)
    a = build_parser().parse_args(argv)
    if a.clients < 1 or a.minutes <= 0 or not 0 <= a.warmup_minutes < a.minutes or a.bucket <= 0 or a.sample <= 0:
        raise SystemExit("need --clients >= 1, --minutes > 0, 0 <= --warmup-minutes < --minutes, --bucket > 0, "
                         "--sample > 0")
    questions = load_workload(a.questions, 0)
    flags = ["--model", a.model, "--retriever", a.retriever, "--max-concurrent", str(a.clients),
             "--max-queue", str(4 * a.clients), "--request-timeout", "0", *extra]
    settings = {"command": "python experiments/soak.py " + shlex.join(argv + (["--", *extra] if extra else [])),
                "model": a.model, "retriever": a.retriever, "clients": a.clients, "minutes": a.minutes,
                "warmup_minutes": a.warmup_minutes, "max_tokens": a.max_tokens, "questions": a.questions,
                "n_questions": len(questions), "server_flags": flags,
                "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "LD_PRELOAD"))},
                "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()},
                "loadavg_before": loadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"soak: {a.clients} clients x {a.minutes} min, {a.model} on {a.retriever}", file=sys.stderr, flush=True)
    server = Server(flags)
    try:
        out = asyncio.run(soak(a, server.url, server.pid, questions))
    finally:
        server.stop()
    settings["loadavg_after"] = loadavg()
    doc = {"settings": settings, **out}
    s = out["summary"]
    print(json.dumps(s, indent=1))
    has_workers = bool(s["workers"])
    print(f"{'minute':>6} {'req':>5} {'err':>4} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'RSS MiB':>8} "
          f"{'heap used':>9} {'heap free':>9}" + (f" {'workers RSS':>11} {'workers low':>11}" if has_workers else ""))
    for r in out["minutes"]:
        f = lambda v: f"{v:7.2f}" if v is not None else "      -"  # noqa: E731
        g = lambda v, w: f"{v if v is not None else '-':>{w}}"  # noqa: E731
        print(f"{r['minute']:>6} {r['requests']:>5} {r['errors']:>4} {f(r['p50_s'])} {f(r['p95_s'])} "
              f"{f(r['p99_s'])} {g(r['rss_mib'], 8)} {g(r['heap_in_use_mib'], 9)} {g(r['heap_free_mib'], 9)}"
              + (f" {g(r['workers_rss_mib'], 11)} {g(r['workers_rss_low_mib'], 11)}" if has_workers else ""))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1))
    if a.plot:
        plot(out["minutes"], out["rss"], a.warmup_minutes, a.plot,
             f"soak: {a.clients} clients, {a.model}, {a.retriever}, {a.max_tokens} tokens", a.bucket)
    ok = s["errors"] == 0 and s["naive_mismatches"] == 0 and s["stream_prefix_violations"] == 0 \
        and s["repeat_mismatches"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
