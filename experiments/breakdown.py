"""Where one request's time went, reconstructed from its trace (pure functions, no I/O).

Categories (seconds on the request's critical path, summing to its latency):

naive: ``lm`` (LM chunks), ``retrieval`` (one search per step), ``other`` (tokenising,
building prompts, event-loop overhead: latency minus the rest).

speculative: ``lm`` (LM chunks that were kept), ``rollback waste`` (LM chunks thrown away by a
rollback), ``retrieval`` (the first, real retrieval for the prompt), ``cache`` (speculative
lookups: query encoding + scoring the cached passages), ``verify wait`` (time spent blocked on a
verification; with asynchronous verification the rest of the verification overlaps other
work and is not on the critical path), ``other``.

Which chunks were wasted is replayed from the trace: ``lm`` events append ``n`` tokens at the
current position; a ``rollback`` event at generated position ``at`` discards every chunk that
starts at or after ``at`` and moves the position back there.
"""

from __future__ import annotations

from typing import Any, Iterable

NAIVE_PARTS = ("lm", "retrieval", "other")
SPEC_PARTS = ("lm", "rollback waste", "retrieval", "cache", "verify wait", "other")
ALL_PARTS = ("lm", "rollback waste", "retrieval", "cache", "verify wait", "other")


def wasted_lm(trace: Iterable[dict[str, Any]]) -> tuple[float, int]:
    """(seconds, tokens) of LM chunks later discarded by rollbacks."""
    pos = 0
    live: list[tuple[int, float, int]] = []  # (start, dur, n) of chunks not yet discarded
    wasted_s, wasted_tok = 0.0, 0
    for ev in trace:
        kind = ev.get("kind")
        if kind == "lm":
            n = int(ev.get("n", 0))
            live.append((pos, float(ev.get("dur", 0.0)), n))
            pos += n
        elif kind == "rollback":
            at = int(ev["at"])
            keep = []
            for start, dur, n in live:
                if start >= at:
                    wasted_s += dur
                    wasted_tok += n
                else:
                    keep.append((start, dur, n))
            live = keep
            pos = at
    return wasted_s, wasted_tok


def breakdown(result: dict[str, Any]) -> dict[str, float]:
    """Seconds per category for one request (a ``GenerationResult.to_dict()`` or the object's fields)."""
    mode = result["mode"]
    stats = result["stats"]
    latency = float(result["latency_s"])
    if mode == "naive":
        parts = {"lm": float(stats["lm_s"]), "retrieval": float(stats["retrieval_s"])}
    else:
        w_s, _ = wasted_lm(result.get("trace") or [])
        parts = {"lm": float(stats["lm_s"]) - w_s, "rollback waste": w_s,
                 "retrieval": float(stats.get("retrieval_s", 0.0)), "cache": float(stats.get("cache_s", 0.0)),
                 "verify wait": float(stats.get("verify_wait_s", 0.0))}
    parts["other"] = max(0.0, latency - sum(parts.values()))
    return parts


def mean_breakdown(results: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per-category mean over requests (categories absent in a mode count as 0)."""
    rows = [breakdown(r) for r in results]
    if not rows:
        return {p: 0.0 for p in ALL_PARTS}
    return {p: sum(r.get(p, 0.0) for r in rows) / len(rows) for p in ALL_PARTS}
