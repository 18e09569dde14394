"""The engine's prompts (engine/prompt.py, RalmContext) against ``apply_chat_template(tokenize=True)``
with the tokenizer kinds of Llama 2 / Mistral / Gemma (SentencePiece: a space written before a
text) and Llama 3 (byte-level BPE), built from the embedded passages (tests/tokenizer_kinds.py).
SmolLM2's (byte-level) is checked in test_real_model.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ralmspec.config import GenerationConfig
from ralmspec.engine.context import PassageTokens, RalmContext
from ralmspec.engine.prompt import PASSAGE_SEPARATOR, PromptFormat
from tests.tokenizer_kinds import GEMMA_TEMPLATE, llama3_tokenizer, sentencepiece_chat_tokenizer

TOKENIZERS = {
    "mistral": lambda: sentencepiece_chat_tokenizer(),  # Prepend("\u2581") normalizer (Llama 2's file)
    "mistral-metaspace": lambda: sentencepiece_chat_tokenizer(metaspace=True),  # prepend_scheme "first"
    "gemma": lambda: sentencepiece_chat_tokenizer(GEMMA_TEMPLATE),  # its turn tokens special; | trim
    "llama3": llama3_tokenizer,  # byte-level: was right, must stay so
}
HISTORIES = [
    (),
    (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")),
    (("user", "what is the capital of France?\n"), ("assistant", " Paris.  ")),
]
QUESTIONS = ["Who is Robert Boulter?", "Où est le café? 日本 🎉 <0x41> x"]
PASSAGE = "Robert Boulter\nRobert Boulter is an English film , television and theatre actor ."


def _context(tok, history, closed_book: bool) -> RalmContext:
    lm = SimpleNamespace(tokenizer=tok, max_context=4096)
    retriever = SimpleNamespace(corpus=[SimpleNamespace(content=PASSAGE)])
    return RalmContext(lm, retriever, PassageTokens(lm, retriever), None, None,
                       GenerationConfig(passage_tokens=256, max_new_tokens=8), PromptFormat.chat(tok, history),
                       closed_book=closed_book)


def _reference(tok, history, message: str) -> list[int]:
    messages = [{"role": r, "content": t} for r, t in history] + [{"role": "user", "content": message}]
    ids = tok.hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _histories(kind):
    # Gemma's template has no system role (the real one raises)
    return [h for h in HISTORIES if not (kind == "gemma" and h and h[0][0] == "system")]


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_the_chat_prompt_is_the_tokens_the_template_makes(kind):
    """Each piece was tokenized as a text of its own: a SentencePiece tokenizer wrote a space
    ("\u2581") before each, so the model read '<s>  [INST]  Who is Robert Boulter?  [/INST]' for
    '<s> [INST] Who is Robert Boulter? [/INST]', and earlier messages, the template's text after
    them and the assistant header likewise. Now the prompt is the template's own tokens."""
    tok = TOKENIZERS[kind]()
    for history in _histories(kind):
        for q in QUESTIONS:
            ctx = _context(tok, history, closed_book=True)
            ids = ctx.encode_prompt(q)
            assert ctx.lm_prompt(None, ids, len(ids), 8) == _reference(tok, history, q), (history, q)


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_the_passage_and_the_question_are_the_user_messages_tokens(kind):
    """With a passage, the user message is passage + "\\n\\n" + question: its tokens are the
    template's for that message (the separator was "\u2581", "\\n", "\\n" and the question and the
    passage began with a space the text does not have)."""
    tok = TOKENIZERS[kind]()
    for history in _histories(kind):
        for q in QUESTIONS:
            ctx = _context(tok, history, closed_book=False)
            ids = ctx.encode_prompt(q)
            want = _reference(tok, history, PASSAGE + PASSAGE_SEPARATOR + q)
            assert ctx.lm_prompt(0, ids, len(ids), 8) == want, (history, q)
            assert tok.decode(ids) == q


def test_the_plain_format_on_sentencepiece_reads_passage_space_question():
    """``plain`` is encode(passage) + encode(prompt): each is a text of its own, and a SentencePiece
    tokenizer begins each with its word-opening space, so the model reads "passage prompt" (a
    byte-level tokenizer's: "passageprompt"). Kept as it is (the paper's [passage ; prefix])."""
    tok = sentencepiece_chat_tokenizer()
    fmt = PromptFormat.for_tokenizer("plain", tok)
    lm = SimpleNamespace(tokenizer=tok, max_context=4096)
    retriever = SimpleNamespace(corpus=[SimpleNamespace(content=PASSAGE)])
    ctx = RalmContext(lm, retriever, PassageTokens(lm, retriever), None, None,
                      GenerationConfig(passage_tokens=256, max_new_tokens=8), fmt)
    ids = ctx.encode_prompt("Who is he?")
    prompt = ctx.lm_prompt(0, ids, len(ids), 8)
    assert prompt == tok.encode(PASSAGE, as_text=True) + tok.encode("Who is he?")
    assert tok.decode(prompt) == PASSAGE + " Who is he?"
