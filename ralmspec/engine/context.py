"""What the naive and speculative loops share: prompt building, queries, LM/search clients.

Keeping this in one place is what makes the two loops comparable: the same passage cut, the
same query window and the same context truncation, so equal steps mean equal prompts.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Protocol, Sequence

from ralmspec.config import GenerationConfig, check_text
from ralmspec.engine.prompt import PromptFormat
from ralmspec.engine.stop import StopWatch
from ralmspec.errors import ConfigError, LMError
from ralmspec.lm.base import LanguageModel, context_limit
from ralmspec.lm.sampling import Sampling
from ralmspec.retrieval.base import Hit, Retriever
from ralmspec.threads import WorkerPool, to_thread


class LMClient(Protocol):
    """Async access to the LM for one prompt; the scheduler's version batches across requests.
    ``sampling`` (``None``: greedy) is that prompt's draw settings (``LanguageModel.generate``)."""

    async def generate(self, prompt: list[int], n: int, session: Hashable,
                       sampling: Sampling | None = None) -> list[int]: ...

    def release(self, session: Hashable) -> None: ...


class SearchClient(Protocol):
    """Async batched knowledge-base search; the scheduler's version batches across requests."""

    async def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]: ...


class DirectLM:
    """One request's LM calls go straight to the backend in a worker thread.

    A cancelled request (a notebook's interrupt, a web client gone) releases its session while
    its call may still run in the thread, which cannot be stopped: that call would store the
    session's KV after the release, left behind (on a static runner, a KV slot) until evicted.
    Such a session is released again by the call itself, when it ends. And a release while any
    call runs (it holds the LM's lock, which the release takes) is left to the thread of the
    next call to end, so the event loop never waits for another request's LM call."""

    def __init__(self, lm: LanguageModel):
        self.lm = lm
        self._lock = threading.Lock()
        self._running: Counter[Hashable] = Counter()  # session -> its calls started in a thread, not ended
        self._late: set[Hashable] = set()  # sessions released while a call of theirs ran

    async def generate(self, prompt: list[int], n: int, session: Hashable,
                       sampling: Sampling | None = None) -> list[int]:
        started = abandoned = False

        def call() -> list[list[int]]:
            nonlocal started
            with self._lock:
                if abandoned:  # its request was cancelled before it started: nothing to run
                    return []
                started = True
                self._running[session] += 1
            try:
                return self.lm.generate([prompt], n, [session], [sampling])
            finally:
                self._ended(session)

        try:
            out = await to_thread(call)
        except BaseException:
            with self._lock:
                abandoned = not started
            raise
        return out[0]

    async def greedy(self, prompt: list[int], n: int, session: Hashable) -> list[int]:
        return await self.generate(prompt, n, session)

    def release(self, session: Hashable) -> None:
        """Drop ``session``'s KV state: at once when no call runs, else by the thread of the first
        call to end after every call of ``session`` has ended (never waiting here, on the event
        loop, for the LM's lock a running call holds)."""
        with self._lock:
            if self._running:
                self._late.add(session)
                return
        self.lm.release(session)

    def _ended(self, session: Hashable) -> None:
        """A call of ``session`` ended (its thread): release the sessions left to it."""
        with self._lock:
            self._running[session] -= 1
            if self._running[session] <= 0:
                del self._running[session]
            late = {s for s in self._late if not self._running[s]}
            self._late -= late
        for s in late:
            self.lm.release(s)


class PassageTokens:
    """Thread-safe LRU of tokenized passages: ``content`` cut to ``passage_tokens`` tokens."""

    def __init__(self, lm: LanguageModel, retriever: Retriever, capacity: int = 8192):
        self.lm, self.retriever, self.capacity = lm, retriever, capacity
        self._cache: OrderedDict[tuple[int, int, str | None], list[int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, doc_id: int, passage_tokens: int, lead: str | None = None) -> list[int]:
        """``lead``: ``None``, the passage tokenized by ``encode``; else as a continuation after the
        template's text, ``lead`` (its closing spaces) before it (``PromptFormat.passage_lead``)."""
        key = (doc_id, passage_tokens, lead)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        content = self.retriever.corpus[doc_id].content
        ids = (self.lm.tokenizer.encode(content, as_text=True) if lead is None
               else self.lm.tokenizer.encode_after(lead + content, as_text=True))[:passage_tokens]
        with self._lock:
            self._cache[key] = ids
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return ids


_session_ids = itertools.count()


def new_session_id(prefix: str = "req") -> str:
    return f"{prefix}-{next(_session_ids)}"


@dataclass
class RalmContext:
    """Everything one request needs from the engine; both loops use exactly these functions."""

    lm: LanguageModel
    retriever: Retriever
    passages: PassageTokens
    lm_client: LMClient
    search_client: SearchClient
    gen: GenerationConfig
    fmt: PromptFormat  # resolved from gen.prompt_format for this model (engine/prompt.py)
    # the verification worker: one thread beside the LM's for query encodings / cache ranking
    # off the critical path (speculation/guess.py); the engine's WorkerPool runs each call with
    # the caller's FAISS thread count (ralmspec.threads); None = asyncio's default executor,
    # which does not
    worker: WorkerPool | None = None
    # the engine's cheap guess rankers (speculation/guess.py CheapRankers); None: built per request
    rankers: object | None = None
    # the engine's measured speculation costs (LM step, search, encoding, contention), seeding
    # each request's OS^3, with the last request's acceptance as a prior (speculation/stride.py
    # seed_costs); None: every request starts blind
    costs: dict | None = None
    # a shared server's load governor (engine/governor.py): False pauses speculation, and the
    # request takes verified (naive) steps; None: always allowed
    may_speculate: Callable[[], bool] | None = None
    # a closed-book request (no passage): with a SentencePiece tokenizer the question follows the
    # chat template's text, not the passage separator (PromptFormat.encode_question)
    closed_book: bool = False
    _stops: StopWatch | None = field(default=None, repr=False)
    _encoded: tuple[str, tuple[int, ...]] | None = field(default=None, repr=False)

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's token ids, checked against the context budget (a ``ConfigError`` for an
        empty prompt or one that leaves no room); tokenized once per request (the loop and the
        logprob scorer both ask)."""
        if self._encoded is not None and self._encoded[0] == prompt:
            return list(self._encoded[1])
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("prompt must be a non-empty string")
        check_text(prompt, "prompt")
        # a message's text in chat (engine/prompt.py)
        ids = self.fmt.encode_question(self.lm.tokenizer, prompt, after_passage=not self.closed_book)
        if not ids:
            raise ConfigError("prompt has no tokens after tokenization")
        budget = self.lm.max_context - self.gen.max_new_tokens - 1
        limit = context_limit(self.lm)  # the model's context, or the static runner's slot length capping it
        if budget < 1:
            raise ConfigError(f"max_new_tokens={self.gen.max_new_tokens} leaves no room in {limit}")
        # the template around the question: with a passage, its separator too (a closed-book
        # request's input has none: PromptFormat.build)
        overhead = self.fmt.template_tokens() if self.closed_book else self.fmt.overhead()
        if self.fmt.name == "chat" and budget - overhead < 1:  # the conversation around the question
            raise ConfigError(f"the prompt's chat template with its system message and earlier turns takes "
                              f"{overhead} tokens; with max_new_tokens={self.gen.max_new_tokens} at most "
                              f"{budget - 1} of them fit {limit} beside a question: shorten them or lower "
                              f"max_new_tokens")
        if self.fmt.name == "chat" and len(ids) > budget - overhead:
            raise ConfigError(f"the prompt has {len(ids)} tokens; with the chat template and "
                              f"max_new_tokens={self.gen.max_new_tokens} at most {budget - overhead} fit {limit}")
        self._encoded = (prompt, tuple(ids))
        return ids

    def query(self, tokens: Sequence[int]) -> str:
        """Retrieval query: the last ``query_len`` of prompt + generated tokens, detokenized."""
        return self.lm.tokenizer.decode(list(tokens[-self.gen.query_len:]))

    def lm_prompt(self, doc_id: int | None, tokens: Sequence[int], n_prompt: int, n: int) -> list[int]:
        """The LM input for the next ``n`` tokens after ``tokens`` (prompt ids + generated ids,
        the first ``n_prompt`` being the prompt) with passage ``doc_id`` (``None``: closed book),
        laid out by the prompt format, cut to leave room for ``n`` new tokens."""
        doc = None if doc_id is None else self.passages.get(doc_id, self.gen.passage_tokens, self.fmt.passage_lead)
        return self.fmt.build(doc, tokens, n_prompt, self.lm.max_context - n)

    async def chunk(self, doc_id: int | None, tokens: Sequence[int], n_prompt: int, n: int,
                    session: Hashable) -> list[int]:
        """The LM's next (at most) ``n`` tokens after ``tokens`` with passage ``doc_id``: a function
        of (``doc_id``, ``tokens``, ``n``) alone (LM contract), so a chunk regenerated after a
        rollback is the chunk the naive loop generates there. Every loop calls the LM through here.
        Sampled (temperature > 0): token i of the chunk is drawn at answer position
        ``len(tokens) - n_prompt + i`` with noise keyed by (seed, that position), the same draw in
        both loops and on every replay."""
        sampling = self.gen.sampling_at(len(tokens) - n_prompt)
        chunk = await self.lm_client.generate(self.lm_prompt(doc_id, tokens, n_prompt, n), n, session, sampling)
        if n > 0 and not chunk:  # the LM contract: 1..n tokens; a loop would never end on nothing
            raise LMError(f"the LM backend returned no tokens for a chunk of {n}")
        return chunk

    def chunk_size(self, generated: int) -> int:
        return min(self.gen.stride, self.gen.max_new_tokens - generated)

    def finished(self, tokens: Sequence[int], n_prompt: int) -> bool:
        """Done after ``max_new_tokens``, a stop token (``lm.is_stop``: EOS or another of the
        model's), or (``gen.stop``) text completing a stop string
        (engine/stop.py); both loops ask after every chunk, verified or not."""
        generated = len(tokens) - n_prompt
        if generated >= self.gen.max_new_tokens:
            return True
        if generated > 0 and self.lm.is_stop(tokens[-1]):
            return True
        return generated > 0 and bool(self.gen.stop) and self.stop_completed(tokens[n_prompt:])

    def stop_completed(self, generated: Sequence[int]) -> bool:
        if self._stops is None:
            self._stops = StopWatch(self.lm.tokenizer, self.gen.stop)
        return self._stops.completed(generated)
