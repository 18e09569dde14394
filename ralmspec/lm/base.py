"""The LanguageModel contract shared by the HF and vLLM backends.

The engine deals only in token-id lists; backends own their KV state per ``session``.

Contract:
- ``generate(prompts, n, sessions, sampling)`` returns, for each prompt, its continuation of at
  most ``n`` new token ids (shorter only when EOS is produced; EOS is included). ``sampling[i]``
  (a ``ralmspec.lm.sampling.Sampling``, or ``None``) says how prompt ``i`` is decoded:
  ``None`` or temperature 0 is greedy (argmax, ties -> lowest id); temperature > 0 draws token
  ``j`` of the continuation with the draw rule of ``ralmspec.lm.sampling`` at absolute position
  ``sampling[i].start + j``: Gumbel-max over the temperature-scaled log-probabilities restricted
  to the top-p nucleus, with noise from a counter-based generator (Philox) keyed by
  ``(seed, position)``. A token is thus a function of (seed, its position, its logits) alone.
  ``greedy(prompts, n, sessions)`` is ``generate`` with no sampling. Sampling settings of the
  model's own generation config are always ignored.
- The continuation is a deterministic function of ``(prompt, n, sampling)`` alone: it must not
  depend on what the session computed before (prefix reuse is an optimisation, never a change of
  output), nor on which other prompts are in the same batch. This is what makes rollback free
  and speculative output equal to the naive loop, greedy or sampled: a position regenerated
  after a rollback from the same prompt replays the same draw.
- A backend that cannot reproduce the draw rule exactly sets ``supports_sampling = False`` and
  refuses temperature > 0 with ``ConfigError`` (HTTP 400) instead of sampling differently.
- ``release(session)`` drops a session's KV state.
- Optional (``supports_logprobs``): ``token_logprobs(prompt, tokens, top_k, session)`` scores
  tokens ALREADY generated from ``prompt``: for each ``tokens[j]``, its log-probability under
  ``log_softmax`` of the logits the backend computes at that position when it generates from
  ``prompt`` (temperature 1, no nucleus cut), and the ``top_k`` most likely ids there. It is a
  deterministic function of ``(prompt, tokens, top_k)``, like ``generate``; it never decodes.
  ``sampling[i].logprobs`` (k) tells ``generate`` that the continuation will be scored so: a
  backend may keep its scores from the logits it decoded with and answer ``token_logprobs``
  from them, which must give the same values (the HF backend does). Such a backend may also
  answer ``decoded_logprobs(prompt, tokens, top_k)``: the same list when the scores it kept hold
  it, else ``None``, at once (it never computes, nor waits for a call in progress), so a stream
  can send a chunk's logprobs with its text.
"""

from __future__ import annotations

import abc
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Protocol, Sequence

from ralmspec.errors import ClosedError, ConfigError

if TYPE_CHECKING:
    from ralmspec.lm.sampling import Sampling


class Tokenizer(Protocol):
    def encode(self, text: str, as_text: bool = False) -> list[int]: ...  # as_text: special-token strings as text

    def decode(self, ids: Sequence[int]) -> str: ...


def sampled(sampling: Sequence[Sampling | None] | None) -> bool:
    """True when some prompt of a call asks for temperature > 0."""
    return sampling is not None and any(s is not None and not s.greedy for s in sampling)


@dataclass(frozen=True)
class TokenLogprob:
    """One scored token: its id and log-probability, and the ``top_k`` most likely ids at its
    position with theirs (log-probability descending, ties -> lower id)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_ids(values: Sequence[int]) -> list[int]:
    """``values`` as a list of ints, or a ``ConfigError``: each must be an integer (an int, a numpy
    or torch integer); a float such as ``1.5`` is refused, never truncated to another token."""
    try:
        return [operator.index(t) for t in values]
    except TypeError as exc:
        raise ConfigError(f"token ids must be integers: {exc}") from None


def context_limit(lm: object) -> str:
    """The LM's context limit as a request's error names it: "the model's context of N tokens", or
    what caps it below the model's own (``LanguageModel.context_cap``: a static runner's slot
    length, with the way out), so a request one runner accepts and another refuses says why."""
    cap = getattr(lm, "context_cap", None)
    return cap if cap else f"the model's context of {getattr(lm, 'max_context', '?')} tokens"


class LanguageModel(abc.ABC):
    tokenizer: Tokenizer
    eos_token_id: int | None
    # the tokens that end an answer besides ``eos_token_id`` (a generation config may list several,
    # Llama 3's end of text and end of turn): a backend stops a chunk right after any of them
    stop_token_ids: frozenset[int] = frozenset()
    max_context: int  # prompt + generated tokens must fit
    # why ``max_context`` is below the model's own context, as an error names the limit (the
    # static runners' slot length, ``HFLanguageModel``); None: it is the model's context
    context_cap: str | None = None
    vocab_size: int  # token ids are in [0, vocab_size)
    name: str
    supports_sampling: bool = False  # implements the draw rule of ralmspec.lm.sampling exactly
    no_sampling_reason: str = "sampling needs the hf backend"  # the refusal's explanation
    supports_logprobs: bool = False  # implements token_logprobs
    closed: bool = False  # set by close() where a backend refuses calls afterwards (``closed_error``)

    def closed_error(self) -> ClosedError:
        """What a backend raises for a call after its ``close()`` (every backend and the kNN-LM
        decoders over one: one message)."""
        return ClosedError(f"the language model {self.name!r} was closed; load it again to run more requests")

    def is_stop(self, token: int) -> bool:
        """Whether ``token`` ends an answer (``eos_token_id`` or one of ``stop_token_ids``): the
        loops end a request on it as the backend ends a chunk on it."""
        return (self.eos_token_id is not None and token == self.eos_token_id) or token in self.stop_token_ids

    @abc.abstractmethod
    def greedy(self, prompts: Sequence[Sequence[int]], n: int,
               sessions: Sequence[Hashable] | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt by up to ``n`` tokens (see module contract)."""

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sessions: Sequence[Hashable] | None = None,
                 sampling: Sequence[Sampling | None] | None = None) -> list[list[int]]:
        """Continuation of each prompt by up to ``n`` tokens, greedy or sampled per prompt (see
        module contract). This default serves greedy prompts only."""
        if sampled(sampling):
            raise ConfigError(f"temperature > 0: the {type(self).__name__} backend supports greedy "
                              f"decoding only (temperature 0); {self.no_sampling_reason}")
        return self.greedy(prompts, n, sessions)

    def token_logprobs(self, prompt: Sequence[int], tokens: Sequence[int], top_k: int,
                       session: Hashable | None = None) -> list[TokenLogprob]:
        """Score ``tokens`` generated after ``prompt`` (module contract); this default refuses."""
        raise self.no_logprobs_error()

    def decoded_logprobs(self, prompt: Sequence[int], tokens: Sequence[int],
                         top_k: int) -> list[TokenLogprob] | None:
        """``token_logprobs`` from scores kept from decoding, or ``None`` (module contract); this
        default keeps none."""
        return None

    def no_logprobs_error(self) -> ConfigError:
        """The refusal of ``logprobs`` by a backend without ``supports_logprobs`` (HTTP 400)."""
        return ConfigError(f"logprobs: the {type(self).__name__} backend cannot score tokens "
                           "(logprobs need the hf backend)")

    def prompt_ids(self, i: int, prompt: Sequence[int], extra: int) -> list[int]:
        """Prompt ``i`` of a call as a list of token ids, or a ``ConfigError`` naming it: a string,
        not token ids, empty, an id outside ``[0, vocab_size)``, or more than ``max_context`` with
        the ``extra`` tokens the call adds. The one check every backend's prompts pass."""
        if isinstance(prompt, (str, bytes)):
            raise ConfigError(f"prompt {i} is a string; pass token ids")
        try:
            ids = token_ids(prompt)
        except ConfigError as exc:
            raise ConfigError(f"prompt {i} is not a sequence of token ids: {exc}") from None
        if not ids:
            raise ConfigError(f"prompt {i} is empty; a prompt needs at least one token")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab_size:
            raise ConfigError(f"prompt {i} has token id {lo if lo < 0 else hi} outside [0, {self.vocab_size})")
        if len(ids) + extra > self.max_context:
            raise ConfigError(f"prompt {i} has {len(ids)} tokens + {extra} new tokens > max_context "
                              f"{self.max_context} of model {self.name!r}; truncate the context")
        return ids

    def release(self, session: Hashable) -> None:  # noqa: B027 - optional hook
        """Forget the KV state of ``session``."""

    def clear_prefix_cache(self) -> None:  # noqa: B027 - optional hook
        """Forget KV shared across requests (a benchmark's cold start); outputs never change."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend (engine processes, GPU memory)."""
