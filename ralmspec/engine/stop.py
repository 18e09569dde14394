"""Stop sequences: where an answer's text ends, on verified text only.

The rule (one definition for the engine, the result and the stream): reading the generated text
left to right, the answer stops at the first point where some stop string has just been
completed, i.e. the occurrence with the smallest END (ties: the longest, which starts first);
the text is cut at that occurrence's START. Because it looks only at the text read so far, the
rule gives the same cut on a prefix of the text as on the whole text once the prefix holds the
occurrence, which is what lets

- the loops (``RalmContext.finished``) stop after the chunk whose text completes a stop string,
  exactly as they stop after an EOS, so speculative and naive runs end at the same chunk;
- ``cut_result`` keep the shortest token prefix whose text holds it (the tokens reported in
  ``usage`` and ``logprobs``) and the text before it;
- ``StopStream`` send streamed text as soon as it can no longer become part of a stop string
  (it holds back the longest tail that is a prefix of one), so a stop string that spans two
  chunks is never sent in part.

A partial multi-byte character at the end of a decoded prefix (U+FFFD) is not text yet, and
neither is a trailing run of byte-fallback tokens (SentencePiece's ``<0xE6>``: the decoder turns a
run into text as a whole, and a run that becomes invalid UTF-8 turns into U+FFFD for every byte,
a character it already completed included), so the text of a prefix is always a prefix of the
text of the whole.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ralmspec.engine.result import GenerationResult
from ralmspec.lm.base import Tokenizer

PARTIAL_CHAR = "\ufffd"


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, int] | None:
    """``(start, end)`` of the stop occurrence that ends first in ``text`` (ties: the longest);
    ``None`` when no stop string occurs."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s)
        if i < 0:
            continue
        # the first occurrence of s is also the one that ends first
        cand = (i, i + len(s))
        if best is None or (cand[1], cand[0]) < (best[1], best[0]):
            best = cand
    return best


def byte_run_start(tokenizer: Tokenizer, ids: Sequence[int], end: int, lo: int = 0) -> int:
    """``end`` moved left (not below ``lo``) to the start of the run of byte-fallback tokens that
    ``ids[end - 1]`` ends (``tokenizer.is_byte_token``); ``end`` itself when it ends none."""
    is_byte = getattr(tokenizer, "is_byte_token", None)
    if is_byte is None:
        return end
    while end > lo and is_byte(ids[end - 1]):
        end -= 1
    return end


def stable_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The decoded text of ``ids`` that more tokens cannot change: without a trailing partial
    character or a trailing run of byte-fallback tokens (module doc)."""
    return tokenizer.decode(list(ids[:byte_run_start(tokenizer, ids, len(ids))])).rstrip(PARTIAL_CHAR)


def cut_result(result: GenerationResult, stops: Sequence[str], tokenizer: Tokenizer) -> GenerationResult:
    """``result`` ended by its first stop string (module rule): tokens cut to the shortest prefix
    whose text completes it, text cut before it, steps clipped, ``finish_reason`` "stop".
    Unchanged when no stop string occurs."""
    ids = result.token_ids
    # the answer is over: a byte-fallback run at its end is final too (what ``finish`` streams)
    whole = tokenizer.decode(list(ids)).rstrip(PARTIAL_CHAR)
    if not stops or find_stop(whole, stops) is None:
        return result
    lo, k = 0, len(ids)  # holding a stop is monotone in the prefix length: bisect the shortest
    while k - lo > 1:
        mid = (lo + k) // 2
        if find_stop(stable_text(tokenizer, ids[:mid]), stops) is None:
            lo = mid
        else:
            k = mid
    text = stable_text(tokenizer, ids[:k]) if k < len(ids) else whole
    start, _ = find_stop(text, stops)  # type: ignore[misc]
    steps = [replace(st, end=min(st.end, k)) for st in result.steps if st.start < k]
    return replace(result, token_ids=list(ids[:k]), text=text[:start], steps=steps, finish_reason="stop")


class StopWatch:
    """``completed(generated)``: does the text of a request's generated tokens complete a stop
    string (the module rule, ``find_stop``)? The loops ask after every chunk, verified or
    speculated; decoding the whole answer each time would be quadratic in its length. So it
    keeps the longest answer prefix known to hold none (``clean``: a prefix of a stop-free text
    is stop-free, decoding being prefix-stable) and decodes only a window: an occurrence in the
    new text starts at most ``longest - 1`` characters before the clean text's end, so the window
    covers those and ``MARGIN`` more (where a decoder may render a window's first token
    differently: a dropped leading space, half a character), starting from the longest common
    prefix of ``clean`` and the new tokens (a rollback replaces the tail, it does not extend
    it). The answers are those of the full check (tested)."""

    MARGIN = 8

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]):
        self.tok, self.stops = tokenizer, tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=1)
        self.clean: tuple[int, ...] = ()
        self.last: tuple[tuple[int, ...], bool] | None = None

    def completed(self, generated: Sequence[int]) -> bool:
        ids = tuple(generated)
        if self.last is not None and self.last[0] == ids:  # the loops ask repeatedly
            return self.last[1]
        hit = bool(self.stops) and self._holds_stop(ids, _common_prefix(self.clean, ids))
        if not hit:
            self.clean = ids
        self.last = (ids, hit)
        return hit

    def _holds_stop(self, ids: tuple[int, ...], k: int) -> bool:
        need = self.longest - 1 + self.MARGIN  # characters of the clean text to look back on
        lo = k
        while lo > 0:
            lo = max(0, lo - need)
            if len(stable_text(self.tok, ids[lo:k])) >= need:
                break
        window = stable_text(self.tok, ids[lo:])
        if lo == 0:
            return find_stop(window, self.stops) is not None
        head = stable_text(self.tok, ids[lo:k])
        if not window.startswith(head):  # a decoder that is not prefix-stable here: the full check
            return find_stop(stable_text(self.tok, ids), self.stops) is not None
        return find_stop(window[len(head) - (self.longest - 1):], self.stops) is not None


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (slices compared in C, bisected)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class StopStream:
    """Filters streamed text deltas: passes on what can no longer be part of a stop string,
    holds back the longest tail that is a prefix of one, and cuts at the first stop (module
    rule). The concatenation of its outputs is the text ``cut_result`` returns."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""  # received, not yet passed on
        self.stopped = False

    def push(self, delta: str) -> str:
        """The text that can be sent after receiving ``delta`` ("" once stopped)."""
        if self.stopped:
            return ""
        text = self.held + delta
        hit = find_stop(text, self.stops)
        if hit is not None:
            self.stopped, self.held = True, ""
            return text[: hit[0]]
        keep = self._partial_tail(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        """The held-back text, once no more text will come (no stop string completed it)."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
