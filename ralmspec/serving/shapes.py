"""The OpenAI response shapes of ``/v1/completions`` and ``/v1/chat/completions`` (pure: no I/O).

Both endpoints run the same request the same way (ralmspec/serving/app.py); a shape only says how its
answer, its stream chunks and its logprobs are written:

- completions: ``text_completion`` objects, ``choices[0].text``; logprobs as
  ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`` (the top
  alternatives and the chosen token; offsets into the returned text);
- chat: ``chat.completion`` / ``chat.completion.chunk`` objects, ``choices[0].message`` or
  ``delta`` (the role first, then content), logprobs as ``{"content": [{"token", "logprob",
  "bytes", "top_logprobs": [...]}], "refusal": null}``.

Token names are the tokenizer's text of each token (``HFTokenizer.piece``: special tokens shown);
``bytes`` are the token's own bytes (``HFTokenizer.piece_bytes``: in a byte-level vocabulary a token
holding part of a multi-byte character has those bytes, its name U+FFFD), so the bytes of an
answer's tokens, joined, are its UTF-8 text.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from ralmspec.engine.result import GenerationResult
from ralmspec.engine.stream import TokenOffsets
from ralmspec.lm.base import TokenLogprob


def finish_reason(result: GenerationResult) -> str:
    """OpenAI's finish reason: "stop" for an EOS or a stop string, else "length"."""
    return "stop" if result.finish_reason in ("eos", "stop") else "length"


def usage(result: GenerationResult) -> dict[str, int]:
    p, c = result.prompt_tokens, len(result.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def token_piece(tokenizer: Any, token_id: int) -> str:
    piece = getattr(tokenizer, "piece", None)
    return piece(token_id) if piece is not None else tokenizer.decode([token_id])


def text_offsets(tokenizer: Any, ids: list[int]) -> list[int]:
    """Where each token's text starts in the decoded text of ``ids`` (ralmspec/engine/stream.py ``TokenOffsets``)."""
    return TokenOffsets(tokenizer).push(ids).starts


class CompletionShape:
    """``/v1/completions``."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"
    prompt_param = "prompt"  # the field an error about the prompt names
    reports_offsets = True  # its logprobs carry each token's text offset

    def choice(self, text: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
        return {"text": text, "index": 0, "finish_reason": finish, "logprobs": logprobs}

    def role_choice(self) -> dict[str, Any] | None:
        return None  # completions streams have no role chunk

    def delta(self, text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return self.choice(text, finish, logprobs)

    def logprobs(self, scored: Sequence[TokenLogprob], tokenizer: Any, offsets: Sequence[int]) -> dict[str, Any]:
        """``scored`` tokens' logprobs; ``offsets``: where each token's text starts in the answer."""
        names = [token_piece(tokenizer, lp.token) for lp in scored]
        top = []
        for lp, name in zip(scored, names):
            alts: dict[str, float] = {}
            for i, v in lp.top:
                alts.setdefault(token_piece(tokenizer, i), v)
            alts.setdefault(name, lp.logprob)  # OpenAI: the chosen token is always there
            top.append(alts)
        return {"tokens": names, "token_logprobs": [lp.logprob for lp in scored], "top_logprobs": top,
                "text_offset": list(offsets)}


class ChatShape:
    """``/v1/chat/completions``."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    prompt_param = "messages"
    reports_offsets = False

    def choice(self, text: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def role_choice(self) -> dict[str, Any] | None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": logprobs, "finish_reason": finish}

    def logprobs(self, scored: Sequence[TokenLogprob], tokenizer: Any, offsets: Sequence[int]) -> dict[str, Any]:
        """``scored`` tokens' logprobs (``offsets``: unused, chat reports bytes instead)."""
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            name = token_piece(tokenizer, token_id)
            raw = tokenizer.piece_bytes(token_id) if hasattr(tokenizer, "piece_bytes") else name.encode("utf-8")
            return {"token": name, "logprob": logprob, "bytes": list(raw)}

        return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                            for lp in scored], "refusal": None}


COMPLETION = CompletionShape()
CHAT = ChatShape()
Shape = CompletionShape | ChatShape


def answer(shape: Shape, cid: str, created: int, model: str, result: GenerationResult, tokenizer: Any,
           extension: dict[str, Any]) -> dict[str, Any]:
    """The non-streamed response body; ``extension``: the server's own fields (``{"ralm": ...}``)."""
    logprobs = None
    if result.logprobs is not None:
        offsets: list[int] = []
        if shape.reports_offsets:
            ids = [lp.token for lp in result.logprobs]
            offsets = [min(at, len(result.text)) for at in text_offsets(tokenizer, ids)]
        logprobs = shape.logprobs(result.logprobs, tokenizer, offsets)
    return {"id": cid, "object": shape.object, "created": created, "model": model,
            "choices": [shape.choice(result.text, finish_reason(result), logprobs)], "usage": usage(result),
            **extension}


def event(shape: Shape, cid: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any) -> bytes:
    """One Server-Sent Event holding a stream chunk."""
    d = {"id": cid, "object": shape.chunk_object, "created": created, "model": model, "choices": choices, **extra}
    return b"data: " + json.dumps(d).encode() + b"\n\n"


def model_list(model: str, created: float) -> dict[str, Any]:
    """``GET /v1/models``: the one model a server serves."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": int(created),
                                        "owned_by": "ralmspec"}]}
