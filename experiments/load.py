"""Load test of the OpenAI-compatible server: N concurrent clients for T seconds.

Spawns ``ralmspec serve`` (or uses ``--url``), then for every (mode, concurrency) pair runs N
closed-loop clients for T seconds, each sending NQ-open questions to ``/v1/completions`` with
``ralm.speculate`` true (speculative) or false (naive), and reports throughput (requests/s,
tokens/s), p50/p95/p99 latency, errors, the server's RSS at start and end of the run, the
speculation acceptance, and the CROSS-REQUEST batch sizes the server observed during the run
(LM prompts per backend call, distinct queries and merged callers per knowledge-base call,
read from ``GET /v1/stats`` before and after).

    python experiments/load.py --model tiny --concurrency 1 8 32 --duration 25
    python experiments/load.py --url http://127.0.0.1:8000 --model tiny --concurrency 8 --duration 10

This is a measurement script, not a test. Numbers depend on the machine; the JSON output keeps
the settings beside the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def rss_bytes(pid: int) -> int | None:
    """RSS of ``pid``: psutil when installed, else /proc/<pid>/status."""
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - process gone
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def rss_from_metrics(session: Any, url: str) -> int | None:
    async with session.get(f"{url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("ralmspec_process_resident_memory_bytes "):
                v = float(line.split()[1])
                return None if v != v else int(v)
    return None


class Server:
    """``ralmspec serve`` as a child process on a free port."""

    def __init__(self, args: list[str]):
        cmd = [sys.executable, "-m", "ralmspec.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        print("starting:", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.url = None
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            print("  server:", line.rstrip(), file=sys.stderr, flush=True)
            if "serving on" in line:
                self.url = line.split("serving on", 1)[1].strip()
                break
        if self.url is None:
            raise RuntimeError("server did not start:\n" + "".join(lines))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[i]


def _delta_counts(after: dict, before: dict) -> dict[int, int]:
    a, b = after.get("counts", {}), before.get("counts", {})
    out = {int(k): v - b.get(k, 0) for k, v in a.items()}
    return {k: v for k, v in sorted(out.items()) if v > 0}


def _summ(counts: dict[int, int]) -> dict[str, Any]:
    n = sum(counts.values())
    tot = sum(k * v for k, v in counts.items())
    return {"batches": n, "mean": round(tot / n, 2) if n else None, "max": max(counts) if counts else None,
            "counts": counts}


@dataclass
class RunResult:
    mode: str
    concurrency: int
    duration_s: float
    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    speculated: int = 0
    accepted: int = 0
    rollbacks: int = 0
    rss_start: int | None = None
    rss_end: int | None = None
    lm_batches: dict = field(default_factory=dict)
    kb_queries: dict = field(default_factory=dict)
    kb_callers: dict = field(default_factory=dict)
    request_verify_batch_sizes: dict[int, int] = field(default_factory=dict)
    loadavg_1min: tuple[float, float] | None = None  # machine load at start and end (noise indicator)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("latencies")
        d.update(
            requests_per_s=self.requests / self.duration_s, tokens_per_s=self.completion_tokens / self.duration_s,
            p50_s=_pct(self.latencies, 50), p95_s=_pct(self.latencies, 95), p99_s=_pct(self.latencies, 99),
            acceptance_rate=self.accepted / self.speculated if self.speculated else None,
        )
        return d


async def run_one(url: str, model: str, questions: list[str], mode: str, concurrency: int, duration: float,
                  max_tokens: int, pid: int | None) -> RunResult:
    import aiohttp

    res = RunResult(mode, concurrency, duration)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency + 4)) as s:
        async with s.get(f"{url}/v1/stats") as r:
            before = await r.json()
        res.rss_start = rss_bytes(pid) if pid else await rss_from_metrics(s, url)
        load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def client(ci: int) -> None:
            i = ci
            while time.perf_counter() < deadline:
                q = questions[i % len(questions)]
                i += concurrency
                body = {"model": model, "prompt": q, "max_tokens": max_tokens,
                        "ralm": {"speculate": mode == "speculative"}}
                t = time.perf_counter()
                try:
                    async with s.post(f"{url}/v1/completions", json=body) as r:
                        data = await r.json()
                        status = r.status
                except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                    res.errors += 1
                    res.error_kinds[type(exc).__name__] = res.error_kinds.get(type(exc).__name__, 0) + 1
                    continue
                if status != 200:
                    res.errors += 1
                    res.error_kinds[str(status)] = res.error_kinds.get(str(status), 0) + 1
                    continue
                res.latencies.append(time.perf_counter() - t)
                res.requests += 1
                res.completion_tokens += data["usage"]["completion_tokens"]
                st = data["ralm"]["stats"]
                res.speculated += st.get("speculated", 0)
                res.accepted += st.get("accepted", 0)
                res.rollbacks += st.get("rollbacks", 0)
                for b in st.get("verify_batch_sizes", []):
                    res.request_verify_batch_sizes[b] = res.request_verify_batch_sizes.get(b, 0) + 1

        await asyncio.gather(*(client(c) for c in range(concurrency)))
        res.duration_s = time.perf_counter() - t0
        res.rss_end = rss_bytes(pid) if pid else await rss_from_metrics(s, url)
        if load0 is not None:
            res.loadavg_1min = (load0, os.getloadavg()[0])
        async with s.get(f"{url}/v1/stats") as r:
            after = await r.json()
    res.lm_batches = _summ(_delta_counts(after["lm_batch_sizes"], before["lm_batch_sizes"]))
    res.kb_queries = _summ(_delta_counts(after["kb_batch_queries"], before["kb_batch_queries"]))
    res.kb_callers = _summ(_delta_counts(after["kb_batch_callers"], before["kb_batch_callers"]))
    res.request_verify_batch_sizes = dict(sorted(res.request_verify_batch_sizes.items()))
    return res


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    hdr = (f"{'mode':<12}{'N':>4}{'req':>6}{'err':>5}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}"
           f"{'accept':>8}{'LM batch':>14}{'KB q/call':>14}{'KB callers':>14}{'RSS MiB':>16}")
    print(hdr)
    for r in rows:
        rss = f"{_fmt(r['rss_start'] and r['rss_start'] / 2**20, '.0f')}->{_fmt(r['rss_end'] and r['rss_end'] / 2**20, '.0f')}"
        print(f"{r['mode']:<12}{r['concurrency']:>4}{r['requests']:>6}{r['errors']:>5}{r['requests_per_s']:>8.2f}"
              f"{r['tokens_per_s']:>8.1f}{_fmt(r['p50_s'], '8.2f')}{_fmt(r['p95_s'], '8.2f')}{_fmt(r['p99_s'], '8.2f')}"
              f"{_fmt(r['acceptance_rate'], '8.2f') if r['acceptance_rate'] is not None else '       -'}"
              f"{_fmt(r['lm_batches']['mean'], '>8.2f')}/{_fmt(r['lm_batches']['max'], '<5')}"
              f"{_fmt(r['kb_queries']['mean'], '>8.2f')}/{_fmt(r['kb_queries']['max'], '<5')}"
              f"{_fmt(r['kb_callers']['mean'], '>8.2f')}/{_fmt(r['kb_callers']['max'], '<5')}{rss:>16}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an already running server (default: spawn one)")
    p.add_argument("--model", default="tiny", help="model to serve / to name in requests")
    p.add_argument("--retriever", default="exact")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--modes", nargs="+", default=["speculative", "naive"], choices=["speculative", "naive"])
    p.add_argument("--duration", type=float, default=25.0, help="seconds per (mode, concurrency) run")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--questions", type=int, default=200, help="distinct NQ-open questions cycled by the clients")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("server_args", nargs=argparse.REMAINDER,
                   help="after `--`: extra `ralmspec serve` flags for the spawned server")
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from ralmspec.data.loaders import default_questions

    questions = [q.question for q in default_questions()[: a.questions]]
    server = None
    pid = None
    url = a.url
    extra = [x for x in a.server_args if x != "--"]
    if url is None:
        server = Server(["--model", a.model, "--retriever", a.retriever, "--max-concurrent", str(max(a.concurrency)),
                         "--max-queue", str(4 * max(a.concurrency)), *extra])
        url, pid = server.url, server.proc.pid
    rows: list[dict[str, Any]] = []
    try:
        async def warm() -> None:
            import aiohttp

            async with aiohttp.ClientSession() as s:
                for mode in a.modes:
                    async with s.post(f"{url}/v1/completions", json={
                            "model": a.model, "prompt": questions[-1], "max_tokens": a.max_tokens,
                            "ralm": {"speculate": mode == "speculative"}}) as r:
                        if r.status != 200:
                            raise RuntimeError(f"warm-up failed: HTTP {r.status} {await r.text()}")

        asyncio.run(warm())
        for n in a.concurrency:
            for mode in a.modes:
                print(f"run: {mode} x{n} for {a.duration:.0f}s ...", file=sys.stderr, flush=True)
                r = asyncio.run(run_one(url, a.model, questions, mode, n, a.duration, a.max_tokens, pid))
                rows.append(r.summary())
                print_table(rows[-1:])
    finally:
        if server is not None:
            server.stop()
    print()
    print(f"model={a.model} retriever={a.retriever} max_tokens={a.max_tokens} duration={a.duration}s "
          f"cpu_count={os.cpu_count()} loadavg={os.getloadavg() if hasattr(os, 'getloadavg') else '-'}")
    print_table(rows)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(a).items()}, "runs": rows}, f, indent=1)
        print(f"wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
