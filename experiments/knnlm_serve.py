"""kNN-LM over HTTP: naive vs speculative through ``ralmspec knnlm serve``, every answer compared.

Each cell ``(round, concurrency C, mode)`` gets a FRESH server process (no warm state crosses
cells) started with ``--max-concurrent C``; C closed-loop clients then send the same prompts
(client c sends prompts c, c+C, ...). Within a round and concurrency the mode that goes first
alternates. Per cell: completion tokens/s, mean and p50 latency, the peak of requests decoding
at once and the speculation counters from ``GET /v1/stats``; per round and concurrency the
speculative / naive ratio of tokens/s. Every answer (text, finish reason, usage) is compared
with the naive answer of the first concurrency in the same round: exit status 1 if any differs.
With ``--runners`` each LM runner (``--lm-runner``) gets its own cells and its own reference
answers (two runners round differently), and the table adds each runner's tokens/s over the
first runner's at the same concurrency and mode (``batched`` shares forwards and searches between
requests, ``eager`` gives each decoding thread its own runner: docs/knnlm.md); ``rows/fw`` is
the mean number of requests per shared forward, ``verif`` the speculative requests' verified
steps (first tokens, OS^3's fallback and, on ``batched``, steps paused while several requests
decode: ``--speculate-max-active``).

    python experiments/knnlm_serve.py --datastore ds/ --n 20 --max-tokens 32 --rounds 2 --json out.json -- --k 8
    python experiments/knnlm_serve.py --datastore ds/ --concurrency 1 2 -- --threads 1
    python experiments/knnlm_serve.py --datastore ds/ --concurrency 1 4 --runners eager batched -- --threads 2
    python experiments/knnlm_serve.py --datastore ds/ --concurrency 4 8 \
        --variants 'paused:--lm-runner batched' 'unpaused:--lm-runner batched --speculate-max-active 8' \
        -- --threads 2

(``--variants``, like ``--runners``, gives each labelled set of server flags its own cells and
reference answers.)

Flags after ``--`` go to every spawned ``ralmspec knnlm serve``. A measurement script, not a
test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.load import Server, api_headers, loadavg, percentile, split_server_args  # noqa: E402
from ralmspec.knnlm.cli import bench_texts  # noqa: E402

MODES = ("naive", "speculative")


async def run_cell(url: str, prompts: list[str], max_tokens: int, mode: str, clients: int) -> dict[str, Any]:
    """``clients`` closed-loop clients send the prompts; the answers (in prompt order) and the figures."""
    import aiohttp

    async with aiohttp.ClientSession(headers=api_headers()) as s:
        async with s.get(f"{url}/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        answers: list[Any] = [None] * len(prompts)
        latencies: list[float] = []

        async def client(c: int) -> None:
            for i in range(c, len(prompts), clients):
                body = {"model": model, "prompt": prompts[i], "max_tokens": max_tokens,
                        "knnlm": {"speculate": mode != "naive"}}
                t = time.perf_counter()
                async with s.post(f"{url}/v1/completions", json=body) as r:
                    out = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"{mode}: HTTP {r.status}: {out}")
                latencies.append(time.perf_counter() - t)
                answers[i] = {"text": out["choices"][0]["text"], "finish": out["choices"][0]["finish_reason"],
                              "usage": out["usage"]}

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
        async with s.get(f"{url}/v1/stats") as r:
            stats = await r.json()
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    spec = stats["speculation"]
    return {"mode": mode, "clients": clients, "requests": len(prompts), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "mean_latency_s": statistics.mean(latencies),
            "p50_latency_s": percentile(latencies, 50), "peak_active": stats["queue"]["peak_active"],
            "speculated": spec["speculated_steps"], "verified": spec["verified_steps"], "accepted": spec["accepted"],
            "rollbacks": spec["rollbacks"],
            "busy_s": stats["queue"]["busy_s"], "lm_runner": stats.get("lm_runner"),
            "lm_batching": stats.get("lm_batching"), "answers": answers}


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_server_args(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datastore", required=True)
    ap.add_argument("--n", type=int, default=20, help="prompts (first sentences of embedded passages)")
    ap.add_argument("--prompts", choices=("passages", "questions"), default="passages")
    ap.add_argument("--max-chars", type=int, default=160, help="prompt length cap in characters")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1],
                    help="clients, and the server's --max-concurrent, per cell (default 1)")
    ap.add_argument("--runners", nargs="+", default=None, metavar="RUNNER",
                    help="LM runners to compare (--lm-runner of each server; default: the flags after --)")
    ap.add_argument("--variants", nargs="+", default=None, metavar="LABEL:FLAGS",
                    help="server variants to compare instead, each a label and its extra server flags, e.g. "
                         "'paused:--lm-runner batched' 'unpaused:--lm-runner batched --speculate-max-active 8'")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.runners and a.variants:
        ap.error("give --runners or --variants, not both")
    if a.variants:
        variants = [(v.split(":", 1)[0], v.split(":", 1)[1].split() if ":" in v else []) for v in a.variants]
    else:
        variants = [(r, ["--lm-runner", r]) for r in a.runners] if a.runners else [(None, [])]
    labels = [label for label, _ in variants]
    prompts = [t[:a.max_chars] for t in bench_texts(a.prompts, a.n)]
    cells, rows, differ = [], [], 0
    for rnd in range(a.rounds):
        for k, (runner, own) in enumerate(variants):
            reference = None  # the round's first naive answers of this variant
            flags = [*extra, *own]
            for j, conc in enumerate(a.concurrency):
                order = MODES if (rnd + j + k) % 2 == 0 else MODES[::-1]
                got: dict[str, dict[str, Any]] = {}
                for mode in order:
                    print(f"round {rnd + 1}/{a.rounds}, {runner or 'default'} runner, {conc} client(s): {mode}",
                          file=sys.stderr, flush=True)
                    srv = Server(["--datastore", a.datastore, "--max-concurrent", str(conc), *flags],
                                 command=("knnlm", "serve"))
                    try:
                        got[mode] = asyncio.run(run_cell(srv.url, prompts, a.max_tokens, mode, conc)) | {
                            "round": rnd, "runner": runner}
                    finally:
                        srv.stop()
                reference = reference or got["naive"]["answers"]
                n_diff = sum(x != y for m in MODES for x, y in zip(got[m]["answers"], reference))
                differ += n_diff
                rows.append({"round": rnd, "runner": runner, "clients": conc,
                             "speedup": got["speculative"]["tok_s"] / got["naive"]["tok_s"],
                             "identical": 2 * len(prompts) - n_diff, "of": 2 * len(prompts)})
                cells += [got[m] for m in MODES]
    print(f"{'round':>5} {'runner':>8} {'clients':>7} {'mode':>11} {'tok/s':>7} {'vs 1st':>6} {'mean s':>7} "
          f"{'p50 s':>6} {'peak':>4} {'rows/fw':>7} {'spec':>5} {'acc':>5} {'rb':>4} {'verif':>5}")
    first = {(c["round"], c["clients"], c["mode"]): c["tok_s"] for c in cells if c["runner"] == labels[0]}
    for c in cells:
        c["vs_first_runner"] = c["tok_s"] / first[(c["round"], c["clients"], c["mode"])]
        per_fw = ((c.get("lm_batching") or {}).get("lm_steps") or {}).get("mean_batch_size")
        print(f"{c['round'] + 1:>5} {(c['runner'] or c['lm_runner'] or '?')[:8]:>8} {c['clients']:>7} {c['mode']:>11} {c['tok_s']:>7.1f} "
              f"{c['vs_first_runner']:>6.2f} {c['mean_latency_s']:>7.3f} {c['p50_latency_s']:>6.3f} "
              f"{c['peak_active']:>4} {'-' if per_fw is None else f'{per_fw:.2f}':>7} {c['speculated']:>5} "
              f"{c['accepted']:>5} {c['rollbacks']:>4} {c['verified']:>5}")
    for r in rows:
        print(f"round {r['round'] + 1}, {r['runner'] or 'default'} runner, {r['clients']} client(s): speculative / "
              f"naive tokens/s = {r['speedup']:.2f}x, {r['identical']}/{r['of']} answers identical to the round's "
              f"first naive answers on that runner")
    if a.json:
        doc = {"args": vars(a), "server_flags": extra, "prompts": prompts, "cells": cells, "ratios": rows,
               "machine": {"platform": platform.platform(), "loadavg": loadavg()}}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
