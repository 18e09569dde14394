"""RalmEngine: one LM + one knowledge base, serving naive or speculative requests.

The engine is a thin shell: it builds a ``RalmContext`` per request and calls the oracle loop
(``naive.py``) or RaLMSpec (``speculative.py``). A scheduler can pass its own batching
``lm_client`` / ``search_client`` so many requests share LM steps and verification searches.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Awaitable, Callable, Hashable, Iterator, TypeVar

from ralmspec.config import (EngineConfig, GenerationConfig, SpeculationConfig, check_bool, check_seconds, check_type,
                             is_int)
from ralmspec.engine.context import DirectLM, LMClient, PassageTokens, RalmContext, SearchClient, new_session_id
from ralmspec.engine.naive import TokenCallback, generate_closed_book, generate_naive
from ralmspec.engine.logprobs import AnswerScorer
from ralmspec.engine.prompt import Conversation, PromptFormat
from ralmspec.engine.result import GenerationResult, VerifiedChunk
from ralmspec.engine.speculative import generate_speculative
from ralmspec.engine.stop import cut_result
from ralmspec.errors import ClosedError, ConfigError
from ralmspec.lm.base import LanguageModel
from ralmspec.retrieval.base import Retriever
from ralmspec.speculation.guess import CheapRankers
from ralmspec.threads import WorkerPool, run_sync

T = TypeVar("T")

CLOSED_MESSAGE = ("this RalmEngine was closed (close() or the end of its with block); "
                  "build a new engine (build_engine) to run more requests")
CHAT_FORMATS_KEPT = 64  # conversation histories whose rendered template an engine keeps (each up to a context of ids)


class Released:
    """What a closed engine holds in place of each part it released (its LM, knowledge base and
    the caches built on them): any use is a ``ClosedError``, not an ``AttributeError`` on None.
    ``close()`` drops its references, so the weights and the index are freed once nothing else
    holds them, even while the engine object itself is still referenced (a notebook's variable)."""

    __slots__ = ("part",)

    def __init__(self, part: str):
        self.part = part

    def __getattr__(self, name: str):
        raise ClosedError(f"{CLOSED_MESSAGE} (its {self.part} was released)")

    def __repr__(self) -> str:
        return f"<released {self.part} of a closed RalmEngine>"


def check_call(prompt: object, gen: object, spec: object, speculate: object, retries: object, timeout_s: object,
               retrieval: object) -> None:
    """``ConfigError`` for arguments of ``RalmEngine.generate`` of the wrong kind (a Python caller's
    dict for a config, a string for a flag, a negative retry count), which failed later as an
    ``AttributeError`` or, for retries and timeouts, as a ``RetrievalError`` after no search."""
    if not isinstance(prompt, (str, Conversation)):
        raise ConfigError(f"prompt must be a string or a Conversation (chat messages: Conversation(history, "
                          f"question)), got {type(prompt).__name__}")
    check_type(gen, GenerationConfig, "gen", optional=True)
    check_type(spec, SpeculationConfig, "spec", optional=True)
    check_bool(speculate, "speculate", optional=True)
    check_bool(retrieval, "retrieval")
    if not is_int(retries, 0):
        raise ConfigError(f"retries must be an integer >= 0, got {retries!r}")
    if timeout_s is not None:
        check_seconds(timeout_s, "timeout_s", zero="no limit")


class RalmEngine:
    def __init__(self, lm: LanguageModel, retriever: Retriever, config: EngineConfig | None = None):
        check_type(config, EngineConfig, "config", optional=True)
        self.lm = lm
        self.retriever = retriever
        self.config = config or EngineConfig()
        self.passages = PassageTokens(lm, retriever)
        self.direct_lm = DirectLM(lm)
        self._formats: dict[str, PromptFormat] = {}
        # chat formats by conversation history (most chats share a system message): a request's
        # check, its context and the server's own check render the template once between them
        self._chat_formats: OrderedDict[tuple[tuple[str, str], ...], PromptFormat] = OrderedDict()
        self._chat_formats_lock = threading.Lock()
        # one thread beside the LM's: query encodings and cache ranking of the guessers
        self.worker = WorkerPool(max_workers=1, thread_name_prefix="ralmspec-verify")
        self.rankers = CheapRankers(retriever)  # cheap guessers' passage memo, shared by requests
        # OS^3's latest measured costs, seeding the next request (machine calibration, not a cache
        # of answers: kept by reset_caches)
        self.costs: dict = {}
        self.closed = False  # after close(): requests are a ClosedError
        self.prompt_format(self.config.generation.prompt_format)  # a bad format fails at start-up

    def check_open(self) -> None:
        """``ClosedError`` once ``close()`` has run: its model, knowledge base and worker are gone."""
        if self.closed:
            raise ClosedError(CLOSED_MESSAGE)

    def prompt_format(self, name: str) -> PromptFormat:
        """The resolved prompt format ``name`` ("auto", "chat", "plain") for this engine's LM."""
        if name not in self._formats:
            self._formats[name] = PromptFormat.for_tokenizer(name, self.lm.tokenizer)
        return self._formats[name]

    def chat_format(self, history: tuple[tuple[str, str], ...]) -> PromptFormat:
        """The chat format of a ``Conversation`` whose earlier turns are ``history``
        (``ConfigError`` for a model without a chat template, or turns its template rejects);
        the last ``CHAT_FORMATS_KEPT`` histories' formats are kept."""
        if not history:
            return self.prompt_format("chat")
        with self._chat_formats_lock:
            fmt = self._chat_formats.get(history)
            if fmt is not None:
                self._chat_formats.move_to_end(history)
                return fmt
        fmt = PromptFormat.chat(self.lm.tokenizer, history)
        with self._chat_formats_lock:
            self._chat_formats[history] = fmt
            while len(self._chat_formats) > CHAT_FORMATS_KEPT:
                self._chat_formats.popitem(last=False)
        return fmt

    def context(self, gen: GenerationConfig | None = None, lm_client: LMClient | None = None,
                search_client: SearchClient | None = None,
                may_speculate: Callable[[], bool] | None = None,
                conversation: Conversation | None = None, closed_book: bool = False) -> RalmContext:
        """One request's context; a ``conversation`` lays its prompts out in the chat format with
        its earlier turns (any other ``gen.prompt_format`` than "plain" allowed)."""
        gen = gen or self.config.generation
        if conversation is None:
            fmt = self.prompt_format(gen.prompt_format)
        elif gen.prompt_format == "plain":
            raise ConfigError("a conversation needs the chat prompt format, not 'plain'")
        else:
            fmt = self.chat_format(conversation.history)
        return RalmContext(self.lm, self.retriever, self.passages, lm_client or self.direct_lm,
                           search_client or self.retriever, gen, fmt,
                           self.worker, self.rankers, self.costs, may_speculate, closed_book)

    def check_request(self, prompt: str | Conversation, gen: GenerationConfig | None = None) -> None:
        """The input errors ``generate`` would raise for ``prompt`` (``ConfigError``: its prompt
        format, its tokens against the context budget), found without running it: a tokenization.
        A server asks before it queues the request, so a bad prompt is a 400 at once, not a 429
        or a wait for a slot."""
        conversation = prompt if isinstance(prompt, Conversation) else None
        self.check_open()
        ctx = self.context(gen, conversation=conversation)
        ctx.encode_prompt(conversation.question if conversation is not None else prompt)

    @contextlib.contextmanager
    def _closed_if_overtaken(self) -> Iterator[None]:
        """A request's failure once ``close()`` ran (another thread's, during the request) is a
        ``ClosedError``: close() took its parts away (the worker: "cannot schedule new futures";
        an ANN index: gone, retried, then a ``RetrievalError``), and the caller is told so."""
        try:
            yield
        except Exception as exc:
            if self.closed and not isinstance(exc, ClosedError):
                raise ClosedError(CLOSED_MESSAGE) from exc
            raise

    async def generate(self, prompt: str | Conversation, gen: GenerationConfig | None = None,
                       spec: SpeculationConfig | None = None, speculate: bool | None = None,
                       on_tokens: TokenCallback | None = None, session: Hashable | None = None,
                       lm_client: LMClient | None = None, search_client: SearchClient | None = None,
                       retries: int = 2, timeout_s: float | None = 30.0,
                       retrieval: bool = True,
                       may_speculate: Callable[[], bool] | None = None) -> GenerationResult:
        """Generate for one prompt (a question, or a ``Conversation`` whose last user message is
        the question). ``speculate=None`` follows ``spec.enabled``;
        ``retrieval=False`` answers closed-book (no passage, no knowledge-base search);
        ``may_speculate``: a server's load governor, asked before every round (engine/governor.py).
        ``on_tokens`` gets each verified chunk as it is verified (a ``VerifiedChunk``: with its
        logprobs when ``gen.logprobs`` is set). The answer ends at ``gen.stop`` (engine/stop.py;
        ``on_tokens`` still gets the whole chunk that completed it) and carries ``gen.logprobs``
        (engine/logprobs.py). Any failure of a request that ``close()`` (another thread's)
        overtook is a ``ClosedError``."""
        check_call(prompt, gen, spec, speculate, retries, timeout_s, retrieval)
        self.check_open()
        with self._closed_if_overtaken():
            spec = spec or self.config.speculation
            conversation = prompt if isinstance(prompt, Conversation) else None
            question = conversation.question if conversation is not None else prompt
            ctx = self.context(gen, lm_client, search_client, may_speculate, conversation, closed_book=not retrieval)
            if ctx.gen.logprobs is not None and not self.lm.supports_logprobs:  # refused before any work
                raise self.lm.no_logprobs_error()
            if speculate is None:
                speculate = spec.enabled
            scorer = None
            if ctx.gen.logprobs is not None:
                scorer = AnswerScorer(ctx, question, ctx.gen.logprobs, new_session_id("logprobs"), on_tokens,
                                      closed_book=not retrieval)
            on_verified = scorer if scorer is not None else (
                None if on_tokens is None else lambda toks, _steps: on_tokens(VerifiedChunk(toks)))
            try:
                if not retrieval:
                    result = await generate_closed_book(ctx, question, session, on_verified)
                elif speculate:
                    result = await generate_speculative(ctx, question, spec, session, on_verified, retries, timeout_s)
                else:
                    result = await generate_naive(ctx, question, session, on_verified, retries, timeout_s)
                logprobs = await scorer.scores() if scorer is not None else None
            finally:
                if scorer is not None:
                    scorer.close()
            if logprobs is not None and [lp.token for lp in logprobs] != result.token_ids:
                raise AssertionError("the scored tokens are not the answer's")
            result = cut_result(result, ctx.gen.stop, self.lm.tokenizer)
            result.template_tokens = ctx.fmt.template_tokens()
            if logprobs is not None:
                result.logprobs = logprobs[:len(result.token_ids)]
            return result

    def reset_caches(self) -> None:
        """Empty the caches shared across requests (query encodings, tokenized passages and chat
        histories, the LM's shared prefix blocks, the cheap guessers' passage memos), so the next
        request is measured as a new question would be. Never changes any output."""
        encoder = getattr(self.retriever, "encoder", None)
        if encoder is not None and hasattr(encoder, "clear_cache"):
            encoder.clear_cache()
        self.lm.clear_prefix_cache()
        self.rankers.clear_memos()
        self.passages = PassageTokens(self.lm, self.retriever)
        with self._chat_formats_lock:
            self._chat_formats.clear()

    def generate_sync(self, prompt: str | Conversation, **kwargs) -> GenerationResult:
        """``generate`` (same arguments) run to its end, for code without an event loop.

        Where an event loop already runs in this thread (a Jupyter notebook, an async web
        framework), ``asyncio.run`` cannot be called: the request then runs on its own loop in a
        helper thread while this one waits. ``await engine.generate(...)`` is the better call
        there: it does not block the loop."""
        return self.run_sync(lambda: self.generate(prompt, **kwargs))

    def run_sync(self, make: Callable[[], Awaitable[T]]) -> T:
        """``threads.run_sync(make)`` for calls of this engine: they run on an event loop of their
        own, which ends with them, so the knowledge base's connections to that loop (a
        ``RemoteRetriever``'s aiohttp session: its ``aclose``) are closed before it ends, not
        left to the garbage collector with an "Unclosed client session" warning per call."""
        retriever = None if self.closed else self.retriever  # a closed engine's is released

        async def run() -> T:
            try:
                return await make()
            finally:
                aclose = getattr(retriever, "aclose", None)
                if aclose is not None:
                    await aclose()

        return run_sync(run)

    def close(self) -> None:
        """Release the LM, the knowledge base and the worker thread. Idempotent; afterwards
        ``generate``, ``generate_sync`` and ``check_request`` raise ``ClosedError``, and so do
        the requests it overtook (other threads'), at their next LM call, search or worker job.
        Their encodings already queued on the worker still run (milliseconds): a cancelled one
        ended its request with a bare ``CancelledError``.

        The engine then lets go of the LM, the knowledge base and what it built on them (``lm``,
        ``retriever``, ... become ``Released``: any use is a ``ClosedError``), so their memory
        comes back once nothing else refers to them, though the engine object lives on. They
        were kept until the engine itself was freed (a closed engine in a notebook variable held
        its model's weights). Requests it overtook hold their own context until they end."""
        if self.closed:
            return
        self.closed = True
        self.worker.shutdown(wait=False)
        try:
            self.lm.close()
        finally:
            try:
                self.retriever.close()
            finally:
                self.lm, self.direct_lm = Released("language model"), Released("language model")
                self.retriever, self.rankers = Released("knowledge base"), Released("knowledge base")
                self.passages = Released("passage tokens")
                self._formats.clear()
                with self._chat_formats_lock:
                    self._chat_formats.clear()

    def __enter__(self) -> RalmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_engine(config: EngineConfig, corpus_path: str | None = None, show_progress: bool = True) -> RalmEngine:
    """Load the LM and the knowledge base named by ``config`` (``retrieval.open.open_knowledge_base``:
    encoder, folder, shards and EMULATED pad are settled there; builds the default index if missing).
    Where the engine cannot be built, what was opened for it is closed before the error is raised."""
    from ralmspec.lm.loader import load_language_model
    from ralmspec.retrieval.open import open_knowledge_base

    check_type(config, EngineConfig, "config")

    retriever = open_knowledge_base(config.retrieval, corpus_path, show_progress=show_progress)
    lm: LanguageModel | None = None
    try:
        lm = load_language_model(config.model, backend=config.lm_backend, device=config.lm_device,
                                 dtype=config.lm_dtype, runner=config.lm_runner,
                                 prefix_cache_mib=config.lm_prefix_cache_mib)
        return RalmEngine(lm, retriever, config)  # refuses a prompt format the model cannot lay out
    except BaseException:  # no engine to close: its parts are (a vLLM engine's or Ray's processes)
        if lm is not None:
            lm.close()
        retriever.close()
        raise
