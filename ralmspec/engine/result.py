"""Per-request results and traces (docs/design.md §2 invariant 5: everything measured is recorded)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ralmspec.lm.base import TokenLogprob


@dataclass
class StepRecord:
    """One retrieval step of the final (verified) output: generated tokens [start, end) used doc_id."""

    start: int
    end: int
    doc_id: int
    title: str


class VerifiedChunk(list):
    """The tokens an engine's ``on_tokens`` receives: a list of verified token ids (as before),
    and ``logprobs``: one ``TokenLogprob`` per token when the request asks for logprobs
    (``GenerationConfig.logprobs``), else ``None``. The chunks' logprobs, concatenated and cut
    where the answer ends, are the result's ``logprobs`` (engine/logprobs.py)."""

    def __init__(self, tokens: Sequence[int], logprobs: list[TokenLogprob] | None = None):
        super().__init__(tokens)
        self.logprobs = logprobs


@dataclass
class GenerationResult:
    prompt: str
    mode: str  # "naive" or "speculative"
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str
    steps: list[StepRecord]
    finish_reason: str  # "length", "eos" or "stop" (a stop string: engine/stop.py)
    latency_s: float
    stats: dict[str, Any]
    trace: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry when gen.logprobs is set
    # the prompt format's tokens around prompt_ids (chat template, system message, earlier turns;
    # 0 for plain; retrieved passages not counted): a request's prompt is this + len(prompt_ids)
    template_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        """The prompt as the model reads it without a passage: ``usage.prompt_tokens``."""
        return len(self.prompt_ids) + self.template_tokens

    def to_dict(self, with_trace: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["prompt_tokens"] = self.prompt_tokens
        if not with_trace:
            d.pop("trace")
        return d


class Tracer:
    """Collects timestamped events of one request, relative to its start."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.events: list[dict[str, Any]] = []
        self.totals: dict[str, float] = {}

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def record(self, kind: str, start: float, **fields: Any) -> float:
        dur = self.now() - start
        self.events.append({"kind": kind, "t": round(start, 6), "dur": round(dur, 6), **fields})
        self.totals[kind] = self.totals.get(kind, 0.0) + dur
        return dur

    def event(self, kind: str, **fields: Any) -> None:
        self.events.append({"kind": kind, "t": round(self.now(), 6), **fields})
