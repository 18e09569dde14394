"""The LanguageModel contract shared by the HF and vLLM backends.

The engine deals only in token-id lists; backends own their KV state per ``session``.

Contract:
- ``greedy(prompts, n, sessions)`` returns, for each prompt, its greedy continuation of at most
  ``n`` new token ids (shorter only when EOS is produced; EOS is included). Sampling settings of
  the model's generation config are ignored: decoding is always greedy.
- The continuation is a deterministic function of ``(prompt, n)`` alone: it must not depend on
  what the session computed before (prefix reuse is an optimisation, never a change of output),
  nor on which other prompts are in the same batch. This is what makes rollback free and
  speculative output equal to the naive loop.
- ``release(session)`` drops a session's KV state.
"""

from __future__ import annotations

import abc
from typing import Hashable, Protocol, Sequence


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class LanguageModel(abc.ABC):
    tokenizer: Tokenizer
    eos_token_id: int | None
    max_context: int  # prompt + generated tokens must fit

    @abc.abstractmethod
    def greedy(self, prompts: Sequence[Sequence[int]], n: int,
               sessions: Sequence[Hashable] | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt by up to ``n`` tokens (see module contract)."""

    def release(self, session: Hashable) -> None:  # noqa: B027 - optional hook
        """Forget the KV state of ``session``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend (engine processes, GPU memory)."""
