"""RalmEngine: one LM + one knowledge base, serving naive or speculative requests.

The engine is a thin shell: it builds a ``RalmContext`` per request and calls the oracle loop
(``naive.py``) or RaLMSpec (``speculative.py``). A scheduler can pass its own batching
``lm_client`` / ``search_client`` so many requests share LM steps and verification searches.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Hashable

from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
from ralmspec.engine.context import DirectLM, LMClient, PassageTokens, RalmContext, SearchClient
from ralmspec.engine.naive import TokenCallback, generate_closed_book, generate_naive
from ralmspec.engine.prompt import PromptFormat
from ralmspec.engine.result import GenerationResult
from ralmspec.engine.speculative import generate_speculative
from ralmspec.lm.base import LanguageModel
from ralmspec.retrieval.base import Retriever
from ralmspec.speculation.guess import CheapRankers


class RalmEngine:
    def __init__(self, lm: LanguageModel, retriever: Retriever, config: EngineConfig | None = None):
        self.lm = lm
        self.retriever = retriever
        self.config = config or EngineConfig()
        self.passages = PassageTokens(lm, retriever)
        self.direct_lm = DirectLM(lm)
        self._formats: dict[str, PromptFormat] = {}
        # one thread beside the LM's: query encodings and cache ranking of the guessers
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ralmspec-verify")
        self.rankers = CheapRankers(retriever)  # cheap guessers' passage memo, shared by requests
        # OS^3's latest measured costs, seeding the next request (machine calibration, not a cache
        # of answers: kept by reset_caches)
        self.costs: dict = {}
        self.prompt_format(self.config.generation.prompt_format)  # a bad format fails at start-up

    def prompt_format(self, name: str) -> PromptFormat:
        """The resolved prompt format ``name`` ("auto", "chat", "plain") for this engine's LM."""
        if name not in self._formats:
            self._formats[name] = PromptFormat.for_tokenizer(name, self.lm.tokenizer)
        return self._formats[name]

    def context(self, gen: GenerationConfig | None = None, lm_client: LMClient | None = None,
                search_client: SearchClient | None = None,
                may_speculate: Callable[[], bool] | None = None) -> RalmContext:
        gen = gen or self.config.generation
        return RalmContext(self.lm, self.retriever, self.passages, lm_client or self.direct_lm,
                           search_client or self.retriever, gen, self.prompt_format(gen.prompt_format),
                           self.worker, self.rankers, self.costs, may_speculate)

    async def generate(self, prompt: str, gen: GenerationConfig | None = None,
                       spec: SpeculationConfig | None = None, speculate: bool | None = None,
                       on_tokens: TokenCallback | None = None, session: Hashable | None = None,
                       lm_client: LMClient | None = None, search_client: SearchClient | None = None,
                       retries: int = 2, timeout_s: float | None = 30.0,
                       retrieval: bool = True,
                       may_speculate: Callable[[], bool] | None = None) -> GenerationResult:
        """Generate for one prompt. ``speculate=None`` follows ``spec.enabled``;
        ``retrieval=False`` answers closed-book (no passage, no knowledge-base search);
        ``may_speculate``: a server's load governor, asked before every round (engine/governor.py)."""
        spec = spec or self.config.speculation
        ctx = self.context(gen, lm_client, search_client, may_speculate)
        if not retrieval:
            return await generate_closed_book(ctx, prompt, session, on_tokens)
        if speculate is None:
            speculate = spec.enabled
        if speculate:
            return await generate_speculative(ctx, prompt, spec, session, on_tokens, retries, timeout_s)
        return await generate_naive(ctx, prompt, session, on_tokens, retries, timeout_s)

    def reset_caches(self) -> None:
        """Empty the caches shared across requests (query encodings, tokenized passages), so the
        next request is measured as a new question would be. Never changes any output."""
        encoder = getattr(self.retriever, "encoder", None)
        if encoder is not None and hasattr(encoder, "clear_cache"):
            encoder.clear_cache()
        self.passages = PassageTokens(self.lm, self.retriever)

    def generate_sync(self, prompt: str, **kwargs) -> GenerationResult:
        return asyncio.run(self.generate(prompt, **kwargs))

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
        self.lm.close()
        self.retriever.close()


def build_engine(config: EngineConfig, corpus_path: str | None = None, show_progress: bool = True) -> RalmEngine:
    """Load the LM and the knowledge base named by ``config`` (builds the default index if missing)."""
    from ralmspec.lm.loader import load_language_model
    from ralmspec.retrieval.index import open_retriever

    retriever = open_retriever(config.retrieval, corpus_path=corpus_path, show_progress=show_progress)
    lm = load_language_model(config.model, backend=config.lm_backend, device=config.lm_device,
                             dtype=config.lm_dtype, runner=config.lm_runner)
    return RalmEngine(lm, retriever, config)
