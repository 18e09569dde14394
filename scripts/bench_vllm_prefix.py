"""Prefix-caching evidence for the vLLM backend: a repeated / grown prompt vs a fresh one.

For each of ``--prompts`` RaLM-shaped prompts (an embedded passage cut to ``--passage-tokens``
tokens + an NQ question) it times, interleaved so that machine load hits all variants alike:

  cold      prefix cache reset, then greedy(P, n)          (nothing reused)
  repeat    greedy(P, n) again                               (all full blocks of P reused)
  grown     greedy(P + first `stride` tokens, n), warm       (the next RaLM step)
  grown0    the same after a prefix-cache reset              (its cold baseline)

and reports medians (wall time; with ``--in-process`` also this process' CPU time, which other
jobs on a shared machine do not inflate), vLLM's per-request ``num_cached_tokens`` and (when vLLM exposes them)
its Prometheus prefix-cache counters. Outputs of warm and cold runs are compared too.

    python scripts/bench_vllm_prefix.py --model default --prompts 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--passage-tokens", type=int, default=256)
    ap.add_argument("--n", type=int, default=4, help="tokens generated per call (the RaLM stride)")
    ap.add_argument("--in-process", action="store_true", help="engine in this process (CPU tests)")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ralmspec.data.loaders import default_corpus, default_questions
    from ralmspec.lm.vllm import load_vllm

    t0 = time.perf_counter()
    lm = load_vllm(a.model, device=a.device, in_process=a.in_process, disable_log_stats=False)
    start_s = time.perf_counter() - t0
    tok = lm.tokenizer
    passages = list(default_corpus())[: a.prompts]
    questions = [q.question for q in default_questions()[: a.prompts]]
    prompts = [tok.encode(f"{p.title}\n{p.text}")[: a.passage_tokens] + tok.encode(q)
               for p, q in zip(passages, questions)]

    cpu_times: dict[str, list[float]] = {"cold": [], "repeat": [], "grown": [], "grown_cold": []}

    def timed(ids: list[int], label: str | None = None) -> tuple[float, list[int], int]:
        t, c = time.perf_counter(), time.process_time()
        out = lm.greedy([ids], a.n)[0]
        if label:  # CPU seconds of THIS process: the model's work when the engine is in-process
            cpu_times[label].append(time.process_time() - c)
        return time.perf_counter() - t, out, lm.last_call_stats.cached_tokens

    lm.reset_prefix_cache()
    timed(prompts[0])  # warm-up (first forward pays allocation / kernel selection)
    rows = []
    for p in prompts:
        lm.reset_prefix_cache()
        cold_s, out, cold_c = timed(p, "cold")
        rep_s, rep_out, rep_c = timed(p, "repeat")
        grown = p + out
        gr_s, gr_out, gr_c = timed(grown, "grown")
        lm.reset_prefix_cache()
        gr0_s, gr0_out, gr0_c = timed(grown, "grown_cold")
        rows.append(dict(prompt_len=len(p), cold_s=cold_s, cold_cached=cold_c, repeat_s=rep_s,
                         repeat_cached=rep_c, grown_s=gr_s, grown_cached=gr_c, grown_cold_s=gr0_s,
                         grown_cold_cached=gr0_c, same_repeat=rep_out == out, same_grown=gr_out == gr0_out))

    def med(k: str) -> float:
        return statistics.median(r[k] for r in rows)

    summary = dict(model=a.model, device=a.device, engine_start_s=round(start_s, 1), prompts=len(rows),
                   prompt_len_median=med("prompt_len"), n=a.n,
                   cold_ms=round(1e3 * med("cold_s"), 1), repeat_ms=round(1e3 * med("repeat_s"), 1),
                   grown_warm_ms=round(1e3 * med("grown_s"), 1), grown_cold_ms=round(1e3 * med("grown_cold_s"), 1),
                   cached_tokens_repeat_median=med("repeat_cached"), cached_tokens_grown_median=med("grown_cached"),
                   cached_tokens_cold_max=max(max(r["cold_cached"], r["grown_cold_cached"]) for r in rows),
                   outputs_identical=all(r["same_repeat"] and r["same_grown"] for r in rows))
    if a.in_process:  # process CPU time is robust to other jobs on the machine; spawned: not measured
        summary["cpu_ms_median"] = {k: round(1e3 * statistics.median(v), 1) for k, v in cpu_times.items()}
    try:
        metrics = {m.name: getattr(m, "value", None) for m in lm.llm.get_metrics()
                   if "prefix_cache" in m.name}
        summary["vllm_metrics"] = metrics
    except Exception as exc:  # noqa: BLE001 - metrics are optional evidence
        summary["vllm_metrics"] = f"unavailable: {exc}"
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(summary=summary, rows=rows), f, indent=1)
    lm.close()


if __name__ == "__main__":
    main()
