"""Prometheus metrics, written by hand in the text exposition format (version 0.0.4).

``ServerMetrics`` records what the HTTP layer sees (requests by endpoint and status, latency,
tokens, speculation statistics of finished requests) and renders it together with the
scheduler's live state (queue depth, active requests, cross-request batch sizes).
No global registry: one ``ServerMetrics`` per application.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from ralmspec import __version__
from ralmspec.memory import process_heap, process_rss_bytes

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

LabelKey = tuple[tuple[str, str], ...]


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(key: LabelKey, extra: Iterable[tuple[str, str]] = ()) -> str:
    items = list(key) + list(extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        if math.isnan(v):
            return "NaN"
        return repr(v)
    return str(v)


class Counter:
    def __init__(self, name: str, help_: str):
        self.name, self.help = name, help_
        self._v: dict[LabelKey, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._v[tuple(sorted(labels.items()))] += amount

    def value(self, **labels: str) -> float:
        return self._v.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self._v.items())]
        return out


class Histogram:
    def __init__(self, name: str, help_: str, buckets: Sequence[float]):
        self.name, self.help, self.buckets = name, help_, tuple(buckets)
        self._counts: dict[LabelKey, list[int]] = {}
        self._sum: dict[LabelKey, float] = defaultdict(float)

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
        for i, b in enumerate(self.buckets):
            if value <= b:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self._sum[key] += value

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key in sorted(self._counts):
            out += render_histogram_lines(self.name, key, self.buckets, self._counts[key], self._sum[key])
        return out


def render_histogram_lines(name: str, key: LabelKey, buckets: Sequence[float], counts: Sequence[int],
                           total: float) -> list[str]:
    """Cumulative ``_bucket`` lines plus ``_sum`` and ``_count`` (``counts`` per bucket, +Inf last)."""
    out, acc = [], 0
    for b, c in zip(buckets, counts):
        acc += c
        out.append(f"{name}_bucket{_labels(key, [('le', _num(float(b)))])} {acc}")
    acc += counts[-1]
    out.append(f"{name}_bucket{_labels(key, [('le', '+Inf')])} {acc}")
    out.append(f"{name}_sum{_labels(key)} {_num(float(total))}")
    out.append(f"{name}_count{_labels(key)} {acc}")
    return out


def size_histogram(name: str, help_: str, exact: Mapping[int, int]) -> list[str]:
    """A Prometheus histogram from an exact ``size -> count`` distribution."""
    counts = [0] * (len(SIZE_BUCKETS) + 1)
    for size, n in exact.items():
        for i, b in enumerate(SIZE_BUCKETS):
            if size <= b:
                counts[i] += n
                break
        else:
            counts[-1] += n
    total = sum(s * n for s, n in exact.items())
    return [f"# HELP {name} {help_}", f"# TYPE {name} histogram",
            *render_histogram_lines(name, (), SIZE_BUCKETS, counts, float(total))]


def counter_total(name: str, help_: str, value: float) -> list[str]:
    """One counter without labels, its value as given (a count kept elsewhere)."""
    return [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value}"]


def admission_lines(prefix: str, st: Mapping[str, Any], queued_help: str, active_help: str,
                    limit_help: str) -> list[str]:
    """A server's admission figures (``st``: ``queued``, ``active``, ``max_concurrent`` and the
    counts of ``rejected``, ``cancelled``, ``timed_out``, ``failed`` requests): three gauges and
    the four ``{prefix}_{outcome}_total`` counters."""
    lines = gauge("ralmspec_queue_depth", queued_help, st["queued"])
    lines += gauge("ralmspec_active_requests", active_help, st["active"])
    lines += gauge("ralmspec_max_concurrent", limit_help, st["max_concurrent"])
    for key, help_ in (("rejected", "Requests refused because the queue was full (429)."),
                       ("cancelled", "Requests cancelled (client went away)."),
                       ("timed_out", "Requests past their deadline."),
                       ("failed", "Requests that ended in an error.")):
        lines += counter_total(f"{prefix}_{key}_total", help_, st[key])
    return lines


def gauge(name: str, help_: str, value: float | None) -> list[str]:
    """One gauge without labels (None is NaN)."""
    return labelled_gauge(name, help_, [({}, value)])


def labelled_gauge(name: str, help_: str, rows: Iterable[tuple[Mapping[str, Any], float | None]]) -> list[str]:
    """One gauge with a sample per label set (``rows``: ``(labels, value)``; None is NaN)."""
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
    for labels, value in rows:
        key = tuple((k, str(v)) for k, v in labels.items())
        lines.append(f"{name}{_labels(key)} {_num(float('nan') if value is None else value)}")
    return lines


def info(name: str, help_: str, labels: Mapping[str, Any]) -> list[str]:
    """An info metric: constant 1, the facts in its labels (Prometheus convention ``*_info``)."""
    key = tuple(sorted((k, str(v)) for k, v in labels.items()))
    return [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name}{_labels(key)} 1"]


class ServerMetrics:
    """All metrics of one server application (thread-safe updates, rendered on /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = Counter("ralmspec_http_requests_total", "HTTP requests by endpoint and status code.")
        self.latency = Histogram("ralmspec_request_latency_seconds",
                                 "Latency of successful completions at the server, queueing included, by mode "
                                 "(naive / speculative).", LATENCY_BUCKETS)
        self.ttft = Histogram("ralmspec_time_to_first_token_seconds",
                              "Time to the first verified token of streamed completions, queueing included.",
                              LATENCY_BUCKETS)
        self.prompt_tokens = Counter("ralmspec_prompt_tokens_total", "Prompt tokens of finished completions.")
        self.completion_tokens = Counter(
            "ralmspec_completion_tokens_total",
            "Generated (verified) tokens sent to clients, by mode: those of finished completions, and those a "
            "stream had sent before its client left or an error ended it.")
        self.speculative_requests = Counter("ralmspec_speculative_requests_total",
                                            "Finished completions that ran in speculative mode.")
        self.speculated = Counter("ralmspec_speculated_steps_total", "Speculated retrieval steps verified.")
        self.verified = Counter("ralmspec_verified_steps_total",
                                "Steps of speculative requests whose passage was retrieved for real before "
                                "generating (first step, OS^3 fallback, governor pause, a synchronous round's "
                                "last step).")
        self.accepted = Counter("ralmspec_accepted_steps_total", "Speculated steps the knowledge base confirmed.")
        self.rollbacks = Counter("ralmspec_rollbacks_total", "Rollbacks at a mis-speculated step.")
        self.rounds = Counter("ralmspec_verification_rounds_total", "Verification rounds (batched searches).")
        self.request_verify_batch = Histogram(
            "ralmspec_request_verify_batch_size",
            "Queries per applied verification round of ONE request (before cross-request batching; a round "
            "cancelled by a rollback is not counted).", SIZE_BUCKETS)
        self.retrieve_queries = Counter("ralmspec_retrieve_queries_total", "Queries served by /v1/retrieve.")

    def record_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests.inc(endpoint=endpoint, status=str(status))

    def record_sent_tokens(self, mode: str, tokens: int) -> None:
        """Count the tokens a stream that did not finish (its client left, an error event ended
        it) had sent: generated and delivered, so in ``completion_tokens`` like a finished
        completion's. Tokens generated but never written (still queued when the client left, a
        non-streamed request cancelled) are not counted: no client received them."""
        with self._lock:
            self.completion_tokens.inc(tokens, mode=mode)

    def record_completion(self, result: Any, latency_s: float, ttft_s: float | None = None) -> None:
        """Count one successful completion: ``latency_s`` its latency at the server, from the
        moment its generation was asked for (waiting for a slot included) to its end, measured
        from the same moment as ``ttft_s`` (a stream's first verified chunk), so ``ttft_s <=
        latency_s``; not ``result.latency_s``, the engine's own time, which starts once a slot is
        free and leaves out the wait in the queue."""
        mode = result.mode
        s = result.stats
        with self._lock:
            self.latency.observe(latency_s, mode=mode)
            if ttft_s is not None:
                self.ttft.observe(ttft_s, mode=mode)
            self.prompt_tokens.inc(result.prompt_tokens, mode=mode)
            self.completion_tokens.inc(len(result.token_ids), mode=mode)
            if mode == "speculative":
                self.speculative_requests.inc()
                self.speculated.inc(s.get("speculated", 0))
                # a synchronous round's last step was judged before producing anything: verified too
                self.verified.inc(s.get("verified_steps", 0) + s.get("verified_ahead", 0))
                self.accepted.inc(s.get("accepted", 0))
                self.rollbacks.inc(s.get("rollbacks", 0))
                self.rounds.inc(s.get("rounds", 0))
                for b in s.get("verify_batch_sizes", []):
                    self.request_verify_batch.observe(b)

    def speculation(self) -> dict[str, int]:
        """Totals over the speculative requests finished since start (``/v1/stats``): what the
        server's token identity covered; ``speculated_steps`` 0 means speculation never ran."""
        with self._lock:
            return {"requests": int(self.speculative_requests.value()),
                    "speculated_steps": int(self.speculated.value()),
                    "verified_steps": int(self.verified.value()),
                    "accepted": int(self.accepted.value()), "rollbacks": int(self.rollbacks.value())}

    def render(self, scheduler_stats: Mapping[str, Any] | None = None,
               search_stats: Mapping[str, Any] | None = None,
               knowledge_base: Mapping[str, Any] | None = None, memory: Mapping[str, Any] | None = None) -> str:
        """The exposition text; ``memory`` is the ``/v1/stats`` memory the caller already read
        (its RSS and heap are shown, not read again), else the gauges read their own."""
        with self._lock:
            lines = info("ralmspec_build_info", "The ralmspec version serving.", {"version": __version__})
            if knowledge_base:
                lines += info("ralmspec_knowledge_base_info",
                              "The knowledge base served: label (EMULATED for --emulate-pad), kind, real passages, "
                              "synthetic pad vectors.", knowledge_base)
            for m in (self.requests, self.latency, self.ttft, self.prompt_tokens, self.completion_tokens,
                      self.speculative_requests, self.speculated, self.verified, self.accepted, self.rollbacks,
                      self.rounds, self.request_verify_batch, self.retrieve_queries):
                lines += m.render()
            spec, acc = self.speculated.value(), self.accepted.value()
            lines += gauge("ralmspec_acceptance_rate", "Accepted / speculated steps since start (NaN before any).",
                           acc / spec if spec else None)
        st = scheduler_stats or {}
        if st:
            lines += admission_lines("ralmspec_scheduler", st, "Requests waiting for a slot.",
                                     "Requests generating now.", "Admission limit of running requests.")
            lines += size_histogram("ralmspec_lm_batch_size", "Prompts per LM backend call (across requests).",
                                    st["lm_batch_sizes"]["counts"])
            gov = st.get("governor")
            if gov:
                lines += gauge("ralmspec_governor_paused", "1 while the load governor pauses speculation "
                               "(LM saturated by several requests), else 0.", int(gov["paused"]))
                lines += gauge("ralmspec_governor_lm_busy_fraction",
                               "LM worker busy fraction over the governor's window, as last evaluated.",
                               gov["lm_busy_fraction"])
                lines += counter_total("ralmspec_governor_paused_seconds_total",
                                       "Seconds speculation was paused by load.", gov["paused_s"])
        kb = search_stats or (st and {"kb_batch_queries": st["kb_batch_queries"],
                                      "kb_batch_callers": st["kb_batch_callers"]}) or {}
        if kb:
            lines += size_histogram("ralmspec_kb_batch_queries",
                                    "Distinct queries per knowledge-base call (across requests).",
                                    kb["kb_batch_queries"]["counts"])
            lines += size_histogram("ralmspec_kb_batch_callers",
                                    "Verification rounds / retrievals merged into one knowledge-base call.",
                                    kb["kb_batch_callers"]["counts"])
        memory = memory or {}
        lines += gauge("ralmspec_process_resident_memory_bytes", "Resident memory of the server process.",
                       memory["rss_bytes"] if "rss_bytes" in memory else process_rss_bytes())
        heap = memory["heap"] if "heap" in memory else process_heap()
        if heap:
            lines += gauge("ralmspec_process_heap_in_use_bytes",
                           "C heap allocated and not freed (glibc malloc: Python objects, CPU tensors).",
                           heap["in_use_bytes"])
            lines += gauge("ralmspec_process_heap_free_bytes",
                           "C heap freed but kept by glibc malloc, not returned to the OS (fragmentation).",
                           heap["free_bytes"])
        lines += _worker_gauges(memory.get("workers") or [])
        return "\n".join(lines) + "\n"


def _worker_gauges(workers: Sequence[Mapping[str, Any]]) -> list[str]:
    """The Ray workers' memory (``/v1/stats`` ``memory.workers``), labelled by role and index;
    ``ralmspec_worker_up`` 0 for a worker that did not answer (its other gauges are left out)."""
    if not workers:
        return []
    key = [({"role": w["role"], "index": w["index"]}, w) for w in workers]
    up = [(k, w) for k, w in key if "error" not in w]
    lines = labelled_gauge("ralmspec_worker_up", "1 if the Ray worker (LM replica, shard actor) answered "
                           "the memory read of this scrape, else 0.", [(k, int("error" not in w)) for k, w in key])
    lines += labelled_gauge("ralmspec_worker_resident_memory_bytes", "Resident memory of each Ray worker process.",
                            [(k, w["rss_bytes"]) for k, w in up])
    heaps = [(k, w["heap"]) for k, w in up if w.get("heap")]
    if heaps:
        lines += labelled_gauge("ralmspec_worker_heap_in_use_bytes", "C heap allocated and not freed, per Ray worker.",
                                [(k, h["in_use_bytes"]) for k, h in heaps])
        lines += labelled_gauge("ralmspec_worker_heap_free_bytes",
                                "C heap freed but kept by glibc malloc, per Ray worker (fragmentation).",
                                [(k, h["free_bytes"]) for k, h in heaps])
    return lines
