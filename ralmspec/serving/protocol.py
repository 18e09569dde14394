"""Request parsing and validation of the HTTP API (pure: no I/O, no aiohttp).

Every invalid input raises ``APIError`` with an HTTP status and an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}`` whose ``param`` names the offending field
(``"max_tokens"``, ``"ralm.stride"``, ``"queries[3]"``, ...).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

from ralmspec.config import (
    MAX_TEMPERATURE, MIN_TEMPERATURE, SEED_LIMIT, EngineConfig, GenerationConfig, SpeculationConfig, invalid_text_field,
    temperature_ok,
)
from ralmspec.engine.prompt import Conversation
from ralmspec.errors import ConfigError
from ralmspec.speculation.guess import plan_guess


class APIError(Exception):
    """An error answered to the client: HTTP ``status`` and a JSON body naming ``param``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, status: int = 400, code: str | None = None) -> APIError:
    return APIError(status, message, "invalid_request_error", param, code)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def decode_body(raw: bytes) -> Any:
    """A request body decoded as strict JSON: UTF-8, no ``NaN``/``Infinity``, nested at most as
    deep as the decoder allows, every string valid Unicode; else a 400 ``APIError`` (the field
    named where one is at fault)."""
    if not raw:
        raise bad("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad("the request body is nested too deeply") from None
    param = invalid_text_field(body)
    if param is not None:
        what = f"'{param}'" if param else "the request body"
        raise bad(f"{what} is not valid Unicode: it holds a lone surrogate (an unpaired \\uD800-\\uDFFF escape); "
                  "send UTF-8 text", param or None)
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(body: Mapping[str, Any], key: str, lo: int, hi: int, param: str | None = None) -> int:
    v = body[key]
    p = param or key
    if not _is_int(v):
        raise bad(f"'{p}' must be an integer, got {type(v).__name__}", p)
    if not lo <= v <= hi:
        raise bad(f"'{p}' must be in [{lo}, {hi}], got {v}", p)
    return v


def _bool(body: Mapping[str, Any], key: str, param: str | None = None) -> bool:
    v = body[key]
    p = param or key
    if not isinstance(v, bool):
        raise bad(f"'{p}' must be a boolean (true/false), got {type(v).__name__}", p)
    return v


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


# ------------------------------------------------------------------ /v1/completions, /v1/chat/completions

# OpenAI fields we accept, with the only values that RaLM supports.
_NEUTRAL: dict[str, tuple[str, Any]] = {
    "n": ("only one choice per request is supported: 'n' must be 1 or absent", 1),
    "best_of": ("'best_of' must be 1 or absent", 1),
    "presence_penalty": ("'presence_penalty' must be 0 or absent", 0),
    "frequency_penalty": ("'frequency_penalty' must be 0 or absent", 0),
}
# fields both endpoints share (parse_generation)
_SHARED_FIELDS = {"model", "max_tokens", "stream", "stream_options", "logprobs", "stop", "logit_bias", "temperature",
                  "top_p", "seed", "user", "ralm", "n", "presence_penalty", "frequency_penalty"}
_COMPLETION_FIELDS = _SHARED_FIELDS | {"prompt", "echo", "suffix", "best_of"}
# chat: tools / structured output only in their neutral values (null, [], "none", {"type": "text"})
_CHAT_FIELDS = _SHARED_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                 "parallel_tool_calls", "response_format"}
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_LOGPROBS = 5  # completions `logprobs` / chat `top_logprobs` (OpenAI's completions limit)
# sampling fields (ralmspec/lm/sampling.py): field -> (lo, hi, lo included)
_SAMPLING_FIELDS: dict[str, tuple[float, float, bool]] = {"temperature": (0.0, MAX_TEMPERATURE, True),
                                                          "top_p": (0.0, 1.0, False)}

# ralm extension: field -> (target config, python type, lo, hi)
_RALM_FIELDS: dict[str, tuple[str, type, float, float]] = {
    "stride": ("gen", int, 1, 256),
    "query_len": ("gen", int, 1, 4096),
    "passage_tokens": ("gen", int, 1, 8192),
    "prompt_format": ("gen", str, 0, 0),
    "speculate": ("req", bool, 0, 0),
    "prefetch": ("spec", int, 1, 4096),
    "os3": ("spec", bool, 0, 0),
    "fixed_stride": ("spec", int, 1, 64),
    "async_verify": ("spec", bool, 0, 0),
    "max_inflight": ("spec", int, 1, 16),
    "eager_verify": ("spec", bool, 0, 0),
    "cache_capacity": ("spec", int, 1, 65536),
    "s_max": ("spec", int, 1, 64),
    "window": ("spec", int, 1, 1000),
    "gamma_max": ("spec", float, 0.0, 1.0),
    "guesser": ("spec", str, 0, 0),
    "retriever": ("req", str, 0, 0),
    "return_trace": ("req", bool, 0, 0),
}
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions (chat: the server's --max-new-tokens)
# message roles of /v1/chat/completions -> the chat template's role ("developer" is OpenAI's newer "system")
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# keys a message may carry in their neutral value (the SDK echoes them back with assistant turns)
_NEUTRAL_MESSAGE_KEYS = ("tool_calls", "function_call", "refusal", "audio", "annotations")


@dataclass(frozen=True)
class CompletionRequest:
    """One validated request of either endpoint: ``prompt`` is the question (/v1/completions) or
    the ``Conversation`` (/v1/chat/completions); ``gen`` holds stop strings and logprobs too."""

    model: str
    prompt: str | Conversation
    stream: bool
    include_usage: bool
    gen: GenerationConfig
    spec: SpeculationConfig
    speculate: bool
    return_trace: bool


def parse_completion(body: Any, defaults: EngineConfig, served_model: str, retriever_kind: str,
                     max_tokens_limit: int) -> CompletionRequest:
    """Validate an OpenAI completions body (+ ``ralm`` extension) against what the server supports."""
    body = known_fields(body, _COMPLETION_FIELDS)
    model = parse_model(body, served_model)
    prompt = parse_prompt(body)
    max_tokens = _int(body, "max_tokens", 1, max_tokens_limit) if body.get("max_tokens") is not None \
        else DEFAULT_MAX_TOKENS
    logprobs = None
    if body.get("logprobs") is not None:
        logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    check_no_echo(body)
    return parse_generation(body, defaults, model, prompt, max_tokens, logprobs, retriever_kind)


def parse_chat(body: Any, defaults: EngineConfig, served_model: str, retriever_kind: str,
               max_tokens_limit: int) -> CompletionRequest:
    """Validate an OpenAI chat completions body (+ ``ralm`` extension): text messages only, the
    last one from the user (the question that retrieval answers)."""
    body = known_fields(body, _CHAT_FIELDS)
    model = parse_model(body, served_model)
    conversation, max_tokens, logprobs = parse_chat_fields(body, min(defaults.generation.max_new_tokens,
                                                                     max_tokens_limit), max_tokens_limit)
    return parse_generation(body, defaults, model, conversation, max_tokens, logprobs, retriever_kind)


def parse_chat_fields(body: Mapping[str, Any], default_max_tokens: int,
                      max_tokens_limit: int) -> tuple[Conversation, int, int | None]:
    """What every chat endpoint reads alike: ``messages``, ``max_tokens`` / ``max_completion_tokens``
    (default ``default_max_tokens``), ``logprobs`` + ``top_logprobs`` (-> the number of top
    alternatives, None when not asked), and the tool / format fields in their neutral values."""
    if "messages" not in body:
        raise bad("'messages' is required", "messages")
    conversation = parse_messages(body["messages"])
    given = {k: _int(body, k, 1, max_tokens_limit) for k in ("max_completion_tokens", "max_tokens")
             if body.get(k) is not None}
    if len(set(given.values())) > 1:
        raise bad("'max_tokens' and 'max_completion_tokens' differ; send one of them", "max_tokens")
    max_tokens = next(iter(given.values()), default_max_tokens)
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise bad(f"'logprobs' must be a boolean (true/false), got {type(want).__name__}", "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS) if body.get("top_logprobs") is not None else None
    if top is not None and not want:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    for key, neutral in (("tools", (None, [])), ("tool_choice", (None, "none"))):
        if body.get(key) not in neutral:
            raise bad(f"'{key}' is not supported: tool calls cannot be verified against the knowledge base", key)
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        raise bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise bad("'response_format' must be {\"type\": \"text\"} or absent", "response_format")
    return conversation, max_tokens, (top or 0) if want else None


def parse_messages(messages: Any) -> Conversation:
    """``messages`` -> ``Conversation``: system / developer / user / assistant turns whose content is a
    string or a list of text parts (joined with "\\n"); the last one is the user's question."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages", "messages")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{p}' must be an object with 'role' and 'content'", p)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"'{p}.role' must be one of {', '.join(CHAT_ROLES)}, got {role!r} "
                      "(tool and function messages are not supported)", f"{p}.role")
        for key, v in m.items():
            if key in ("role", "content") or (key == "name" and isinstance(v, str)):
                continue
            if key not in _NEUTRAL_MESSAGE_KEYS or v not in (None, []):
                raise bad(f"'{p}.{key}' is not supported (text messages only: role, content, name)", f"{p}.{key}")
        turns.append((CHAT_ROLES[role], message_text(m.get("content"), f"{p}.content")))
    last = len(turns) - 1
    if turns[-1][0] != "user":
        raise bad(f"the last message must be from the user (its question is what retrieval answers), "
                  f"got {turns[-1][0]!r}", f"messages[{last}].role")
    if not turns[-1][1].strip():
        raise bad("the last user message must not be empty", f"messages[{last}].content")
    return Conversation(tuple(turns[:-1]), turns[-1][1])


def message_text(content: Any, p: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts joined with "\\n"."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise bad(f"'{p}' must be a string or a non-empty list of text parts, got {type(content).__name__}", p)
    texts = []
    for j, part in enumerate(content):
        pp = f"{p}[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad(f"'{pp}' must be a text part (images, audio and files are not supported), got {kind!r}",
                      f"{pp}.type")
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise bad(f"'{pp}' must be {{\"type\": \"text\", \"text\": <string>}}", pp)
        texts.append(part["text"])
    return "\n".join(texts)


def check_no_echo(body: Mapping[str, Any]) -> None:
    if body.get("echo") not in (None, False):
        raise bad("'echo' is not supported (must be false or absent)", "echo")
    if body.get("suffix") is not None:
        raise bad("'suffix' is not supported", "suffix")


def known_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    body = require_object(body)
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"unsupported field '{unknown[0]}' (supported: {', '.join(sorted(allowed))})", unknown[0])
    return body


def parse_model(body: Mapping[str, Any], served_model: str) -> str:
    if "model" not in body:
        raise bad("'model' is required", "model")
    model = body["model"]
    if not isinstance(model, str) or not model:
        raise bad("'model' must be a non-empty string", "model")
    if model != served_model:
        raise APIError(404, f"model '{model}' does not exist; this server serves '{served_model}'",
                       "invalid_request_error", "model", "model_not_found")
    return model


def parse_stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    """``stop``: a string or a list of up to ``MAX_STOP`` non-empty strings (null, "" and [] = none)."""
    v = body.get("stop")
    if v is None or v == "":
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"at most {MAX_STOP} stop strings, got {len(stops)}", "stop")
    return tuple(dict.fromkeys(stops))


def parse_stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage`` (both false when absent)."""
    stream = False
    if body.get("stream") is not None:
        stream = _bool(body, "stream")
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict) or set(so) - {"include_usage"}:
            raise bad("'stream_options' must be an object with only 'include_usage'", "stream_options")
        if not stream:
            raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        if "include_usage" in so:
            include_usage = _bool(so, "include_usage", "stream_options.include_usage")
    return stream, include_usage


def check_neutral(body: Mapping[str, Any]) -> None:
    """OpenAI fields accepted only in their neutral values (``n`` 1, penalties 0, no
    ``logit_bias``), and ``user`` (a string, unused)."""
    for key, (msg, ok) in _NEUTRAL.items():
        v = body.get(key)
        if v is None:
            continue
        if not _is_num(v):
            raise bad(f"'{key}' must be a number, got {type(v).__name__}", key)
        if v != ok:
            raise bad(msg, key)
    if body.get("logit_bias") not in (None, {}):
        raise bad("'logit_bias' is not supported", "logit_bias")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("'user' must be a string", "user")


def parse_prompt(body: Mapping[str, Any]) -> str:
    """``prompt``: a non-empty string, or a list of exactly one."""
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad("'prompt' must be a string or a list of exactly one string "
                      "(batches and token-id prompts are not supported)", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad(f"'prompt' must be a string, got {type(prompt).__name__}", "prompt")
    if not prompt.strip():
        raise bad("'prompt' must not be empty", "prompt")
    return prompt


def parse_generation(body: Mapping[str, Any], defaults: EngineConfig, model: str, prompt: str | Conversation,
                     max_tokens: int, logprobs: int | None, retriever_kind: str) -> CompletionRequest:
    """What both endpoints share: streaming, neutral OpenAI fields, sampling, stop, the ``ralm``
    extension; -> the request with its GenerationConfig / SpeculationConfig."""
    stream, include_usage = parse_stream(body)
    check_neutral(body)
    gen_kw: dict[str, Any] = {"max_new_tokens": max_tokens, "stop": parse_stop(body), "logprobs": logprobs,
                              **parse_sampling(body)}
    spec_kw: dict[str, Any] = {}
    speculate = defaults.speculation.enabled
    return_trace = False
    for key, target, v in extension_fields(body, "ralm", _RALM_FIELDS):
        if key == "retriever":
            if v != retriever_kind:
                raise bad(f"unknown retriever '{v}': this server's knowledge base is '{retriever_kind}'", f"ralm.{key}")
        elif key == "speculate":
            speculate = v
        elif key == "return_trace":
            return_trace = v
        elif target == "gen":
            gen_kw[key] = v
        else:
            spec_kw[key] = v
    if isinstance(prompt, Conversation):  # messages are always laid out in the chat format
        if gen_kw.setdefault("prompt_format", "chat") == "plain":
            raise bad("chat messages are laid out in the chat format: 'ralm.prompt_format' cannot be 'plain' "
                      "(use /v1/completions)", "ralm.prompt_format")
    try:
        gen = replace(defaults.generation, **gen_kw)
    except ConfigError as exc:
        raise bad(str(exc), _ralm_param(str(exc), gen_kw)) from None
    try:
        spec = replace(defaults.speculation, **spec_kw)
    except ConfigError as exc:
        raise bad(str(exc), _ralm_param(str(exc), spec_kw)) from None
    try:  # the guesser's own rule (the static one needs a dense knowledge base), here to name the field
        plan_guess(spec.guesser, dense=retriever_kind != "bm25")
    except ConfigError as exc:
        raise bad(str(exc), "ralm.guesser") from None
    return CompletionRequest(model, prompt, stream, include_usage, gen, spec, speculate, return_trace)


def _ralm_param(message: str, sent: Mapping[str, Any]) -> str:
    """The field a config's ``ConfigError`` names (its messages start with the field's name):
    ``max_tokens`` for ``max_new_tokens``, ``ralm.<key>`` for a ``ralm`` field sent, else ``ralm``
    (a rule between fields)."""
    if message.startswith("max_new_tokens"):
        return "max_tokens"
    key = next((k for k in sorted(sent, key=len, reverse=True) if k in _RALM_FIELDS and message.startswith(k)), None)
    return f"ralm.{key}" if key is not None else "ralm"


def extension_fields(body: Mapping[str, Any], name: str, fields: Mapping[str, tuple[str, type, float, float]],
                     closed: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, str, Any]]:
    """The fields of the extension object ``body[name]`` (absent or null: none), each checked
    against ``fields`` (key -> (target, type, lo, hi): integers in [lo, hi], numbers in (lo, hi),
    or [lo, hi] for the keys in ``closed``; booleans; strings): ``(key, target, value)`` of the
    non-null ones, in order; a 400 naming ``name.key`` otherwise."""
    ext = body.get(name)
    if ext is None:
        return []
    if not isinstance(ext, dict):
        raise bad(f"'{name}' must be an object, got {type(ext).__name__}", name)
    out = []
    for key, v in ext.items():
        p = f"{name}.{key}"
        if key not in fields:
            raise bad(f"unknown field '{p}' (supported: {', '.join(sorted(fields))})", p)
        if v is None:
            continue
        target, typ, lo, hi = fields[key]
        if typ is int:
            v = _int(ext, key, int(lo), int(hi), p)
        elif typ is bool:
            v = _bool(ext, key, p)
        elif typ is float:
            shut = key in closed
            if not _is_num(v) or not (lo <= v <= hi if shut else lo < v < hi):
                raise bad(f"'{p}' must be a number in {'[' if shut else '('}{lo:g}, {hi:g}{']' if shut else ')'}, "
                          f"got {v!r}", p)
            v = float(v)
        elif typ is str and not isinstance(v, str):
            raise bad(f"'{p}' must be a string", p)
        out.append((key, target, v))
    return out


def parse_sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """``temperature`` 0 or [1e-6, 2], ``top_p`` (0, 1] and ``seed`` [0, 2**63) present in ``body`` (null =
    absent), as GenerationConfig fields; 400 naming the field otherwise."""
    out: dict[str, Any] = {}
    for key, (lo, hi, closed) in _SAMPLING_FIELDS.items():
        v = body.get(key)
        if v is None:
            continue
        if not _is_num(v):
            raise bad(f"'{key}' must be a number, got {type(v).__name__}", key)
        if not (lo <= v <= hi if closed else lo < v <= hi):
            raise bad(f"'{key}' must be in {'[' if closed else '('}{lo:g}, {hi:g}], got {v!r}", key)
        out[key] = float(v)
    if "temperature" in out and not temperature_ok(out["temperature"]):  # in [0, 2], but below the smallest
        raise bad(f"'temperature' must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {body['temperature']!r}",
                  "temperature")
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
            raise bad(f"'seed' must be an integer in [0, 2**63), got {seed!r}", "seed")
        out["seed"] = seed
    return out


def with_seed(req: CompletionRequest, seed: int) -> CompletionRequest:
    """``req`` with ``seed`` as its sampling seed (the server draws one when a sampled request has none)."""
    return replace(req, gen=replace(req.gen, seed=seed))


# ------------------------------------------------------------------ kNN-LM /v1/completions

_KNNLM_COMPLETION_FIELDS = _COMPLETION_FIELDS - {"ralm"} | {"knnlm"}
_KNNLM_CHAT_FIELDS = _CHAT_FIELDS - {"ralm"} | {"knnlm"}
# knnlm extension: field -> (target config, python type, lo, hi) (extension_fields; lam's range is closed)
_KNNLM_FIELDS: dict[str, tuple[str, type, float, float]] = {
    "speculate": ("req", bool, 0, 0),
    "k": ("knn", int, 1, 4096),
    "lam": ("knn", float, 0.0, 1.0),
    "knn_temperature": ("knn", float, 0.0, 1e9),
    "os3": ("spec", bool, 0, 0),
    "fixed_stride": ("spec", int, 1, 64),
    "s_max": ("spec", int, 1, 64),
    "gamma_max": ("spec", float, 0.0, 1.0),
    "cache_capacity": ("spec", int, 1, 65536),
    "successors": ("spec", int, 0, 1024),
    "async_verify": ("spec", bool, 0, 0),
    "strict": ("spec", bool, 0, 0),
}


@dataclass(frozen=True)
class KNNLMCompletionRequest:
    """One validated kNN-LM completion: the decoding (``knn``, ``max_new_tokens`` set from
    ``max_tokens``) and speculation settings in effect, greedy (the kNN-LM decodes the argmax)."""

    model: str
    prompt: str | Conversation  # /v1/completions: the text; /v1/chat/completions: the messages
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    knn: Any  # ralmspec.knnlm.model.KNNLMConfig
    spec: Any  # ralmspec.knnlm.speculative.SpeculativeKNNConfig
    speculate: bool


def parse_knnlm_completion(body: Any, knn_defaults: Any, spec_defaults: Any, speculate: bool, served_model: str,
                           max_tokens_limit: int, chat: bool = False) -> KNNLMCompletionRequest:
    """Validate a completions (``chat``: chat completions) body for a kNN-LM server (``ralmspec
    knnlm serve``): OpenAI fields, greedy only, no logprobs, and the ``knnlm`` extension over the
    server's defaults (``KNNLMConfig``, ``SpeculativeKNNConfig``); ``max_tokens`` absent = the
    server's ``max_new_tokens``."""
    body = known_fields(body, _KNNLM_CHAT_FIELDS if chat else _KNNLM_COMPLETION_FIELDS)
    model = parse_model(body, served_model)
    max_tokens = min(knn_defaults.max_new_tokens, max_tokens_limit)
    prompt: str | Conversation
    if chat:
        prompt, max_tokens, logprobs = parse_chat_fields(body, max_tokens, max_tokens_limit)
    else:
        prompt, logprobs = parse_prompt(body), body.get("logprobs")
        check_no_echo(body)
        if body.get("max_tokens") is not None:
            max_tokens = _int(body, "max_tokens", 1, max_tokens_limit)
    stream, include_usage = parse_stream(body)
    check_neutral(body)
    if logprobs is not None:
        raise bad("'logprobs' is not supported by the kNN-LM server", "logprobs")
    sampling = parse_sampling(body)
    for key, greedy in (("temperature", 0.0), ("top_p", 1.0)):
        if sampling.get(key, greedy) != greedy:
            raise bad(f"the kNN-LM decodes greedily (the argmax of its interpolated distribution): '{key}' must be "
                      f"{greedy:g} or absent", key)
    kw: dict[str, dict[str, Any]] = {"knn": {"max_new_tokens": max_tokens}, "spec": {}}
    for key, target, v in extension_fields(body, "knnlm", _KNNLM_FIELDS, closed={"lam"}):
        if target == "req":
            speculate = v
        else:
            kw[target]["temperature" if key == "knn_temperature" else key] = v
    try:
        knn = replace(knn_defaults, **kw["knn"])
        spec = replace(spec_defaults, **kw["spec"])
    except ConfigError as exc:
        raise bad(str(exc), "knnlm") from None
    return KNNLMCompletionRequest(model, prompt, stream, include_usage, parse_stop(body), knn, spec, speculate)


# ------------------------------------------------------------------ retrieval service


def parse_retrieve(body: Any, max_queries: int, max_k: int, max_texts: int,
                   corpus_size: int) -> tuple[list[str], int, bool]:
    """``{"queries": [str] | str, "k": int = 1, "include_text": bool = true}``; with the text, at
    most ``max_texts`` passages in the answer (queries x min(k, ``corpus_size``)): 512 queries at
    k = 1000 made an answer of ~370 MB, built in memory."""
    body = require_object(body)
    unknown = sorted(set(body) - {"queries", "k", "include_text"})
    if unknown:
        raise bad(f"unsupported field '{unknown[0]}' (supported: queries, k, include_text)", unknown[0])
    if "queries" not in body:
        raise bad("'queries' is required (a list of query strings)", "queries")
    queries = body["queries"]
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not queries:
        raise bad("'queries' must be a non-empty list of strings", "queries")
    if len(queries) > max_queries:
        raise bad(f"at most {max_queries} queries per request, got {len(queries)}", "queries")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise bad(f"'queries[{i}]' must be a string, got {type(q).__name__}", f"queries[{i}]")
    k = _int(body, "k", 1, max_k) if body.get("k") is not None else 1
    include_text = _bool(body, "include_text") if body.get("include_text") is not None else True
    texts = len(queries) * min(k, corpus_size)
    if include_text and texts > max_texts:
        raise bad(f"{len(queries)} queries x k={k} ask for {texts} passages with their text, more than this server "
                  f"answers at once ({max_texts}): send fewer queries per request, or include_text: false and "
                  "fetch the passages needed with /v1/passages", "k")
    return queries, k, include_text


def parse_doc_ids(body: Mapping[str, Any], corpus_size: int, max_ids: int, key: str = "doc_ids") -> list[int]:
    if key not in body:
        raise bad(f"'{key}' is required (a list of integer doc ids)", key)
    ids = body[key]
    if not isinstance(ids, list):
        raise bad(f"'{key}' must be a list of integers", key)
    if len(ids) > max_ids:
        raise bad(f"at most {max_ids} doc ids per request, got {len(ids)}", key)
    for i, d in enumerate(ids):
        if not _is_int(d):
            raise bad(f"'{key}[{i}]' must be an integer", f"{key}[{i}]")
        if not 0 <= d < corpus_size:
            raise bad(f"'{key}[{i}]' = {d} is not a doc id (the corpus has {corpus_size} passages)", f"{key}[{i}]")
    return ids


def parse_score(body: Any, corpus_size: int, max_ids: int) -> tuple[str, list[int]]:
    """``{"query": str, "doc_ids": [int]}``."""
    body = require_object(body)
    unknown = sorted(set(body) - {"query", "doc_ids"})
    if unknown:
        raise bad(f"unsupported field '{unknown[0]}' (supported: query, doc_ids)", unknown[0])
    if not isinstance(body.get("query"), str):
        raise bad("'query' is required and must be a string", "query")
    return body["query"], parse_doc_ids(body, corpus_size, max_ids)


def parse_passages(body: Any, corpus_size: int, max_ids: int) -> list[int]:
    """``{"doc_ids": [int]}``."""
    body = require_object(body)
    unknown = sorted(set(body) - {"doc_ids"})
    if unknown:
        raise bad(f"unsupported field '{unknown[0]}' (supported: doc_ids)", unknown[0])
    return parse_doc_ids(body, corpus_size, max_ids)
