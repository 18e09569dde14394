"""Fair load test of the OpenAI-compatible server: naive vs speculative, N closed-loop clients.

Every cell ``(round, clients, mode)`` gets a FRESH ``ralmspec serve`` process, so neither mode
inherits the other's warm caches (query encodings, tokenized passages, the LM's KV prefixes).
In each round, for each concurrency, the two modes run one after the other, and which mode goes
first alternates from one round to the next and from one concurrency to the next. Within a cell, N closed-loop clients
send questions to ``/v1/completions``, or as one user message to ``/v1/chat/completions`` with
``--endpoint chat`` (``ralm.speculate`` true or false), for ``--warmup`` seconds
that are NOT counted, then for ``--duration`` measured seconds. Only requests that complete
inside the measured window count; requests still running at its end are abandoned (the server
is stopped). The question order is a seeded shuffle per round, identical for both modes of a
round: client c sends questions c, c+N, c+2N, ... of it, so both modes get the same sequence.

Per cell: requests/s, tokens/s, p50/p95/p99 latency, errors, the server's RSS at the start and
end of the window, speculation acceptance and counts (``speculated_steps``: 0 means the
speculative cell ran as the naive loop), and the CROSS-REQUEST batching the server saw in the
window (distinct queries and merged requests per knowledge-base search, prompts per LM call),
from ``GET /v1/stats`` at both ends. At the end: a table per cell and the speculative / naive
ratios per number of clients.

    python experiments/load.py --concurrency 1 8 --rounds 3 --duration 25 --warmup 10 --json out.json
    python experiments/load.py --model tiny --concurrency 8 -- --emulate-pad 1000000
    python experiments/load.py --endpoint chat --concurrency 1 8 --json chat.json   # needs a chat model
    python experiments/load.py --url http://127.0.0.1:8000 --model tiny   # one server for all: NOT fair

Flags after ``--`` go to every spawned ``ralmspec serve``. This is a measurement script, not a
test; numbers depend on the machine (its load average is kept beside the results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

REPO = Path(__file__).resolve().parents[1]
MODES = ("naive", "speculative")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
MIB = 2**20


def rss_bytes(pid: int) -> int | None:
    """RSS of ``pid``: psutil when installed, else /proc/<pid>/status."""
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - process gone
        return None
    sys.path.insert(0, str(REPO))
    from ralmspec.memory import process_rss_bytes

    return process_rss_bytes(pid)


async def rss_from_metrics(session: Any, url: str) -> int | None:
    async with session.get(f"{url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("ralmspec_process_resident_memory_bytes "):
                v = float(line.split()[1])
                return None if math.isnan(v) else int(v)
    return None


def api_headers() -> dict[str, str]:
    """The ``Authorization`` header for a server started with ``--api-key``: the key in
    ``$RALMSPEC_API_KEY`` (which a spawned server reads too), else none."""
    key = os.environ.get("RALMSPEC_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def split_server_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """``(the script's own arguments, the flags after "--" for the spawned server)``; ``argv``
    None: the command line's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    k = argv.index("--")
    return argv[:k], argv[k + 1:]


async def sse_chunks(response: Any) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of a streamed answer (an aiohttp response of Server-Sent Events), in
    order, the closing ``[DONE]`` left out."""
    buf = ""
    async for raw in response.content:
        buf += raw.decode()
        while "\n\n" in buf:
            event, buf = buf.split("\n\n", 1)
            if event.startswith("data: ") and event != "data: [DONE]":
                yield json.loads(event[len("data: "):])


class Server:
    """``ralmspec serve`` (or another serving command, e.g. ``("knnlm", "serve")``) as a child
    process on a free port."""

    def __init__(self, args: list[str], command: tuple[str, ...] = ("serve",)):
        cmd = [sys.executable, "-m", "ralmspec.cli", *command, "--host", "127.0.0.1", "--port", "0", *args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        t = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.url = None
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            if "serving on" in line:
                self.url = line.split("serving on", 1)[1].strip()
                break
        if self.url is None:
            self.stop()
            raise RuntimeError(f"server did not start (exit status {self.proc.returncode}, "
                               f"{time.perf_counter() - t:.1f} s): {shlex.join(cmd[1:])}\n" + "".join(lines[-20:]))
        self.start_s = time.perf_counter() - t
        self.pid = self.proc.pid
        print(f"  server up in {self.start_s:.1f}s at {self.url}", file=sys.stderr, flush=True)
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


# --------------------------------------------------------------------------- plan and workload


def plan_cells(rounds: int, concurrency: list[int], modes: list[str]) -> list[tuple[int, int, str]]:
    """``(round, clients, mode)`` in run order: rounds outermost, then concurrency; the order of
    the modes alternates with ``round + concurrency index``, so over two rounds each mode runs
    first once at every concurrency."""
    out = []
    for r in range(rounds):
        for i, n in enumerate(concurrency):
            order = list(modes) if (r + i) % 2 == 0 else list(reversed(modes))
            out += [(r, n, m) for m in order]
    return out


def question_order(questions: list[str], seed: int, round_: int) -> list[str]:
    """The question stream of one round (both modes get this same list)."""
    qs = list(questions)
    random.Random(seed * 1_000_003 + round_).shuffle(qs)
    return qs


def load_workload(spec: str, n: int) -> list[str]:
    """Question texts: 'grounded' (embedded, about the embedded knowledge base), 'nq-open' or a file."""
    sys.path.insert(0, str(REPO))
    from ralmspec.data.loaders import load_questions, resolve_questions

    qs = [q.question for q in load_questions(resolve_questions(spec))]
    return qs[:n] if n > 0 else qs


# --------------------------------------------------------------------------- one cell


def percentile(xs: list[float], p: float) -> float | None:
    """The ``p``-th percentile of ``xs`` (nearest rank), None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[i]


def _delta_counts(after: dict, before: dict) -> dict[int, int]:
    a, b = after.get("counts", {}), before.get("counts", {})
    out = {int(k): v - b.get(k, 0) for k, v in a.items()}
    return {k: v for k, v in sorted(out.items()) if v > 0}


def _summ(counts: dict[int, int]) -> dict[str, Any]:
    n = sum(counts.values())
    tot = sum(k * v for k, v in counts.items())
    return {"calls": n, "mean": round(tot / n, 3) if n else None, "max": max(counts) if counts else None,
            "counts": counts}


def _mib(b: int | None) -> float | None:
    return None if b is None else round(b / MIB, 1)


async def _snapshot(session: Any, url: str, pid: int | None) -> dict[str, Any]:
    async with session.get(f"{url}/v1/stats") as r:
        stats = await r.json()
    rss = rss_bytes(pid) if pid else await rss_from_metrics(session, url)
    return {"stats": stats, "rss": rss, "loadavg": loadavg(), "t": time.perf_counter()}


def request_for(endpoint: str, model: str, question: str, max_tokens: int, mode: str) -> tuple[str, dict[str, Any]]:
    """``(path, body)`` asking ``question`` on ``endpoint`` ("completions": the prompt; "chat": one
    user message, laid out by the server exactly as the completions prompt)."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "ralm": {"speculate": mode == "speculative"}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": question}]
    else:
        body["prompt"] = question
    return ENDPOINTS[endpoint], body


async def run_cell(url: str, model: str, questions: list[str], mode: str, clients: int, warmup: float,
                   duration: float, max_tokens: int, pid: int | None,
                   endpoint: str = "completions") -> dict[str, Any]:
    """N closed-loop clients for ``warmup + duration`` seconds; statistics of the measured window."""
    import aiohttp

    done: list[tuple[float, float, dict]] = []  # (completed at, latency, response body)
    errors: list[tuple[float, str]] = []  # (at, kind)
    t0 = time.perf_counter()
    t_w, t_end = t0 + warmup, t0 + warmup + duration

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600), headers=api_headers(),
                                     connector=aiohttp.TCPConnector(limit=clients + 4)) as s:
        async def client(c: int) -> None:
            i = c
            while True:
                path, body = request_for(endpoint, model, questions[i % len(questions)], max_tokens, mode)
                i += clients
                t = time.perf_counter()
                try:
                    async with s.post(f"{url}{path}", json=body) as r:
                        status = r.status
                        data = await r.json(content_type=None)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                    errors.append((time.perf_counter(), type(exc).__name__))
                    await asyncio.sleep(0.05)
                    continue
                now = time.perf_counter()
                if status != 200:
                    errors.append((now, str(status)))
                    await asyncio.sleep(0.05)
                    continue
                done.append((now, now - t, data))

        tasks = [asyncio.create_task(client(c)) for c in range(clients)]
        try:
            await asyncio.sleep(max(0.0, t_w - time.perf_counter()))
            before = await _snapshot(s, url, pid)
            await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
            after = await _snapshot(s, url, pid)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    counted = [(lat, d) for at, lat, d in done if t_w <= at < t_end]
    errs = [k for at, k in errors if t_w <= at < t_end]
    lat = [x for x, _ in counted]
    tokens = sum(d["usage"]["completion_tokens"] for _, d in counted)
    spec_stats = [d["ralm"]["stats"] for _, d in counted]
    speculated = sum(st.get("speculated", 0) for st in spec_stats)
    accepted = sum(st.get("accepted", 0) for st in spec_stats)
    sa, sb = after["stats"], before["stats"]
    kb_q = _summ(_delta_counts(sa["kb_batch_queries"], sb["kb_batch_queries"]))
    kb_c = _summ(_delta_counts(sa["kb_batch_callers"], sb["kb_batch_callers"]))
    lm_b = _summ(_delta_counts(sa["lm_batch_sizes"], sb["lm_batch_sizes"]))
    cell = {
        "mode": mode, "clients": clients, "endpoint": endpoint, "duration_s": duration, "warmup_s": warmup,
        "requests": len(counted), "errors": len(errs),
        "error_kinds": {k: errs.count(k) for k in sorted(set(errs))},
        "warmup_requests": sum(1 for at, _, _ in done if at < t_w),
        "warmup_errors": sum(1 for at, _ in errors if at < t_w),
        "completion_tokens": tokens,
        "req_per_s": len(counted) / duration, "tok_per_s": tokens / duration,
        # Little's law for N closed-loop clients with no think time: X = N / mean latency. Counting
        # completions in a window is quantised when requests finish in waves (a slow model at many
        # clients: all N admitted together finish together); this estimate is not.
        "req_per_s_little": clients / statistics.fmean(lat) if lat else None,
        "mean_s": statistics.fmean(lat) if lat else None,
        "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "p99_s": percentile(lat, 99),
        "acceptance": accepted / speculated if speculated else None,
        # what the window's speculative requests speculated (0: they all ran as the naive loop)
        "speculated_steps": speculated, "accepted": accepted,
        "verified_steps": sum(st.get("verified_steps", 0) for st in spec_stats),
        "rollbacks": sum(st.get("rollbacks", 0) for st in spec_stats),
        # verified steps taken because the server's load governor paused speculation
        "paused_steps": sum(st.get("paused_steps", 0) for st in spec_stats),
        "governor_paused_s": round(sa.get("governor", {}).get("paused_s", 0.0)
                                   - sb.get("governor", {}).get("paused_s", 0.0), 4),
        # the fixed share of a knowledge-base call at the window's end (governor's KB rule)
        "kb_fixed_share": sa.get("governor", {}).get("kb_fixed_share"),
        # cross-request batching in the window: distinct queries / merged requests per KB search
        "queries_per_search": kb_q["mean"], "requests_per_search": kb_c["mean"],
        "lm_prompts_per_call": lm_b["mean"], "kb_searches": kb_q["calls"],
        "kb_busy_s": round(sa.get("kb_busy_s", 0.0) - sb.get("kb_busy_s", 0.0), 4),
        "lm_busy_s": round(sa.get("lm_busy_s", 0.0) - sb.get("lm_busy_s", 0.0), 4),
        "kb_queries": kb_q, "kb_requests": kb_c, "lm_batches": lm_b,
        "rss_start_mib": _mib(before["rss"]), "rss_end_mib": _mib(after["rss"]),
        "loadavg_start": before["loadavg"], "loadavg_end": after["loadavg"],
        "knowledge_base": sa.get("knowledge_base"), "retriever_kind": sa.get("retriever"),
        "lm_runner": sa.get("lm_runner"),  # at the window's end: name, CUDA graphs held, ...
    }
    if "emulation" in sa and "emulation" in sb:
        cell["pad_scan_s"] = round(sa["emulation"]["pad_seconds"] - sb["emulation"]["pad_seconds"], 4)
    return cell


# --------------------------------------------------------------------------- report


def _mean(cells: list[dict[str, Any]], key: str) -> float | None:
    xs = [c[key] for c in cells if c[key] is not None]
    return statistics.fmean(xs) if xs else None


def ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speculative / naive per number of clients: of the per-mode means over rounds, and per round."""
    out = []
    for n in sorted({c["clients"] for c in cells}):
        by = {m: [c for c in cells if c["clients"] == n and c["mode"] == m] for m in MODES}
        if not by["naive"] or not by["speculative"]:
            continue
        row: dict[str, Any] = {"clients": n, "rounds": min(len(by["naive"]), len(by["speculative"]))}
        for key in ("req_per_s", "req_per_s_little", "tok_per_s", "p50_s", "p95_s", "p99_s"):
            a, b = _mean(by["speculative"], key), _mean(by["naive"], key)
            row[f"naive_{key}"], row[f"speculative_{key}"] = b, a
            row[f"{key}_ratio"] = a / b if a is not None and b else None
        naive = {c["round"]: c["req_per_s"] for c in by["naive"]}
        row["req_per_s_ratio_per_round"] = [c["req_per_s"] / naive[c["round"]] if naive.get(c["round"]) else None
                                            for c in by["speculative"] if c["round"] in naive]
        out.append(row)
    return out


def empty_cells(cells: list[dict[str, Any]], duration: float) -> str | None:
    """A warning when some cells completed no request in their measured window (their req/s and
    latencies are then no measurement: every request outlived the window), else None."""
    empty = [f"round {c['round']} {c['mode']} x{c['clients']}" for c in cells if c["requests"] == 0]
    if not empty:
        return None
    return (f"warning: {len(empty)} of {len(cells)} cells completed no request in their {duration:g} s window "
            f"({', '.join(empty)}): no figure for them; lengthen --duration (and --warmup) or lower --max-tokens")


def _f(v: Any, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{format(v, spec):>{width}}"


def print_cells(cells: list[dict[str, Any]], header: bool = True) -> None:
    if header:
        print(f"{'round':>5} {'mode':<12}{'N':>4}{'req':>6}{'err':>5}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}"
              f"{'p95 s':>8}{'p99 s':>8}{'accept':>8}{'spec steps':>11}{'q/search':>9}{'req/search':>11}"
              f"{'LM batch':>9}{'RSS MiB':>14}")
    for c in cells:
        rss = f"{_f(c['rss_start_mib'], '.0f', 0)}->{_f(c['rss_end_mib'], '.0f', 0)}"
        print(f"{c['round']:>5} {c['mode']:<12}{c['clients']:>4}{c['requests']:>6}{c['errors']:>5}"
              f"{c['req_per_s']:>8.2f}{c['tok_per_s']:>8.1f}{_f(c['p50_s'], '.2f', 8)}{_f(c['p95_s'], '.2f', 8)}"
              f"{_f(c['p99_s'], '.2f', 8)}{_f(c['acceptance'], '.2f', 8)}{c['speculated_steps']:>11}"
              f"{_f(c['queries_per_search'], '.2f', 9)}"
              f"{_f(c['requests_per_search'], '.2f', 11)}{_f(c['lm_prompts_per_call'], '.2f', 9)}{rss:>14}",
              flush=True)


def print_ratios(rows: list[dict[str, Any]]) -> None:
    print("\nspeculative / naive (means over rounds; > 1 is better for req/s and tok/s, < 1 for latency)")
    print(f"{'N':>4}{'rounds':>7}{'naive req/s':>12}{'spec req/s':>11}{'req/s':>8}{'N/mean':>8}{'tok/s':>8}{'p50':>8}"
          f"{'p95':>8}{'p99':>8}   req/s per round")
    for r in rows:
        per = " ".join(_f(x, '.2f', 0) for x in r["req_per_s_ratio_per_round"])
        print(f"{r['clients']:>4}{r['rounds']:>7}{_f(r['naive_req_per_s'], '.2f', 12)}"
              f"{_f(r['speculative_req_per_s'], '.2f', 11)}{_f(r['req_per_s_ratio'], '.2f', 8)}"
              f"{_f(r['req_per_s_little_ratio'], '.2f', 8)}"
              f"{_f(r['tok_per_s_ratio'], '.2f', 8)}{_f(r['p50_s_ratio'], '.2f', 8)}{_f(r['p95_s_ratio'], '.2f', 8)}"
              f"{_f(r['p99_s_ratio'], '.2f', 8)}   {per}")


def _write(path: str, doc: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None,
                   help="an already running server for every cell (NOT fair: warm caches carry over; "
                        "default: a fresh server per cell)")
    p.add_argument("--model", default="smollm2", help="model to serve and to name in requests ('tiny' for smoke runs)")
    p.add_argument("--retriever", default="exact")
    p.add_argument("--endpoint", default="completions", choices=sorted(ENDPOINTS),
                   help="completions: the question as the prompt; chat: as one user message (needs a model "
                        "with a chat template)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="closed-loop clients per cell")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--rounds", type=int, default=3, help="repetitions of every (clients, mode) cell, interleaved")
    p.add_argument("--duration", type=float, default=25.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds per cell before the measured window (not counted)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--questions", default="grounded",
                   help="'grounded' (embedded questions about the embedded knowledge base), 'nq-open', or a file")
    p.add_argument("--n-questions", type=int, default=0, help="use the first N questions (0: all), then shuffle")
    p.add_argument("--seed", type=int, default=0, help="question order: seeded per round, the same for both modes")
    p.add_argument("--json", default=None, help="write settings and cells here (rewritten after every cell)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_server_args(argv)
    a = build_parser().parse_args(argv)
    if (a.rounds < 1 or not 0 < a.duration < math.inf or not 0 <= a.warmup < math.inf
            or min(a.concurrency) < 1 or a.max_tokens < 1 or a.n_questions < 0):
        print("error: --rounds, --concurrency, --max-tokens must be >= 1, --n-questions >= 0, --duration a "
              "finite number > 0, --warmup a finite number >= 0", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from ralmspec.errors import RalmSpecError
    from ralmspec.paths import check_output_path

    try:
        if a.json:
            check_output_path(a.json, "--json")
        return _run(a, argv, extra, load_workload(a.questions, a.n_questions))
    except RalmSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the cell's server is stopped on the way out
        return 130


def _run(a: argparse.Namespace, argv: list[str], extra: list[str], questions: list[str]) -> int:
    """Every cell of the plan (``main`` checked the flags and loaded ``questions``); the exit status."""
    n_max = max(a.concurrency)
    server_flags = ["--model", a.model, "--retriever", a.retriever, "--max-concurrent", str(n_max),
                    "--max-queue", str(4 * n_max), *extra]
    if a.url:
        print("warning: --url: one server for every cell, so later cells find warm caches; NOT a fair "
              "comparison (leave --url out for a fresh server per cell)", file=sys.stderr)
    settings: dict[str, Any] = {
        "command": shlex.join(["python", "experiments/load.py", *argv]),
        "model": a.model, "retriever": a.retriever, "endpoint": a.endpoint, "max_tokens": a.max_tokens,
        "duration_s": a.duration, "warmup_s": a.warmup, "rounds": a.rounds, "concurrency": a.concurrency,
        "modes": a.modes, "questions": a.questions, "n_questions": len(questions), "seed": a.seed,
        "fresh_server_per_cell": a.url is None, "url": a.url,
        "server_flags": None if a.url else server_flags, "extra_server_flags": extra,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "loadavg_before": loadavg(), "loadavg_after": None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    cells: list[dict[str, Any]] = []
    plan = plan_cells(a.rounds, a.concurrency, a.modes)
    for k, (r, n, mode) in enumerate(plan):
        print(f"[{k + 1}/{len(plan)}] round {r} {mode} x{n}: warm-up {a.warmup:g}s + {a.duration:g}s measured",
              file=sys.stderr, flush=True)
        try:
            server = None if a.url else Server(server_flags)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        url = a.url or server.url
        try:
            cell = asyncio.run(run_cell(url, a.model, question_order(questions, a.seed, r), mode, n, a.warmup,
                                        a.duration, a.max_tokens, server.pid if server else None, a.endpoint))
        except OSError as exc:  # aiohttp's connection errors are OSErrors: a wrong --url, a server gone
            print(f"error: cannot reach the server at {url}: {exc}", file=sys.stderr)
            return 2
        finally:
            if server is not None:
                server.stop()
        cell = {"round": r, "position": 0 if k == 0 or plan[k - 1][:2] != (r, n) else 1, **cell,
                "server_start_s": round(server.start_s, 2) if server else None}
        cells.append(cell)
        print_cells([cell], header=k == 0)
        if a.json:
            _write(a.json, {"settings": settings, "cells": cells})
    settings["loadavg_after"] = loadavg()
    settings["knowledge_base"] = cells[0]["knowledge_base"] if cells else None
    rows = ratios(cells)
    print(f"\nmodel={a.model} endpoint={ENDPOINTS[a.endpoint]} retriever={a.retriever} "
          f"knowledge base: {settings['knowledge_base']}; "
          f"max_tokens={a.max_tokens} warm-up={a.warmup:g}s measured={a.duration:g}s rounds={a.rounds} "
          f"fresh server per cell: {a.url is None}; cpu_count={os.cpu_count()} "
          f"loadavg before={settings['loadavg_before']} after={settings['loadavg_after']}")
    print_cells(sorted(cells, key=lambda c: (c["clients"], c["mode"], c["round"])))
    print_ratios(rows)
    settings["warning"] = empty_cells(cells, a.duration)
    if settings["warning"]:
        print(settings["warning"], file=sys.stderr)
    if a.json:
        _write(a.json, {"settings": settings, "cells": cells, "ratios": rows})
        print(f"wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
