"""The pure parts of a streamed answer (no I/O): its text deltas and the logprobs that go with them.

A stream (ralmspec/serving/app.py ``_stream``, ``ralmspec generate --stream``) receives verified chunks
(``VerifiedChunk``: token ids, and their logprobs when the request asks for them) and sends text
as it becomes final (``VerifiedText``):

- ``IncrementalDetokenizer`` turns the growing token list into text deltas whose concatenation is
  the decoded answer (an incomplete multi-byte character is held back);
- ``engine/stop.py``'s ``StopStream`` then holds back what a stop string could still cut;
- ``LogprobRelease`` says which tokens' logprobs go with the text sent so far: a token's entry is
  sent in the chunk that completes the sending of its text, so a chunk's logprobs are those of the
  tokens its text delta finishes (as in OpenAI's streams), a token whose text is held back waits
  with it, and what is left (a token whose text a stop string cut, an EOS with no text) goes with
  the finish chunk. The entries sent, concatenated, are the non-streamed answer's logprobs, text
  offsets included (one ``TokenOffsets`` computes both).
"""

from __future__ import annotations

from typing import Any, Sequence

from ralmspec.engine.stop import PARTIAL_CHAR, StopStream, byte_run_start, stable_text
from ralmspec.lm.base import TokenLogprob


class IncrementalDetokenizer:
    """Text deltas of a growing token list whose concatenation is ``decode(all tokens)``.

    A delta is sent only when the decoded text extends what was sent (trailing U+FFFD of an
    incomplete multi-byte character is held back); ``finish`` flushes the rest. Each push decodes
    only a window: the tokens since the last fully sent point, with ``context`` tokens before it
    (a decoder's output for a token depends only on its close left neighbours: a byte-level
    BPE's bytes, a WordPiece's "##" join), so a long answer costs linear, not quadratic, time.
    """

    def __init__(self, tokenizer: Any, context: int = 8):
        self.tok, self.context = tokenizer, context
        self.ids: list[int] = []
        self.start = 0  # the window: ids[start:]
        self.sent = ""  # the window's text already sent

    def push(self, ids: Sequence[int]) -> str:
        self.ids += ids
        end = byte_run_start(self.tok, self.ids, len(self.ids), self.start)  # a trailing byte run waits
        full = self.tok.decode(self.ids[self.start:end])
        text = full.rstrip(PARTIAL_CHAR)
        if not (text.startswith(self.sent) and len(text) > len(self.sent)):
            return ""
        delta, self.sent = text[len(self.sent):], text
        if text == full and end - self.start > 2 * self.context:  # all sent: slide the window,
            self.start = byte_run_start(self.tok, self.ids, end - self.context, self.start)  # not into a run
            self.sent = self.tok.decode(self.ids[self.start:end])
        return delta

    def finish(self) -> str:
        text = self.tok.decode(self.ids[self.start:])
        if text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            return delta
        return ""  # cannot happen for prefix-stable tokenizers (WordPiece, byte-level BPE)


class VerifiedText:
    """The text to send of a stream of verified chunks: their deltas, cut at the first stop
    string and held back while one may still start (module doc). The concatenation of
    ``push``es and ``finish`` is the answer's text as ``cut_result`` returns it."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()):
        self.detok, self.stops = IncrementalDetokenizer(tokenizer), StopStream(stops)
        self.sent = 0  # characters sent

    def push(self, ids: Sequence[int]) -> str:
        return self._sending(self.stops.push(self.detok.push(ids)))

    def finish(self) -> str:
        return self._sending(self.stops.push(self.detok.finish()) + self.stops.finish())

    def _sending(self, text: str) -> str:
        self.sent += len(text)
        return text


class TokenOffsets:
    """Where each token's text starts (``starts``) and ends (``ends``) in the decoded text of a
    growing token list: the length each token adds, decoded with its ``window`` left neighbours
    (linear in the length, not quadratic); a token ending inside a multi-byte character adds
    nothing, the one completing it adds the character."""

    def __init__(self, tokenizer: Any, window: int = 8):
        self.tok, self.window = tokenizer, window
        self.ids: list[int] = []
        self.starts: list[int] = []
        self.ends: list[int] = []

    def push(self, ids: Sequence[int]) -> TokenOffsets:
        for t in ids:
            i = len(self.ids)
            self.ids.append(int(t))
            run = byte_run_start(self.tok, self.ids, i)  # the byte-fallback run ids[run:i], if any
            lo = byte_run_start(self.tok, self.ids, min(max(0, i - self.window), run))  # never inside a run
            at = self.ends[-1] if self.ends else 0
            added = len(stable_text(self.tok, self.ids[lo: i + 1])) - len(stable_text(self.tok, self.ids[lo:i]))
            if run < i and added:  # t closed the run: the run's text is its last byte token's
                closed = len(self.tok.decode(self.ids[lo:i])) - len(self.tok.decode(self.ids[lo:run]))
                self.ends[-1] += closed
                at, added = at + closed, added - closed
            self.starts.append(at)
            self.ends.append(at + added)
        return self


class LogprobRelease:
    """The logprobs a stream sends with its text (module doc). ``push`` each verified chunk's
    logprobs; ``release(sent)`` after sending text (``sent``: characters of answer text sent so
    far) gives the entries newly covered and their text offsets; ``finish`` the rest of the
    final answer's."""

    def __init__(self, tokenizer: Any):
        self.offsets = TokenOffsets(tokenizer)
        self.scored: list[TokenLogprob] = []
        self.released = 0  # entries sent

    def push(self, logprobs: Sequence[TokenLogprob]) -> None:
        self.scored += logprobs
        self.offsets.push([lp.token for lp in logprobs])

    def release(self, sent: int) -> tuple[list[TokenLogprob], list[int]]:
        """Entries (in order) whose whole text is among the first ``sent`` characters."""
        k = self.released
        while k < len(self.scored) and self.offsets.ends[k] <= sent:
            k += 1
        return self._take(k, sent)

    def finish(self, final: Sequence[TokenLogprob], text_len: int) -> tuple[list[TokenLogprob], list[int]]:
        """The final answer's entries not sent yet (``final``: the result's logprobs, cut where
        the answer ends; ``text_len``: its text's length, where offsets are clipped)."""
        if self.released > len(final) or list(final[:self.released]) != self.scored[:self.released]:
            raise AssertionError("a stream sent logprobs that are not the answer's")
        self.scored = list(final)
        return self._take(len(final), text_len)

    def _take(self, k: int, clip: int) -> tuple[list[TokenLogprob], list[int]]:
        out = self.scored[self.released:k], [min(s, clip) for s in self.offsets.starts[self.released:k]]
        self.released = k
        return out
