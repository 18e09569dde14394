"""The pure parts of a stream (ralmspec/engine/stream.py) with the real SmolLM2 tokenizer (byte-level
BPE: a multi-byte character can span tokens) and a SentencePiece-style one with byte fallback
(Llama 2's kind: a character outside the vocabulary is spelt as ``<0x..>`` tokens, whose run the
decoder turns into text as a whole): text deltas, token text offsets, and which tokens' logprobs
go with the text sent so far (stop strings holding text back included)."""

from __future__ import annotations

import random

import pytest

from ralmspec.engine.stop import cut_result, stable_text
from ralmspec.engine.result import GenerationResult
from ralmspec.lm.base import TokenLogprob
from ralmspec.serving.shapes import text_offsets
from ralmspec.engine.stream import IncrementalDetokenizer, LogprobRelease, TokenOffsets, VerifiedText

TEXT = "Hed PE is from Huntington Beach, Zürich – 東京 🎸🎸 naïve café. The end."


@pytest.fixture(scope="module", params=["byte-level", "byte-fallback"])
def tok(request):
    if request.param == "byte-fallback":
        from tests.tokenizer_kinds import byte_fallback_tokenizer

        return byte_fallback_tokenizer()
    return request.getfixturevalue("smollm2_lm").tokenizer


def is_byte(tok, token_id: int) -> bool:
    return getattr(tok, "is_byte_token", lambda _: False)(token_id)


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
        if not is_byte(tok, ids[i]):  # (a byte run's text is its last byte's, once the run is closed)
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


@pytest.mark.parametrize("model", ["tok", "tiny"])
def test_deltas_of_a_long_answer_are_its_text(model, tok, tiny_lm):
    """The detokenizer decodes a sliding window, not the whole answer at every push: over a long
    text full of multi-byte characters split across tokens (byte-level BPE) or "##" pieces
    (WordPiece), in chunks of 1 to 7 tokens, its deltas still add up to ``decode(all)``, and none
    ends in half a character."""
    tokenizer = tok if model == "tok" else tiny_lm.tokenizer
    ids = tokenizer.encode((TEXT + " unbelievably tokenization ") * 40)
    assert len(ids) > 600
    for size in (1, 3, 4, 7):
        detok = IncrementalDetokenizer(tokenizer)
        deltas = [detok.push(part) for part in chunks_of(ids, (size,))]
        assert "".join(deltas) + detok.finish() == tokenizer.decode(ids), size
        assert not any(d.endswith("\ufffd") for d in deltas)
        assert detok.start > len(ids) // 2  # the window did slide


def test_byte_fallback_runs_stream_as_their_final_text():
    """Random answers of a byte-fallback tokenizer, mixing words, characters spelt in bytes and
    stray bytes (a run that is not valid UTF-8: the decoder turns every byte of it into U+FFFD, a
    character it had completed included), pushed in random chunks. Before the fix the stream sent
    such a character and then could not send the rest (text lost), or slid its window into a run
    (U+FFFD streamed for a valid character)."""
    from tests.tokenizer_kinds import byte_fallback_tokenizer

    tok = byte_fallback_tokenizer()
    byte_id = {b: i for i, b in tok._byte_tokens.items()}
    words = tok.encode("The first season was a success in Paris and the end of the story")
    rng = random.Random(28)
    for trial in range(300):
        ids: list[int] = []
        while len(ids) < rng.randrange(4, 60):
            kind = rng.random()
            if kind < 0.5:
                ids.append(rng.choice(words))
            elif kind < 0.85:
                ids += [byte_id[b] for b in rng.choice("日本語🎉é€ш").encode()]
            else:
                ids.append(byte_id[rng.choice([0xE6, 0x97, 0xC3, 0xFF, 0x80])])  # a stray byte
        final = tok.decode(ids)
        for k in range(len(ids) + 1):  # what more tokens cannot change is a prefix of the whole
            assert final.startswith(stable_text(tok, ids[:k])), (trial, k)
        sizes = tuple(rng.randrange(1, 6) for _ in range(4))
        detok, offsets, text = IncrementalDetokenizer(tok, context=rng.choice((2, 8))), TokenOffsets(tok, window=3), ""
        for part in chunks_of(ids, sizes):
            text += detok.push(part)
            assert final.startswith(text), (trial, text, final)
            offsets.push(part)
        assert text + detok.finish() == final
        assert offsets.starts == text_offsets(tok, ids) and offsets.starts[1:] == offsets.ends[:-1]
        assert offsets.ends[-1] <= len(final)
        stop = final.replace("\ufffd", "")[rng.randrange(len(final)):][:3] or "never"  # (U+FFFD is no text)
        stream = VerifiedText(tok, [stop])
        sent = "".join(stream.push(part) for part in chunks_of(ids, sizes)) + stream.finish()
        result = GenerationResult(prompt="q", mode="naive", prompt_ids=[1], token_ids=list(ids), text=final,
                                  steps=[], finish_reason="length", latency_s=0.0, stats={})
        assert sent == cut_result(result, [stop], tok).text, (trial, stop)


def test_byte_fallback_pieces_are_the_tokens_text_and_bytes():
    """Logprobs' token names keep a SentencePiece token's space, and the bytes of consecutive
    tokens join to the text (a byte token's bytes are its byte; before: U+FFFD's three)."""
    from tests.tokenizer_kinds import byte_fallback_tokenizer

    tok = byte_fallback_tokenizer()
    ids = tok.encode("The first season was 日本 🎉 café end")
    assert any(tok.is_byte_token(i) for i in ids)
    assert b"".join(tok.piece_bytes(i) for i in ids).decode() == " The first season was 日本 🎉 café end"
    assert tok.piece(tok.encode("The first")[1]) == " first"
