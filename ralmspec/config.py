"""Dataclass configs that flow down explicitly from the CLI / server to each component."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, replace
from typing import Any

from ralmspec.errors import ConfigError

RETRIEVER_KINDS = ("exact", "hnsw", "ivf", "bm25")
PROMPT_FORMATS = ("auto", "chat", "plain")
GUESSERS = ("exact", "last", "refine", "static", "bm25")  # speculation/guess.py
ENCODER_BATCHINGS = ("single", "pinned")  # retrieval/encoder.py: how queries share forwards
LM_RUNNERS = ("auto", "eager", "static", "batched", "compiled")  # lm/hf.py make_runner, docs/lm-runner.md
LM_BACKENDS = ("hf", "vllm")  # lm/loader.py
LM_DTYPES = ("auto", "float32", "bfloat16", "float16")  # lm/loader.py resolve_lm_dtype
# measurement bounds, ``ralmspec bench --guessers`` only: "oracle" guesses the passage the naive
# run of the same question retrieved (acceptance 1 at no guessing cost: the ceiling of any guesser)
BOUND_GUESSERS = ("oracle",)
MAX_TOP_LOGPROBS = 20  # alternatives per token the engine reports (the HTTP API allows 5, as OpenAI)
MAX_TEMPERATURE = 2.0
# the smallest positive temperature: the draw rule divides float64 logits by it, and below ~1e-306
# that overflows to inf (every positive logit ties, argmax takes the lowest id: a wrong answer);
# at 1e-6 the noise is already ~1e-6 of a logit gap, the draw greedy in all but exact ties
MIN_TEMPERATURE = 1e-6
SEED_LIMIT = 2 ** 63  # seeds are non-negative integers below this (fits an int64)


def is_int(value: Any, lo: int | None = None, hi: int | None = None, *, numpy: bool = False) -> bool:
    """True when ``value`` is an integer, never a bool (``True`` is an int in Python), with
    ``lo <= value <= hi`` where given; ``numpy`` also accepts numpy integers (a ``k`` computed
    from an array). The one check behind every "must be an integer" ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if numpy else int):
        return False
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def int_values(*values: Any) -> list[int]:
    """The integers among ``values`` in order, a list or tuple contributing its own integers
    (a model config's ``eos_token_id`` is an int, a list of them or None); bools and other
    types are skipped (``is_int``)."""
    out: list[int] = []
    for v in values:
        out.extend(x for x in (v if isinstance(v, (list, tuple)) else [v]) if is_int(x))
    return out


def first_int(*values: Any) -> int | None:
    """The first of ``int_values(*values)``, or None: a config field read from whichever of
    several places holds it (``max_position_embeddings``, else ``n_positions``, ...)."""
    return next(iter(int_values(*values)), None)


def lone_surrogate(text: str) -> int | None:
    """The index of the first character of ``text`` that UTF-8 cannot encode (a lone UTF-16
    surrogate, U+D800-U+DFFF: JSON's ``"\\ud800"``, or an undecodable byte that Python carried
    in from argv or a file as ``surrogateescape``), or None when ``text`` is valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_text(text: str, what: str) -> None:
    """``ConfigError`` when ``text`` is not valid Unicode (``lone_surrogate``): tokenizers and
    encoders cannot take it, so it is refused at the door, naming ``what`` and the character."""
    at = lone_surrogate(text)
    if at is not None:
        raise ConfigError(f"{what} is not valid Unicode: a lone surrogate U+{ord(text[at]):04X} at character "
                          f"{at} (UTF-8 text only: an unpaired \\uD800-\\uDFFF escape in JSON, or bytes that are "
                          "not UTF-8, cannot be tokenized)")


def invalid_text_field(value: Any, path: str = "") -> str | None:
    """The field (``"prompt"``, ``"messages[1].content"``, ``"queries[0]"``) of the first string
    in decoded JSON (depth first, an object's keys before its values) that is not valid Unicode
    (``lone_surrogate``: JSON lets ``"\\ud800"`` through), ``""`` for a string at the top, or
    None. Iterative, so any depth the decoder took is walked."""
    todo = [(path, value)]
    while todo:
        at, v = todo.pop()
        if isinstance(v, str):
            if lone_surrogate(v) is not None:
                return at
        elif isinstance(v, dict):
            for k in v:  # an object's keys before any of its values
                if lone_surrogate(k) is not None:  # named with the surrogate escaped
                    k = k.encode("utf-8", "backslashreplace").decode("utf-8")
                    return f"{at}.{k}" if at else k
            todo.extend((f"{at}.{k}" if at else k, item) for k, item in reversed(list(v.items())))
        elif isinstance(v, list):
            todo.extend((f"{at}[{i}]", item) for i, item in reversed(list(enumerate(v))))
    return None


def temperature_ok(temperature: Any) -> bool:
    """0 (greedy) or a number in [MIN_TEMPERATURE, MAX_TEMPERATURE] (not a bool)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        return False
    return temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE


def check_sampling_args(temperature: Any, top_p: Any, seed: Any) -> None:
    """``ConfigError`` naming the first invalid value (temperature 0 or in [1e-6, 2], top_p in (0, 1],
    seed ``None`` or an integer in [0, 2**63))."""
    num = (int, float)
    if not temperature_ok(temperature):
        raise ConfigError(f"temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                          f"got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, num) or not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and not is_int(seed, 0, SEED_LIMIT - 1):
        raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")


@dataclass(frozen=True)
class Sampling:
    """How one prompt's continuation is decoded (the draw rule: ``ralmspec.lm.sampling``): its
    parameters and the absolute position (index in the generated answer) of the first new token; token ``i`` of the
    continuation is drawn at position ``start + i``. ``logprobs`` k (the answer asks for its
    tokens' log-probabilities with k alternatives): a backend may score the continuation from
    the logits it decodes with and answer ``token_logprobs`` of it without a replay (the same
    values: ``ralmspec.lm.base``); never changes a token."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    start: int = 0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_p, self.seed)
        if not is_int(self.start, 0):
            raise ConfigError(f"sampling start position must be an integer >= 0, got {self.start!r}")
        if self.logprobs is not None and not is_int(self.logprobs, 0, MAX_TOP_LOGPROBS):
            raise ConfigError(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def at(self, start: int) -> Sampling:
        return replace(self, start=start)


def check_seconds(seconds: Any, name: str, zero: str | None = None) -> None:
    """A timeout: a finite number of seconds > 0, or >= 0 where ``zero`` is given (what 0 means,
    said in the message, e.g. "no limit"; "" to say nothing); NaN and infinity are refused.
    ``ConfigError`` naming ``name`` and the value (a string or a bool too: not a comparison's TypeError)."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise ConfigError(f"{name} must be a number of seconds, got {seconds!r}")
    if zero is None and not 0 < seconds < math.inf:  # NaN fails every comparison
        raise ConfigError(f"{name} must be a finite number of seconds > 0, got {seconds!r}")
    if zero is not None and not 0 <= seconds < math.inf:
        raise ConfigError(f"{name} must be a finite number of seconds >= 0{f' (0: {zero})' if zero else ''}, "
                          f"got {seconds!r}")


def check_api_key(key: Any, name: str = "api_key") -> None:
    """None (no key), or what an HTTP header carries as a bearer token: printable ASCII, no space
    (a server's ``--api-key``, a client's key for it)."""
    if key is not None and not (isinstance(key, str) and key and key.isascii() and key.isprintable()
                                and " " not in key):
        raise ConfigError(f"{name} must be a non-empty string of printable ASCII characters without spaces")


def check_type(value: Any, kind: type, name: str, *, optional: bool = False, hint: str = "") -> None:
    """``ConfigError`` unless ``value`` is a ``kind`` (or None where ``optional``): a Python
    caller's dict for a config failed later as an ``AttributeError``, far from the call. The
    message: "``name`` must be a ``kind````hint`` [or None], got ``type``"."""
    if (value is None and optional) or isinstance(value, kind):
        return
    article = "an" if kind.__name__[0] in "AEIOU" else "a"
    raise ConfigError(f"{name} must be {article} {kind.__name__}{hint}{' or None' if optional else ''}, "
                      f"got {type(value).__name__}")


def check_bool(value: Any, name: str, *, optional: bool = False) -> None:
    """``ConfigError`` unless ``value`` is a bool (or None where ``optional``): a Python caller's
    ``"false"`` or ``"no"`` is truthy and turned the switch on. The message: "``name`` must be
    True or False, got ``value!r``" ("True, False or None" where ``optional``)."""
    if isinstance(value, bool) or (value is None and optional):
        return
    raise ConfigError(f"{name} must be {'True, False or None' if optional else 'True or False'}, got {value!r}")


def check_flags(config: Any, *names: str) -> None:
    """``check_bool`` on ``config``'s fields ``names``, in order: the error names the first
    that is not a bool."""
    for name in names:
        check_bool(getattr(config, name), name)


def check_hnsw_m(m: int) -> None:
    """An HNSW graph's ``M`` (passages and kNN-LM datastores alike): at least 2."""
    if m < 2:  # FAISS's HNSW crashes the process (SIGSEGV) adding to a graph of M 1
        raise ConfigError(f"hnsw_m must be >= 2, got {m!r}")


@dataclass(frozen=True)
class RetrievalConfig:
    """Which knowledge-base index to use and its search parameters."""

    kind: str = "exact"  # one of RETRIEVER_KINDS
    index_dir: str | None = None  # None: the embedded default under the user cache dir
    device: str = "cpu"  # "cuda" uses faiss-gpu for flat / ivf when available
    # where the dense query encoder runs ("cpu" / "cuda"); None: cuda when `device` is cuda and
    # CUDA is there, else cpu (the CLI passes the LM's device: --encoder-device)
    encoder_device: str | None = None
    # how queries share the encoder's forwards, "single" or "pinned" (retrieval/encoder.py);
    # None: pinned on cuda, single on the CPU. Either keeps a query's vector batch-independent.
    encoder_batching: str | None = None
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    ivf_nlist: int = 64
    ivf_nprobe: int = 8
    rescore_margin: int = 16  # extra candidates re-scored exactly so search == score
    # EMULATED larger exact knowledge base (retrieval/emulated.py, --emulate-pad N): the real
    # index's answers plus the real cost of a flat scan over this many synthetic vectors per
    # search; applied by the opener (retrieval/open.py), split over the shards on Ray
    emulate_pad: int = 0

    def __post_init__(self) -> None:
        if self.kind not in RETRIEVER_KINDS:
            raise ConfigError(f"unknown retriever {self.kind!r}; choose one of {', '.join(RETRIEVER_KINDS)}")
        if not is_int(self.emulate_pad, 0):
            raise ConfigError(f"emulate_pad (--emulate-pad) must be an integer >= 0, got {self.emulate_pad!r}")
        if self.emulate_pad and self.kind != "exact":
            raise ConfigError("emulate_pad (--emulate-pad) emulates an exact flat index: use it with kind='exact' "
                              "(--retriever exact)")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.encoder_device is not None and not is_device_name(self.encoder_device):
            raise ConfigError(f"encoder device must be 'cpu' or 'cuda', got {self.encoder_device!r}")
        if self.encoder_batching is not None and self.encoder_batching not in ENCODER_BATCHINGS:
            raise ConfigError(f"encoder_batching (--encoder-batching) must be one of {', '.join(ENCODER_BATCHINGS)}, "
                              f"got {self.encoder_batching!r}")
        if self.index_dir is not None and not isinstance(self.index_dir, (str, os.PathLike)):
            raise ConfigError(f"index_dir must be a folder's path (str or os.PathLike) or None, got {self.index_dir!r}")
        # a float, a string or None failed later as a TypeError (FAISS's, or a comparison's here)
        for name, lo in (("hnsw_m", 1), ("hnsw_ef_construction", 1), ("hnsw_ef_search", 1), ("ivf_nlist", 1),
                         ("ivf_nprobe", 1), ("rescore_margin", 0)):
            v = getattr(self, name)
            if not is_int(v, lo):
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        check_hnsw_m(self.hnsw_m)


@dataclass(frozen=True)
class GenerationConfig:
    """The reference semantics of one request (docs/design.md §1). Same values => same tokens."""

    stride: int = 4  # tokens generated per retrieval
    query_len: int = 32  # tokens of context used as the retrieval query
    max_new_tokens: int = 128
    passage_tokens: int = 256  # a passage is cut to its first this-many tokens
    # "chat" (passage + question in the model's chat template), "plain" (passage + context,
    # the paper's continuation) or "auto" (chat when the tokenizer has a template); engine/prompt.py
    prompt_format: str = "auto"
    # Sampling (ralmspec/lm/sampling.py): 0 = greedy, exactly the paper's decoding. With
    # temperature > 0 the token at answer position p is drawn from the top_p nucleus with noise
    # keyed by (seed, p), so the same seed gives the same answer, speculative or naive.
    temperature: float = 0.0  # 0 or in [MIN_TEMPERATURE, MAX_TEMPERATURE]
    top_p: float = 1.0  # in (0, 1]
    seed: int | None = None  # needed when temperature > 0 (the server draws one when absent)
    # stop strings (engine/stop.py): the answer ends before the first one its text completes; the
    # loops stop after that chunk, as after an EOS
    stop: tuple[str, ...] = ()
    # report the log-probability of every answer token and of the top `logprobs` alternatives
    # (engine/logprobs.py); None: none. Scored after the answer, so never changes a token
    logprobs: int | None = None

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_p, self.seed)
        if isinstance(self.stop, list):  # a Python caller's list: kept as the tuple a config holds
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be a tuple (or list) of non-empty strings, got {self.stop!r}")
        if self.logprobs is not None and not is_int(self.logprobs, 0, MAX_TOP_LOGPROBS):
            raise ConfigError(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        for name, lo, hi in (("stride", 1, 256), ("query_len", 1, 4096), ("max_new_tokens", 1, 4096),
                             ("passage_tokens", 1, 8192)):
            v = getattr(self, name)
            if not is_int(v, lo, hi):
                raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")

    def sampling_at(self, position: int) -> Sampling | None:
        """How the LM continues from generated-answer ``position``: ``None`` for greedy without
        logprobs, else the draw rule's settings starting there, with ``logprobs`` (``ConfigError``
        if temperature > 0 has no seed)."""
        if self.temperature == 0:
            return None if self.logprobs is None else Sampling(start=position, logprobs=self.logprobs)
        if self.seed is None:
            raise ConfigError("temperature > 0 needs a seed: set GenerationConfig.seed "
                              "(the server and the CLI draw one when it is absent)")
        return Sampling(self.temperature, self.top_p, self.seed, position, self.logprobs)


# OS^3's per-mode defaults, the one place they are stated (``OS3Config`` holds the shared ones).
# - gamma_max, the cap on the estimated acceptance γ: the paper used 0.6. RaLM: measured here the
#   passage cache (prefetch 20) is right 70-90% of the time, and 0.6 made OS^3 fall back to naive
#   steps where speculation pays (search-dominated knowledge bases). kNN-LM: acceptance is
#   ~0.9-1.0 and a verification of s queries costs far less than s single searches only for large
#   s; a 0.9 cap held the stride near 3-4 and made the naive fallback fire at acceptance 1.0.
# - async_verify: RaLM verifies beside decoding by default (OS^3 still picks, per round, whether
#   overlapping pays); kNN-LM's CLI asks for it with --async.
OS3_MODE_DEFAULTS: dict[str, dict[str, object]] = {
    "ralm": {"async_verify": True, "gamma_max": 0.9},
    "knnlm": {"async_verify": False, "gamma_max": 0.98},
}


@dataclass(frozen=True)
class OS3Config:
    """The OS^3 stride scheduler's knobs (speculation/stride.py), shared by both speculative
    modes: ``SpeculationConfig`` (RaLM) and ``SpeculativeKNNConfig`` (kNN-LM) extend it, each
    with its defaults from ``OS3_MODE_DEFAULTS``. None of them can change the output tokens."""

    os3: bool = True  # OS^3 stride scheduler; off = fixed_stride
    fixed_stride: int = 3
    s_max: int = 16  # OS^3's largest stride
    window: int = 5  # OS^3 acceptance window (rounds)
    # OS^3 may stop speculating (verified naive steps, cache still probed) while it predicts
    # speculation to be slower than the naive loop (docs/design.md §4); off = always in rounds (for
    # RaLM OS^3 may still pick synchronous one-step rounds, the naive loop; a fixed stride forces)
    naive_fallback: bool = True
    async_verify: bool = bool(OS3_MODE_DEFAULTS["ralm"]["async_verify"])
    gamma_max: float = float(OS3_MODE_DEFAULTS["ralm"]["gamma_max"])  # cap on the estimated γ

    def __post_init__(self) -> None:
        # a string for a switch ("false", "no") is truthy: it switched the technique on
        check_flags(self, "os3", "naive_fallback", "async_verify")
        if not is_int(self.fixed_stride, 1, 64):  # a float stride was accepted (strides [2.5, ...])
            raise ConfigError(f"fixed_stride must be an integer in [1, 64], got {self.fixed_stride!r}")
        if not is_int(self.s_max, 1, 64):
            raise ConfigError(f"s_max must be an integer in [1, 64], got {self.s_max!r}")
        if not is_int(self.window, 1):
            raise ConfigError(f"window must be an integer >= 1, got {self.window!r}")
        if (isinstance(self.gamma_max, bool) or not isinstance(self.gamma_max, (int, float))
                or not 0.0 < self.gamma_max < 1.0):  # NaN too
            raise ConfigError(f"gamma_max must be in (0, 1), got {self.gamma_max!r}")


@dataclass(frozen=True)
class SpeculationConfig(OS3Config):
    """Switches for each RaLMSpec technique, so every ablation is one flag (OS^3's in
    ``OS3Config``, RaLM's defaults)."""

    enabled: bool = True
    prefetch: int = 20  # top-k of every verification goes into the cache; 1 = no prefetch
    max_inflight: int = 2  # verification rounds in flight at once (async only)
    # async only: a round leaves as soon as no verification is running (speculation/rounds.py
    # next_action), instead of waiting for `stride` pending steps; the stride still caps how far
    # the LM runs ahead. Off by default: more, smaller rounds lost on the 2-core machine
    # (experiments/results/2026-11-28-decoupled)
    eager_verify: bool = False
    cache_capacity: int = 1024  # passages per request cache; LRU eviction
    # how a speculative step guesses its passage (speculation/guess.py): "exact" (rank the
    # cache with the retriever's metric), "last" (the previous chunk's passage), "refine"
    # (start with "last", rank exactly beside the LM, regenerate the chunk if they differ),
    # "static" (static token embeddings of the encoder) or "bm25" (BM25 over the cached passages)
    guesser: str = "exact"

    def __post_init__(self) -> None:
        if self.guesser not in GUESSERS + BOUND_GUESSERS:
            raise ConfigError(f"guesser must be one of {', '.join(GUESSERS)}, got {self.guesser!r}")
        if not is_int(self.prefetch, 1, 4096):  # 2.5 failed every search: a RetrievalError after the retries
            raise ConfigError(f"prefetch must be an integer in [1, 4096], got {self.prefetch!r}")
        check_flags(self, "enabled", "eager_verify")  # enabled="no" speculated
        super().__post_init__()
        if not is_int(self.max_inflight, 1, 16):
            raise ConfigError(f"max_inflight must be an integer in [1, 16], got {self.max_inflight!r}")
        if not is_int(self.cache_capacity, 1):
            raise ConfigError(f"cache_capacity must be an integer >= 1, got {self.cache_capacity!r}")


def is_device_name(device: object) -> bool:
    """``device`` reads as 'cpu', 'cuda' or 'cuda:N': the device names the LM and the query encoder
    take (whether CUDA is there is checked where the model or the encoder is loaded)."""
    return device in ("cpu", "cuda") or str(device).startswith("cuda:")


def check_lm_device(device: object) -> None:
    """ConfigError unless ``device`` is a string naming a device the LM can be put on (``is_device_name``)."""
    if not isinstance(device, str) or not is_device_name(device):
        raise ConfigError(f"lm_device (--lm-device) must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine instance needs; built once by the CLI or the server."""

    model: str = "smollm2"  # "smollm2" (real, pretrained), "tiny" / "random-*" (random weights), or a folder
    lm_backend: str = "hf"  # "hf" or "vllm"
    lm_device: str = "cpu"
    # how the hf backend runs the model (ralmspec/lm/runner.py): "eager" (DynamicCache, one
    # forward per token), "static" (KV slots, on-device decode, CUDA graphs on a GPU), "batched"
    # (static, every decode step one fixed-shape forward shared by concurrent requests),
    # "compiled" (static, its decode step torch.compile'd) or "auto" (static on CUDA, eager on the CPU)
    lm_runner: str = "auto"
    # "auto": bfloat16 on CUDA and on a CPU with bfloat16 instructions (hf), else float32 (lm/loader.py)
    lm_dtype: str = "auto"
    # hf backend: MiB of prompt KV blocks shared across requests (ralmspec/lm/prefix_cache.py); 0: off
    lm_prefix_cache_mib: int = 512
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)

    def __post_init__(self) -> None:
        # a dict (or None) for a part failed later as an AttributeError, in build_engine or a request
        for name, kind in (("retrieval", RetrievalConfig), ("generation", GenerationConfig),
                           ("speculation", SpeculationConfig)):
            check_type(getattr(self, name), kind, name, hint=f" (e.g. {kind.__name__}(...))")
        check_lm_device(self.lm_device)
        # checked here as well as where the LM loads, so a bad name fails before the knowledge base opens
        for name, choices in (("lm_backend", LM_BACKENDS), ("lm_runner", LM_RUNNERS), ("lm_dtype", LM_DTYPES)):
            v = getattr(self, name)
            if v not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {v!r}")
        n = self.lm_prefix_cache_mib
        if not is_int(n, 0):
            raise ConfigError(f"lm_prefix_cache_mib (--lm-prefix-cache-mib) must be an integer >= 0, got {n!r}")
