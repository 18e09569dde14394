"""Prompt formats: how the LM input is laid out around the passage, the prompt and the answer.

Both loops (naive and speculative) build every LM input with :meth:`PromptFormat.build`, so the
format is part of the reference semantics (docs/design.md §1): same format => same tokens.

``plain`` (the paper's continuation; kNN-LM and language-modelling studies)::

    passage_ids + prompt_ids + generated_ids          # the context is cut from the left if long

``chat`` (instruct models; the default for a model whose tokenizer has a chat template)::

    before + passage_ids + between + prompt_ids + after + generated_ids

where ``before`` / ``after`` are the model's chat template around the LAST user message (the
earlier turns of a conversation, or the template's default system turn, and the user header /
end of the user turn and the assistant header), ``between`` is ``"\\n\\n"``, and each piece is
tokenized on its own. With a tokenizer that writes a space before a text (SentencePiece: Llama
2, Mistral, Gemma; ``HFTokenizer.prepends_space``) every piece after the first is tokenized as
text after other text (``encode_after``), and the spaces that end the template's text before
the message are tokenized with the passage's (closed book: the question's) first word, as in the
whole text: the pieces make ``apply_chat_template(tokenize=True)``'s tokens (docs/prompt-formats.md).
So the last user message holds the passage, a blank line and the question; the assistant's
tokens generated so far follow the template. Text from outside (every message's text, the
question, the passage) is tokenized as text: a ``<|im_end|>`` typed in a message or found in a
passage is those eight characters, not the end of a turn (``encode(as_text=True)``); only the
template's own text makes special tokens. (``plain`` keeps a raw prompt's special tokens: a
completions client may lay out a template itself; a passage is text in both formats.) A single
question (the CLI, ``/v1/completions``) is a conversation of one user message; ``/v1/chat/completions`` passes its
earlier turns as ``Conversation.history`` (``PromptFormat.chat``): one layout for all three.

In both formats the retrieval query is the last ``query_len`` tokens of ``prompt_ids +
generated_ids`` (template tokens are never part of a query), the passage is swapped in place
at every retrieval (it replaces the previous one), and generation stops at the model's EOS
(``<|im_end|>``, the end of the assistant's turn, for chat models) or after
``max_new_tokens``. ``passage_ids`` is ``title + "\\n" + text`` cut to ``passage_tokens``;
``None`` instead of a passage (closed-book answers, ``--no-retrieval``) leaves the passage and
``between`` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ralmspec.config import PROMPT_FORMATS
from ralmspec.errors import ConfigError

PASSAGE_SEPARATOR = "\n\n"  # chat: between the passage and the question inside the user message
CHAT_ROLES = ("system", "user", "assistant")  # roles of Conversation.history


@dataclass(frozen=True)
class Conversation:
    """A chat request: the earlier turns and the last user message, which is the RaLM prompt.

    ``question`` is what the loops treat as the prompt (queried with the answer so far, the
    passage put before it inside its user turn); ``history`` is every message before it as
    ``(role, text)``, role in ``CHAT_ROLES``, rendered by the model's chat template around it.
    """

    history: tuple[tuple[str, str], ...]
    question: str

    def __post_init__(self) -> None:
        # any sequence of pairs (lists from Python code too) is kept as tuples: a history is a key
        if isinstance(self.history, (str, bytes)) or not isinstance(self.history, Sequence):
            raise ConfigError(f"history must be a sequence of (role, text) pairs, got {type(self.history).__name__}")
        turns = []
        for i, turn in enumerate(self.history):
            role, text = turn if isinstance(turn, Sequence) and not isinstance(turn, str) and len(turn) == 2 \
                else (None, None)
            if role not in CHAT_ROLES or not isinstance(text, str):
                raise ConfigError(f"history[{i}] must be (role, text) with role in {', '.join(CHAT_ROLES)}, "
                                  f"got {turn!r}"[:300])
            turns.append((role, text))
        object.__setattr__(self, "history", tuple(turns))
        if not isinstance(self.question, str):
            raise ConfigError(f"question must be a string, got {type(self.question).__name__}")


class NoChatTemplateError(ConfigError):
    """The chat format was asked of a model whose tokenizer has no chat template."""


@dataclass(frozen=True)
class PromptFormat:
    """A resolved prompt format ("chat" or "plain") with its template tokens (chat only)."""

    name: str
    before: tuple[int, ...] = ()  # chat template tokens before the user message
    between: tuple[int, ...] = ()  # separator tokens between the passage and the prompt
    after: tuple[int, ...] = ()  # end of the user message + the assistant's header
    # chat with a tokenizer that writes a space before a text (SentencePiece: prepends_space): the
    # pieces after the first are tokenized as continuations (encode_after), and ``lead``, the
    # spaces that end the template's text before the user message, with the message's first word
    follows: bool = False
    lead: str = ""

    @classmethod
    def for_tokenizer(cls, fmt: str, tokenizer: Any) -> "PromptFormat":
        """Resolve ``fmt`` ("auto" = chat when the tokenizer has a chat template, else plain)."""
        if fmt not in PROMPT_FORMATS:
            raise ConfigError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
        affixes = tokenizer.chat_affixes() if hasattr(tokenizer, "chat_affixes") else None
        if fmt == "plain" or (fmt == "auto" and affixes is None):
            return cls("plain")
        return cls.chat(tokenizer, (), affixes)

    @classmethod
    def chat(cls, tokenizer: Any, history: Sequence[tuple[str, str]] = (),
             affixes: tuple[Sequence[tuple[str, bool]], str] | None = None) -> "PromptFormat":
        """The chat format with ``history`` (a ``Conversation``'s earlier turns) rendered by the
        model's template before the last user message (``affixes``: already rendered, as
        ``HFTokenizer.chat_affixes`` renders them). The earlier messages' text is tokenized as
        text (``encode(as_text=True)``), as the question is (``RalmContext.encode_prompt``)."""
        if affixes is None and hasattr(tokenizer, "chat_affixes"):
            affixes = tokenizer.chat_affixes(history)
        if affixes is None:
            raise NoChatTemplateError("the chat prompt format needs a model whose tokenizer has a chat template; "
                                      "this one has none (use --prompt-format plain, or /v1/completions)")
        pieces, after = affixes
        if not getattr(tokenizer, "prepends_space", False):  # byte-level BPE, WordPiece: pieces as they are
            before = [i for text, is_message in pieces if text for i in tokenizer.encode(text, as_text=is_message)]
            return cls("chat", tuple(before), tuple(tokenizer.encode(PASSAGE_SEPARATOR)),
                       tuple(tokenizer.encode(after)))
        # SentencePiece: a piece's trailing spaces go to the next piece (the tokenizer writes a
        # space with the word after it: " [INST] " + "Who" is "▁[INST]", "▁Who"), and
        # only the prompt's first text gets the tokenizer's leading space
        before, lead = [], ""
        for text, is_message in pieces:
            text = lead + text
            kept = text.rstrip(" ")
            lead = text[len(kept):]
            if kept:
                encode = tokenizer.encode_after if before else tokenizer.encode
                before += encode(kept, as_text=is_message)
        if not before and lead:  # a template of spaces only before the message
            before, lead = tokenizer.encode(lead), ""
        return cls("chat", tuple(before), tuple(tokenizer.encode_after(PASSAGE_SEPARATOR)),
                   tuple(tokenizer.encode_after(after)), follows=True, lead=lead)

    def encode_question(self, tokenizer: Any, text: str, after_passage: bool = True) -> list[int]:
        """The question's (the last user message's) token ids in this format: in ``plain`` as
        ``encode`` tokenizes a raw prompt (special tokens kept); in ``chat`` as text
        (``encode(as_text=True)``), and with a SentencePiece tokenizer as a continuation: after
        the separator, or (``after_passage=False``, closed book) after the template with ``lead``."""
        if self.name == "plain":
            return tokenizer.encode(text)
        if not self.follows:
            return tokenizer.encode(text, as_text=True)
        return tokenizer.encode_after(text if after_passage else self.lead + text, as_text=True)

    @property
    def passage_lead(self) -> str | None:
        """How a passage is tokenized in this format (``PassageTokens.get``): ``None``, by
        ``encode`` (it opens the input: ``plain``; any tokenizer but a SentencePiece one), or as a
        continuation after the template's text, with the spaces that end it."""
        return self.lead if self.follows else None

    def overhead(self) -> int:
        """Template tokens around the passage, prompt and generated tokens (0 for plain)."""
        return len(self.before) + len(self.between) + len(self.after)

    def template_tokens(self) -> int:
        """Template tokens around the prompt without a passage: what a request's prompt costs
        beside its own tokens (chat template, system message, earlier turns; 0 for plain)."""
        return len(self.before) + len(self.after)

    def build(self, passage: Sequence[int] | None, tokens: Sequence[int], n_prompt: int,
              max_len: int) -> list[int]:
        """The LM input for ``tokens`` (= prompt ids + generated ids, the prompt being the first
        ``n_prompt``), with ``passage`` (``None``: no passage), at most ``max_len`` tokens.

        Too long: plain cuts the passage to leave at least one context token, then the context
        from the left; chat cuts the passage (the question and answer always fit: the request
        was checked on arrival, see ``RalmContext.encode_prompt``).
        """
        doc = list(passage) if passage is not None else []
        if self.name == "plain":
            room = max_len - len(doc)
            if room < 1:
                doc = doc[: max(0, max_len - 1)]
                room = max_len - len(doc)
            return doc + list(tokens[-room:])
        between = list(self.between) if passage is not None else []
        fixed = len(self.before) + len(between) + len(self.after) + len(tokens)
        if fixed + len(doc) > max_len:
            doc = doc[: max(0, max_len - fixed)]
        if fixed > max_len:
            raise ConfigError(f"the prompt and answer ({len(tokens)} tokens) do not fit the model's "
                              f"context with the chat template ({max_len} tokens)")
        return [*self.before, *doc, *between, *tokens[:n_prompt], *self.after, *tokens[n_prompt:]]
