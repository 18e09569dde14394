"""The pure parts of a stream (ralmspec/engine/stream.py) with the real SmolLM2 tokenizer (byte-level
BPE: a multi-byte character can span tokens): text deltas, token text offsets, and which tokens'
logprobs go with the text sent so far (stop strings holding text back included)."""

from __future__ import annotations

import pytest

from ralmspec.engine.stop import cut_result, stable_text
from ralmspec.engine.result import GenerationResult
from ralmspec.lm.base import TokenLogprob
from ralmspec.serving.shapes import text_offsets
from ralmspec.engine.stream import IncrementalDetokenizer, LogprobRelease, TokenOffsets, VerifiedText

TEXT = "Hed PE is from Huntington Beach, Zürich – 東京 🎸🎸 naïve café. The end."


@pytest.fixture(scope="module")
def tok(smollm2_lm):
    return smollm2_lm.tokenizer


def chunks_of(ids: list[int], sizes: tuple[int, ...]) -> list[list[int]]:
    out, at, i = [], 0, 0
    while at < len(ids):
        n = sizes[i % len(sizes)]
        out.append(ids[at: at + n])
        at, i = at + n, i + 1
    return out


def test_a_character_spans_tokens_here(tok):
    ids = tok.encode(TEXT)
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))  # the case that matters


@pytest.mark.parametrize("sizes", [(1,), (2,), (3, 1), (7,)])
def test_token_offsets_grow_as_the_text_does(tok, sizes):
    ids = tok.encode(TEXT)
    offsets = TokenOffsets(tok)
    for part in chunks_of(ids, sizes):
        offsets.push(part)
    assert offsets.starts == text_offsets(tok, ids) and offsets.ends[-1] == len(TEXT)
    assert offsets.starts[1:] == offsets.ends[:-1]
    for i in range(len(ids)):  # a token's text ends where the decoded text of its prefix does
        assert offsets.ends[i] == len(stable_text(tok, ids[: i + 1]))


@pytest.mark.parametrize("stop", [None, "café", "東京 🎸", "Zürich –", "\u2603never"])
@pytest.mark.parametrize("sizes", [(1,), (2,), (3, 1)])
def test_logprobs_go_with_the_text_that_completes_them(tok, stop, sizes):
    """Streamed as the server streams (detokenizer, stop hold-back): after each delta the entries
    released are exactly the tokens whose whole text has been sent; the finish gives the rest of
    the (stop-cut) answer's, and everything sent, concatenated, is the answer's logprobs."""
    ids = tok.encode(TEXT)
    scored = [TokenLogprob(t, -float(i), ()) for i, t in enumerate(ids)]
    ends = [len(stable_text(tok, ids[: i + 1])) for i in range(len(ids))]
    stream, release = VerifiedText(tok, [stop] if stop else []), LogprobRelease(tok)
    text, sent_entries, sent_offsets, at = "", [], [], 0
    for part in chunks_of(ids, sizes):
        release.push(scored[at: at + len(part)])
        at += len(part)
        delta = stream.push(part)
        text += delta
        assert stream.sent == len(text)
        if delta:
            entries, offsets = release.release(len(text))
            sent_entries += entries
            sent_offsets += offsets
            assert len(sent_entries) == sum(1 for e in ends[:at] if e <= len(text))  # all covered, none ahead
    text += stream.finish()
    result = GenerationResult(prompt="q", mode="naive", prompt_ids=[1], token_ids=list(ids), text=TEXT, steps=[],
                              finish_reason="length", latency_s=0.0, stats={})
    final = cut_result(result, [stop] if stop else [], tok)
    assert text == final.text
    rest, rest_offsets = release.finish(scored[: len(final.token_ids)], len(final.text))
    assert sent_entries + rest == scored[: len(final.token_ids)]
    assert sent_offsets + rest_offsets == [min(o, len(final.text)) for o in text_offsets(tok, final.token_ids)]
    if stop == "café":
        assert len(final.token_ids) < len(ids) and rest  # the stop's own tokens come with the finish


def test_finish_refuses_a_stream_that_ran_ahead(tok):
    ids = tok.encode(TEXT)
    release = LogprobRelease(tok)
    release.push([TokenLogprob(t, 0.0, ()) for t in ids])
    release.release(len(TEXT))
    with pytest.raises(AssertionError, match="not the answer's"):
        release.finish([TokenLogprob(t, 0.0, ()) for t in ids[:3]], 5)


@pytest.mark.parametrize("model", ["smollm2", "tiny"])
def test_deltas_of_a_long_answer_are_its_text(model, tok, tiny_lm):
    """The detokenizer decodes a sliding window, not the whole answer at every push: over a long
    text full of multi-byte characters split across tokens (byte-level BPE) or "##" pieces
    (WordPiece), in chunks of 1 to 7 tokens, its deltas still add up to ``decode(all)``, and none
    ends in half a character."""
    tokenizer = tok if model == "smollm2" else tiny_lm.tokenizer
    ids = tokenizer.encode((TEXT + " unbelievably tokenization ") * 40)
    assert len(ids) > 600
    for size in (1, 3, 4, 7):
        detok = IncrementalDetokenizer(tokenizer)
        deltas = [detok.push(part) for part in chunks_of(ids, (size,))]
        assert "".join(deltas) + detok.finish() == tokenizer.decode(ids), size
        assert not any(d.endswith("\ufffd") for d in deltas)
        assert detok.start > len(ids) // 2  # the window did slide
