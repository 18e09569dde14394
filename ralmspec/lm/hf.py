"""HuggingFace ``transformers`` backend of the LanguageModel contract (CPU or CUDA).

Determinism by *canonical block prefill*
----------------------------------------
The engine needs ``greedy(prompt, n)`` to be a deterministic function of ``(prompt, n)``: the
output must not depend on which KV state a session held before (otherwise a rollback or a
passage switch could change the tokens, and speculative output would drift from the naive
loop). Plain "crop the KV cache to the longest common prefix and extend" is *not* enough: the
key/value of one position computed inside a 300-row prefill and inside a 1-row decode step
differ in their float bits, and such a difference can flip a greedy argmax near-tie.

So the KV of prompt positions is only ever computed in aligned blocks of ``B = block_size``
positions (the idea behind vLLM's block prefix caching):

- for a prompt of length ``L``, every full block ``[jB, (j+1)B)`` is computed by ONE forward
  over exactly those ``B`` positions given the KV of all earlier blocks; the final partial
  block ``[floor(L/B)*B, L)`` (if non-empty) by one forward over its ``L mod B`` rows;
- the logits of the last prompt position (always computed from a forward over the last
  block, with the LM head applied to that one row) give the first new token;
- tokens ``2..n`` come from 1-row decode forwards;
- a session keeps ONLY the KV of the prompt's full blocks (the cache is cropped to
  ``floor(L/B)*B`` after each call) together with the token ids they cover. The next call
  reuses the longest common prefix rounded DOWN to a multiple of ``B`` (and never the block
  holding the last prompt position, whose logits are needed) and recomputes the rest in
  canonical blocks.

Every position's KV is therefore produced by the same sequence of floating-point operations
whatever the history, and reuse equals no reuse bit for bit, provided the kernels are
deterministic for a fixed shape (true on CPU with a fixed ``torch.get_num_threads()``; on CUDA
cuBLAS / SDPA forward kernels are run-to-run deterministic for a fixed shape on one GPU). A
session's KV is not reused if the torch thread count changed since it was computed. Global
numeric switches (``torch.set_float32_matmul_precision``, TF32 flags) must not change while a
backend is serving.

Trade-offs (deliberate)
-----------------------
- Prompts are prefilled one by one, each into its own session cache. Their decode steps run
  one by one too, except on the ``batched`` runner: there every decode step, a lone prompt's
  included, is one forward of exactly ``BATCH_ROWS`` rows (attention per row over its own
  slot), so a row's GEMMs always run in the same shape. A forward whose row count followed the
  batch would change a row's bits with its neighbours (measured: docs/lm-runner.md) and break
  batch invariance (docs/design.md §2 invariant 3).
- A fresh prompt costs ``ceil(L/B)`` forwards instead of one, and small-row GEMMs are
  inefficient on CPU: for a 300-token prompt on the GPT-2-small shape (1 thread, CPU time)
  one plain forward takes ~1.0-1.3 s, canonical blocks ~1.8 s with B = 64 and ~3.5-3.9 s with
  B = 16. A session whose prompt grew by ``stride`` tokens recomputes between ``stride`` and
  ``B - 1 + stride`` rows in one forward (~0.45 s with B = 16, ~0.59 s with B = 64 for the
  whole +4-token call with n = 4). Hence ``DEFAULT_BLOCK_SIZE`` = 64: passage switches and
  rollbacks (full recomputes) are frequent in the RaLM loop; B = 16 only wins when fewer than
  ~8 % of the steps change the passage. Re-measured with SmolLM2 in bfloat16 on the project's
  2-core VM (2026-12-06, ``experiments/block_size.py``): B = 32 computes ~24 % fewer prompt
  positions than 64 at ~30 % more per position, the same prefill time; B = 16 ~40 % more.

Thread safety: one lock serialises all use of the model and of the session table. Sessions are
kept in an LRU table bounded by a number of sessions and a number of cached KV bytes.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Iterator, Sequence

import torch

from ralmspec.config import LM_RUNNERS, check_text, is_int
from ralmspec.errors import ConfigError
from ralmspec.lm.base import LanguageModel, TokenLogprob, token_ids
from ralmspec.lm.prefix_cache import PrefixBlocks
from ralmspec.lm.runner import EagerRunner, KVRunner
from ralmspec.lm.sampling import Sampling, SeededPick
from ralmspec.lm.slot_decoder import rope_types, supports_static
from ralmspec.lm.static import StaticRunner

DEFAULT_BLOCK_SIZE = 64  # canonical prefill block (see the trade-offs above)
DEFAULT_PREFIX_CACHE_BYTES = 512 << 20  # shared prefix blocks (lm/prefix_cache.py); 0: off
# static runner: KV slots (each allocated on first use; the batched runner's all at its first session)
# A slot holds 2 x layers x kv_heads x length x head_dim values: SmolLM2 in float32 on the CPU,
# 2048 positions = 90 MiB; in bfloat16 on CUDA, 4096 positions = 90 MiB.
STATIC_SLOTS = {"cuda": 64, "cpu": 16}
STATIC_SLOT_LENGTH = {"cuda": 4096, "cpu": 2048}
# the "batched" runner's fixed decode shape: rows per forward (docs/lm-runner.md, batch invariance)
BATCH_ROWS = 8

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the character each byte is written as in the
    vocabulary -> the byte. Printable Latin-1 bytes stand for themselves; the other 68 bytes (control
    characters, space, ...) are written as the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(0x100 + i): b for i, b in enumerate(shifted)}


def _message_pieces(text: str, marks: Sequence[tuple[str, str]]) -> tuple[tuple[str, bool], ...] | None:
    """``text`` cut at each message's ``(open, close)`` marks, in order, into ``(piece, is_message)``
    (the marks dropped); ``None`` unless every mark is found once, in order."""
    pieces: list[tuple[str, bool]] = []
    for o, c in marks:
        if text.count(o) != 1 or text.count(c) != 1:
            return None
        head, rest = text.split(o)
        if c not in rest:  # closed before it opened
            return None
        inside, text = rest.split(c)
        pieces += [(head, False), (inside, True)]
    return (*pieces, (text, False))


def _align_pieces(pieces: Sequence[tuple[str, bool]], rendered: str) -> tuple[tuple[str, bool], ...] | None:
    """``pieces`` (the template's text and each message's text, cut from a render with marked
    messages) fitted onto ``rendered``, the render without marks: a template that trims a message
    (Llama 3's and Gemma's ``| trim``) renders it without its outer whitespace, which the marks
    kept. A message's piece is its text as is, stripped, or stripped at one end, whichever the
    template's next piece follows in ``rendered``; the template's pieces must be there verbatim.
    ``None`` when the pieces do not make up ``rendered`` so."""
    out: list[tuple[str, bool]] = []
    at = 0
    for k, (text, is_message) in enumerate(pieces):
        if not is_message:
            if not rendered.startswith(text, at):
                return None
            out.append((text, False))
            at += len(text)
            continue
        follow = pieces[k + 1][0] if k + 1 < len(pieces) else ""
        for cand in dict.fromkeys((text, text.strip(), text.rstrip(), text.lstrip())):
            if rendered.startswith(cand, at) and rendered.startswith(follow, at + len(cand)):
                out.append((cand, True))
                at += len(cand)
                break
        else:
            return None
    return tuple(out) if at == len(rendered) else None


def _without_prepend(backend: Any) -> Any | None:
    """A copy of the Rust tokenizer ``backend`` that writes no space ("\u2581") before a text:
    SentencePiece's dummy prefix, a ``Prepend("\u2581")`` normalizer (Llama 2's, Mistral's
    ``tokenizer.json``) or a ``Metaspace`` pre-tokenizer's ``prepend_scheme`` (Gemma's, newer
    files'); ``None`` if it writes none (byte-level BPE, WordPiece)."""
    from tokenizers import Tokenizer

    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - a tokenizer that cannot be written out (custom parts): as it is
        return None
    changed = False

    def walk(node: Any) -> Any:
        nonlocal changed
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind == "Sequence":
            for key in ("normalizers", "pretokenizers"):
                if isinstance(node.get(key), list):
                    node[key] = [n for n in map(walk, node[key]) if n is not None]
        elif kind == "Prepend" and node.get("prepend") == METASPACE:
            changed = True
            return None
        elif kind == "Metaspace":
            if node.get("prepend_scheme", "never") != "never":
                node["prepend_scheme"], changed = "never", True
            if node.get("add_prefix_space"):
                node["add_prefix_space"], changed = False, True
        return node

    spec["normalizer"] = walk(spec.get("normalizer"))
    spec["pre_tokenizer"] = walk(spec.get("pre_tokenizer"))
    if not changed:
        return None
    spec["truncation"] = spec["padding"] = None
    return Tokenizer.from_str(json.dumps(spec))


METASPACE = "\u2581"  # SentencePiece's space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token


class HFTokenizer:
    """Adapter of a HuggingFace tokenizer to the ``Tokenizer`` protocol of ``ralmspec.lm.base``.

    ``encode(text)`` returns ids WITHOUT special tokens (no [CLS]/[SEP]/BOS) and never
    truncates; ``decode(ids)`` skips special tokens and does NOT clean up tokenization spaces
    (``clean_up_tokenization_spaces=False`` everywhere, so decoding is the plain join of the
    tokens). A lock guards the underlying Rust tokenizer, which is not safe to share between
    threads while its truncation/padding state is being set.
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self._lock = threading.Lock()
        decoder = getattr(getattr(hf_tokenizer, "backend_tokenizer", None), "decoder", None)
        # a byte-level BPE vocabulary (GPT-2's, SmolLM2's) writes each byte as one character
        self._byte_of = byte_level_alphabet() if type(decoder).__name__ == "ByteLevel" else None
        added = getattr(hf_tokenizer, "added_tokens_decoder", {})
        self._added = frozenset(int(i) for i in added)
        # a SentencePiece-style vocabulary (Llama 2's, Mistral's, Gemma's): "\u2581" writes a space,
        # and with byte fallback the tokens <0x00>..<0xFF> write one byte each
        model = getattr(getattr(hf_tokenizer, "backend_tokenizer", None), "model", None)
        vocab = hf_tokenizer.get_vocab() if model is not None else {}
        self._byte_tokens = ({int(i): int(t[3:5], 16) for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t)}
                             if getattr(model, "byte_fallback", False) else {})
        self._metaspace = any(t.startswith(METASPACE) for t in vocab) and self._byte_of is None
        # the same tokenizer without SentencePiece's dummy prefix (encode_after); None: it has none
        self._after = _without_prepend(hf_tokenizer.backend_tokenizer) if model is not None else None
        self._special = frozenset(str(getattr(t, "content", t)) for t in added.values()
                                  if getattr(t, "special", True)) | frozenset(
            getattr(hf_tokenizer, "all_special_tokens", None) or ())

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, as_text: bool = False) -> list[int]:
        """``as_text``: the strings of special tokens in ``text`` (``<|im_end|>``) are tokenized as
        the plain text they are, not as those tokens: for the text of a chat message or a passage,
        which must not be able to end a turn or open another role's."""
        if not isinstance(text, str):
            raise ConfigError(f"encode() expects a str, got {type(text).__name__}")
        check_text(text, "the text to tokenize")
        with self._lock:
            return list(self.hf.encode(text, add_special_tokens=False, truncation=False, verbose=False,
                                       split_special_tokens=as_text))

    @property
    def prepends_space(self) -> bool:
        """Whether ``encode`` writes a space before the text (SentencePiece's dummy prefix: Llama 2,
        Mistral, Gemma): a text's first word is tokenized as a word after a space ("\u2581Who"),
        so text tokenized after other text must not be ``encode``'s (``encode_after``)."""
        return self._after is not None

    def encode_after(self, text: str, as_text: bool = False) -> list[int]:
        """``text`` tokenized as it is in the middle of a longer text (the pieces of a prompt
        after its first): ``encode``, but without the space a SentencePiece tokenizer writes
        before a text (``encode("\\n\\n")`` is "\u2581", "\\n", "\\n"). The parts after a
        special token in ``text`` (``</s> [INST]``) are tokenized as ``encode`` does, as in a
        whole text: the tokenizer opens each part between special tokens alike. Equal to
        ``encode`` for a tokenizer that writes no such space (byte-level BPE, WordPiece)."""
        if self._after is None:
            return self.encode(text, as_text)
        if not isinstance(text, str):
            raise ConfigError(f"encode_after() expects a str, got {type(text).__name__}")
        check_text(text, "the text to tokenize")
        backend = self.hf.backend_tokenizer
        with self._lock:
            was = backend.encode_special_tokens  # the HF tokenizer's own setting: given back below
            try:
                backend.encode_special_tokens = as_text
                whole = backend.encode(text, add_special_tokens=False)
            finally:
                backend.encode_special_tokens = was
            # the first added token matched in the text: from it on, the text's own tokens
            cut = next((j for j, (i, tok, (a, b)) in enumerate(zip(whole.ids, whole.tokens, whole.offsets))
                        if i in self._added and tok and tok in text[a:b]), len(whole.ids))
            head = text[: whole.offsets[cut][0]] if cut < len(whole.ids) else text
            self._after.encode_special_tokens = as_text  # a private copy (``_without_prepend``)
            return [*self._after.encode(head, add_special_tokens=False).ids, *whole.ids[cut:]]

    def decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return self.hf.decode([int(i) for i in ids], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)

    def chat_affixes(self, history: Sequence[tuple[str, str]] = ()) -> tuple[tuple[tuple[str, bool], ...], str] | None:
        """``(before, after)``: the model's chat template around the LAST user message, the
        ``(role, text)`` turns of ``history`` before it, with the assistant's generation prompt
        after it (``None`` if the tokenizer has no template; ``ConfigError`` if the template
        rejects the turns, e.g. roles that do not alternate). ``before`` is in pieces
        ``(text, is_message)``: the template's own text, and the text of each earlier message
        (``is_message``), which the engine tokenizes as text (``encode(as_text=True)``).

        The joined pieces, the user message and ``after`` are what ``apply_chat_template``
        renders for those messages, so the engine can tokenize the pieces apart and swap the
        passage inside the message. A template that trims a message as it renders it (Llama 3's,
        Gemma's ``| trim``) gives that message's piece trimmed. A template that changes the text
        otherwise leaves every message inside one piece of template text, which is tokenized
        with special tokens; so a ``ConfigError`` then if a message holds a special token's text
        (``<|eot_id|>``): it would be that token, open another turn or role.
        """
        if not getattr(self.hf, "chat_template", None):
            return None
        user = "\x00RALMSPEC-USER-MESSAGE\x00"
        marks = [(f"\x00RALMSPEC-{i}<\x00", f"\x00RALMSPEC-{i}>\x00") for i in range(len(history))]
        plain = self._render([*history, ("user", user)])
        if plain.count(user) != 1:
            raise ConfigError("the model's chat template does not place the user message once; "
                              "use prompt_format='plain' (--prompt-format plain)")
        before, after = plain.split(user)
        if history:
            marked = self._render([*((role, f"{o}{text}{c}") for (role, text), (o, c) in zip(history, marks)),
                                   ("user", user)])
            pieces = _message_pieces(marked.split(user)[0], marks)
            aligned = _align_pieces(pieces, before) if pieces is not None else None
            if aligned is not None:
                return aligned, after
            # the messages cannot be told from the template's text: one piece of template text,
            # refused if a message holds a special token's text (it would be that token)
            found = sorted({t for t in self._special if t and any(t in text for _, text in history)})
            if found:
                raise ConfigError(f"a message holds the text of the special token {found[0]!r}, and this "
                                  "model's chat template changes the messages so that their text cannot be "
                                  "kept apart from its own: remove it from the message")
        return ((before, False),), after

    def _render(self, turns: Sequence[tuple[str, str]]) -> str:
        messages = [{"role": role, "content": text} for role, text in turns]
        try:
            with self._lock:
                text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template's own refusal (jinja2 raise_exception)
            raise ConfigError(f"the model's chat template rejects these messages: {exc}") from None
        if not isinstance(text, str):
            raise ConfigError("the model's chat template does not render text; "
                              "use prompt_format='plain' (--prompt-format plain)")
        return text

    def is_byte_token(self, token_id: int) -> bool:
        """Whether ``token_id`` is a byte-fallback token (``<0xE6>``). The decoder turns a run of
        them into text as a whole (U+FFFD for every byte of a run that is not valid UTF-8), so a
        run's text is final only once another token follows it (``ralmspec.engine.stop``)."""
        return int(token_id) in self._byte_tokens

    def piece(self, token_id: int) -> str:
        """The text of one token, special tokens shown (``<|im_end|>``): logprobs' token names.
        A SentencePiece token keeps its space ("\u2581the" is " the"; decoding it alone drops it)."""
        token_id = int(token_id)
        if self._metaspace and token_id not in self._added and token_id not in self._byte_tokens:
            with self._lock:
                token = self.hf.convert_ids_to_tokens(token_id)
            if isinstance(token, str):
                return token.replace(METASPACE, " ")
        with self._lock:
            return self.hf.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (chat logprobs' ``bytes``): in a byte-level vocabulary the
        token's own bytes, a part of a multi-byte character included (``piece`` shows U+FFFD
        there), and a byte-fallback token's byte, so a client joining the bytes of consecutive
        tokens gets the text back; else (WordPiece, added and special tokens) ``piece`` in UTF-8."""
        if int(token_id) in self._byte_tokens:
            return bytes([self._byte_tokens[int(token_id)]])
        if self._byte_of is not None and int(token_id) not in self._added:
            with self._lock:
                token = self.hf.convert_ids_to_tokens(int(token_id))
            if isinstance(token, str) and token and all(c in self._byte_of for c in token):
                return bytes(self._byte_of[c] for c in token)
        return self.piece(token_id).encode("utf-8")


def load_folder_tokenizer(path: Any) -> HFTokenizer:
    """The tokenizer saved in the HF model folder ``path``, wrapped (``ModelLoadError`` if none)."""
    from transformers import AutoTokenizer

    from ralmspec.errors import ModelLoadError

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is a load failure
        raise ModelLoadError(f"cannot load the tokenizer of {str(path)!r} (the folder must contain "
                             f"tokenizer files next to the model): {exc}") from exc
    return HFTokenizer(tok)


@dataclass
class CallStats:
    """Work done by one ``greedy`` / ``next_token_states`` call (all prompts of the batch)."""

    prompts: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt positions whose KV came from the session cache
    shared_tokens: int = 0  # prompt positions whose KV came from the shared prefix blocks
    prefill_tokens_computed: int = 0  # prompt positions computed by block forwards
    prefill_forwards: int = 0
    decode_steps: int = 0  # 1-row decode forwards
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    wall_s: float = 0.0


@dataclass(frozen=True)
class NextTokenState:
    """Canonical state at the last position of a prompt (float32, on CPU)."""

    logits: torch.Tensor  # [vocab]
    hidden: torch.Tensor | None  # [d_model]: the model's last hidden state (input of the LM head)


@dataclass
class _Session:
    ids: list[int]  # token ids whose KV is held; len(ids) == cached length, a multiple of B
    kv: Any  # the runner's handle (a DynamicCache, a static slot) or None when empty
    nbytes: int = 0
    threads: int = 0  # torch.get_num_threads() when computed (CPU GEMM bits may depend on it)


class HFLanguageModel(LanguageModel):
    """Greedy decoding with a transformers causal LM, canonical block prefill (module doc).

    Invariants:
    - ``greedy(prompts, n, sessions)[i]`` depends only on ``(prompts[i], n)`` (and the weights,
      device, dtype, block size), never on session history or batch neighbours.
    - ``len(prompt) + n <= max_context`` or ``ConfigError``; ``n >= 0``; prompts non-empty,
      token ids in ``[0, vocab_size)``.
    - Decoding is argmax (ties -> lowest token id), or with ``generate(..., sampling)`` the exact
      draw rule of ``ralmspec.lm.sampling`` (a token depends on (seed, position, logits) only);
      the model's generation config is ignored.
      It stops right after a stop token (``eos_token_id`` and any extra ``stop_token_ids``),
      which is included in the output.

    Counters (cumulative, under the lock): ``prefill_tokens_computed``, ``reused_tokens``,
    ``decode_steps``, ``prefill_forwards``; ``last_call_stats`` is the ``CallStats`` of the most
    recently finished call.
    """

    supports_sampling = True
    supports_logprobs = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, eos_token_id: int | None,
                 max_context: int, device: str | torch.device = "cpu",
                 block_size: int = DEFAULT_BLOCK_SIZE,
                 max_sessions: int = 256, max_cache_bytes: int | None = 2 << 30,
                 stop_token_ids: Iterable[int] = (), name: str = "hf", runner: str = "eager",
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, concurrent: bool = False) -> None:
        if not is_int(block_size, 1):
            raise ConfigError(f"block_size must be an integer >= 1, got {block_size!r}")
        if not isinstance(max_context, int) or max_context < 2:
            raise ConfigError(f"max_context must be an integer >= 2, got {max_context!r}")
        if max_sessions < 0:
            raise ConfigError(f"max_sessions must be >= 0, got {max_sessions!r}")
        dynamic = sorted(t for t in rope_types(model) if "dynamic" in t)
        if dynamic:
            # HF rescales the rotary frequencies in place whenever a forward is longer than any
            # before it (and back below original_max_position_embeddings): a token would depend
            # on the lengths of earlier requests, so no answer could be reproduced
            raise ConfigError(f"rope_type {dynamic[0]!r} (dynamic NTK scaling) is not supported: transformers "
                              "rescales the rotary frequencies by the longest forward so far, so an answer would "
                              "depend on earlier requests; use a model (or a config.json rope_scaling) with a "
                              "fixed rotary table, such as 'linear', 'yarn' or 'llama3'")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token_id = None if eos_token_id is None else int(eos_token_id)
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids) | (
            frozenset() if eos_token_id is None else frozenset([int(eos_token_id)]))
        self.max_context = max_context
        self.device = torch.device(device)
        self.block_size = block_size
        self.max_sessions = max_sessions
        self.max_cache_bytes = max_cache_bytes
        self.name = name
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.dtype = next(model.parameters()).dtype
        self.runner = make_runner(model, runner, max_len=max_context, device=self.device, block_size=block_size,
                                  concurrent=concurrent)
        self.model_context = max_context  # the context asked for (the model's, or load_lm's max_context)
        self.max_context = min(max_context, getattr(self.runner, "max_len", max_context))
        self.context_cap = None if self.max_context == max_context else (
            f"the {self.runner.name} LM runner's slot length of {self.max_context} tokens (the model's own context "
            f"is {max_context}; the eager LM runner holds it)")
        self._lock = threading.Lock()
        self._sessions: OrderedDict[Hashable, _Session] = OrderedDict()
        self._cached_bytes = 0
        self.prefix_blocks = PrefixBlocks(prefix_cache_bytes)  # shared by all sessions (lm/prefix_cache.py)
        self.prefill_tokens_computed = 0
        self.reused_tokens = 0
        self.shared_tokens = 0
        self.decode_steps = 0
        self.prefill_forwards = 0
        self.last_call_stats = CallStats()
        # chunks decoded for a request that asks for logprobs (``Sampling.logprobs``), scored from
        # their decoding's own logits: prompt -> (tokens, top k, scores), least recently used first;
        # ``token_logprobs`` answers from here instead of replaying (module doc of engine/logprobs.py)
        self._scored: OrderedDict[tuple[int, ...], tuple[tuple[int, ...], int, list[TokenLogprob]]] = OrderedDict()
        self._scored_lock = threading.Lock()  # the memo's own: a lookup never waits for the LM
        self.max_scored_chunks = 1024
        self.scored_from_decode = 0  # tokens token_logprobs answered from decoding's scores
        self.scored_by_replay = 0  # tokens it replayed
        self.closed = False  # after close(): every call that would run the model is a ClosedError

    def view(self, **overrides: Any) -> HFLanguageModel:
        """A fresh backend around the same weights: its own runner (sessions, KV slots, captured
        graphs), caches and counters; the same tokenizer, stop tokens, context (capped by the view's
        runner: ``model_context``), device, block size and runner kind unless ``overrides``
        (constructor keywords) say otherwise. For concurrent
        users of one model (the kNN-LM server's decoding threads): a runner serves one thread at a
        time, the weights any number (inference reads them only)."""
        kw: dict[str, Any] = dict(eos_token_id=self.eos_token_id, max_context=self.model_context, device=self.device,
                                  block_size=self.block_size, max_sessions=self.max_sessions,
                                  max_cache_bytes=self.max_cache_bytes, stop_token_ids=self.stop_token_ids,
                                  name=self.name, runner=self.runner.name,
                                  prefix_cache_bytes=self.prefix_blocks.capacity_bytes)
        kw.update(overrides)
        return HFLanguageModel(self.model, self.tokenizer, **kw)

    # ------------------------------------------------------------------ public API

    def greedy(self, prompts: Sequence[Sequence[int]], n: int,
               sessions: Sequence[Hashable] | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt by up to ``n`` tokens (EOS included, then stop)."""
        return self.generate(prompts, n, sessions)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sessions: Sequence[Hashable] | None = None,
                 sampling: Sequence[Sampling | None] | None = None) -> list[list[int]]:
        """Continuation of each prompt by up to ``n`` tokens (EOS included, then stop), greedy or
        drawn with the rule of ``ralmspec.lm.sampling`` per ``sampling[i]``.

        Prompts are prefilled one by one; their decode steps run one by one too, or, on a runner
        with ``batch_rows`` > 1, up to ``batch_rows`` prompts per forward in the runner's
        batch-invariant mode (module doc). ``sessions[i]`` names the KV state to reuse/update for
        ``prompts[i]`` (``None``: no reuse, nothing kept).
        """
        if not is_int(n, 0):
            raise ConfigError(f"n must be an integer >= 0, got {n!r}")
        checked = self._check(prompts, sessions, extra=n)
        modes = [None] * len(checked) if sampling is None else _modes(sampling)
        if len(modes) != len(checked):
            raise ConfigError(f"got {len(checked)} prompts but {len(modes)} sampling settings")
        with self._open():
            stats = CallStats(prompts=len(checked))
            t0 = time.perf_counter()
            if n == 0:
                out: list[list[int]] = [[] for _ in checked]
            else:
                out = []
                rows = max(1, self.runner.batch_rows)  # at most this many slots held by one group
                for g in range(0, len(checked), rows):
                    out += self._generate_rows(checked[g:g + rows], n, stats, modes[g:g + rows])
            stats.wall_s = time.perf_counter() - t0
            self._account(stats)
        return out

    def next_token_states(self, prompts: Sequence[Sequence[int]],
                          sessions: Sequence[Hashable] | None = None,
                          hidden: bool = True) -> list[NextTokenState]:
        """Logits (and last hidden state) at the last position of each prompt.

        Computed with the same canonical block prefill and session reuse as ``greedy``: the
        result is a deterministic function of the prompt, bit for bit, and
        ``argmax(logits)`` is the first token ``greedy(prompt, n)`` returns. ``hidden`` is the
        model's final hidden state at that position (after the final layer norm for GPT-2),
        the usual kNN-LM key.
        """
        checked = self._check(prompts, sessions, extra=0)
        with self._open():
            stats = CallStats(prompts=len(checked))
            t0 = time.perf_counter()
            out = []
            for prompt, session in checked:
                logits, h, cache = self._prefill(prompt, session, stats, want_hidden=hidden)
                self._store(session, prompt, cache)
                # clone() outside inference mode: ordinary tensors, usable with autograd code
                out.append(NextTokenState(logits=logits.float().cpu().clone(),
                                          hidden=None if h is None else h.float().cpu().clone()))
            stats.wall_s = time.perf_counter() - t0
            self._account(stats)
        return out

    def token_logprobs(self, prompt: Sequence[int], tokens: Sequence[int], top_k: int,
                       session: Hashable | None = None) -> list[TokenLogprob]:
        """Score ``tokens`` generated after ``prompt`` (LM contract). The logits are recomputed as
        ``generate`` computed them: the canonical prefill of ``prompt``, then the runner's
        ``step_logits`` per token, so they are the decoding's own logits bit for bit (the greedy token is
        their argmax) and a function of ``(prompt, tokens)`` alone."""
        toks = _scored_tokens(tokens, top_k)
        (ids, session), = self._check([prompt], [session], extra=len(toks))
        if any(not 0 <= t < self.vocab_size for t in toks):
            raise ConfigError(f"tokens to score must be ids in [0, {self.vocab_size})")
        if not toks:
            return []
        with self._open(), torch.inference_mode():
            kept = self._kept_scores(ids, toks, top_k)
            if kept is not None:
                return kept
            self.scored_by_replay += len(toks)
            stats = CallStats(prompts=1)
            logits, _, kv = self._prefill(ids, session, stats)
            try:
                kv, rest = self.runner.step_logits_each(kv, toks[:-1])
                stats.decode_steps += len(toks) - 1
            except BaseException:
                self.runner.free(kv)
                raise
            self._store(session, ids, kv)
            self._account(stats)
            rows = torch.cat([logits[None], rest.to(logits.dtype)]) if len(toks) > 1 else logits[None]
            return _scored(rows, toks, top_k)

    def decoded_logprobs(self, prompt: Sequence[int], tokens: Sequence[int],
                         top_k: int) -> list[TokenLogprob] | None:
        """``token_logprobs(prompt, tokens, top_k)`` when the scores kept from decoding hold it,
        else ``None``; never computes and never waits for the model (LM contract)."""
        toks = _scored_tokens(tokens, top_k)
        (ids, _), = self._check([prompt], None, extra=len(toks))
        return self._kept_scores(ids, toks, top_k) if toks else []

    def _kept_scores(self, ids: list[int], toks: list[int], top_k: int) -> list[TokenLogprob] | None:
        with self._scored_lock:
            hit = self._scored.get(tuple(ids))
            if hit is None or hit[1] < top_k or list(hit[0][:len(toks)]) != toks:
                return None
            self._scored.move_to_end(tuple(ids))
            self.scored_from_decode += len(toks)
            return [TokenLogprob(lp.token, lp.logprob, lp.top[:top_k]) for lp in hit[2][:len(toks)]]

    def forward_hidden(self, ids: Sequence[int]) -> torch.Tensor:
        """Final hidden states ``[len(ids), d_model]`` (float32, CPU) of ONE plain forward.

        No session, no blocks: for building kNN-LM datastores over corpus text. Not the
        canonical computation of ``next_token_states`` (values may differ in the last bits).
        """
        (prompt, _), = self._check([ids], None, extra=0)
        with self._open(), torch.inference_mode():
            x = torch.tensor([prompt], dtype=torch.long, device=self.device)
            out = self.model(input_ids=x, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            h = out.hidden_states[-1][0].float().cpu()
        return h.clone()  # outside inference mode: an ordinary tensor for the caller

    def forward_scores(self, ids: Sequence[int], last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [last, d_model], logits [last, vocab])`` (float32, CPU) of the last ``last``
        positions of ONE plain forward over ``ids``: the final hidden states (as
        ``forward_hidden``) and the model's OWN logits there, which are not ``lm_head(hidden)`` for
        every family (Granite divides them by ``logits_scaling``, Cohere multiplies them by
        ``logit_scale``, Gemma 2 soft-caps them): what ``knnlm eval`` scores ``p_lm`` with."""
        (prompt, _), = self._check([ids], None, extra=0)
        if not is_int(last, 1) or last > len(prompt):
            raise ConfigError(f"last must be an integer in [1, {len(prompt)}], got {last!r}")
        with self._open(), torch.inference_mode():
            x = torch.tensor([prompt], dtype=torch.long, device=self.device)
            out = self.model(input_ids=x, use_cache=False, output_hidden_states=True, logits_to_keep=last)
            h = out.hidden_states[-1][0, -last:].float().cpu()
            logits = out.logits[0, -last:].float().cpu()
        return h.clone(), logits.clone()

    def release(self, session: Hashable) -> None:
        """Drop the KV state of ``session`` (no-op if unknown)."""
        _check_session(session)
        with self._lock:
            entry = self._sessions.pop(session, None)
            if entry is not None:
                self._cached_bytes -= entry.nbytes
                self.runner.free(entry.kv)

    def close(self) -> None:
        """Drop every session's KV state and the runner's buffers. Idempotent; afterwards
        ``release`` is a no-op and every call that would run the model raises ``ClosedError``
        (the weights stay with the caller's other views: ``view`` is a new, open backend)."""
        with self._lock:
            self.closed = True
            self._sessions.clear()
            self._cached_bytes = 0
            self.prefix_blocks.clear()
            with self._scored_lock:
                self._scored.clear()
            self.runner.close()

    def clear_prefix_cache(self) -> None:
        """Forget the shared prefix blocks and the decoded chunks' scores (a benchmark's cold
        start); outputs never change."""
        with self._lock:
            self.prefix_blocks.clear()
            with self._scored_lock:
                self._scored.clear()

    def memory(self) -> dict[str, int]:
        """What this LM's caches hold now (``/v1/stats`` ``memory``: a long-running server's memory
        accounted for): cached sessions and their KV bytes (the eager runner's own caches; on a
        static or batched runner these are slots of ``runner_kv_bytes``, the KV it allocated, so
        not memory on top of it), the shared prefix blocks against their capacity, and the
        logprob chunks memoized. Each is bounded (class doc).
        Read without the LM's lock (it is held for a whole generate call): plain counters and
        lengths, each current, together a snapshot within one call of the LM."""
        return {"sessions": self.cached_sessions, "session_kv_bytes": self.cached_bytes,
                "runner_kv_bytes": self.runner.kv_bytes(), "prefix_blocks": len(self.prefix_blocks),
                "prefix_bytes": self.prefix_blocks.nbytes, "prefix_capacity_bytes": self.prefix_blocks.capacity_bytes,
                "scored_chunks": len(self._scored)}

    @property
    def cached_sessions(self) -> int:
        return len(self._sessions)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def cached_length(self, session: Hashable) -> int:
        """Number of prompt positions whose KV ``session`` holds (a multiple of block_size)."""
        _check_session(session)
        with self._lock:
            entry = self._sessions.get(session)
            return 0 if entry is None else len(entry.ids)

    def driving_runner(self) -> contextlib.AbstractContextManager[None]:
        """The LM's lock, for a caller that drives ``self.runner`` itself (a kNN-LM decoder's
        forward, crop or slot): the runner serves one call at a time (a static runner's input
        buffers are shared by its slots) and the LM's own calls hold this lock for theirs.
        ``ClosedError`` once ``close()`` ran."""
        return self._open()

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _open(self) -> Iterator[None]:
        """The LM's lock, for a call that runs the model: ``ClosedError`` if ``close()`` ran
        (also while this call waited for the lock: ``_check``'s test came before it)."""
        with self._lock:
            if self.closed:
                raise self.closed_error()
            yield

    def _check(self, prompts: Sequence[Sequence[int]], sessions: Sequence[Hashable] | None,
               extra: int) -> list[tuple[list[int], Hashable | None]]:
        if self.closed:
            raise self.closed_error()
        if isinstance(prompts, (str, bytes)):
            raise ConfigError("prompts must be a list of token-id lists, got a string")
        try:
            prompts = list(prompts)
            sess: list[Hashable | None] = [None] * len(prompts) if sessions is None else list(sessions)
        except TypeError as exc:
            raise ConfigError(f"prompts and sessions must be sequences: {exc}") from None
        if sessions is not None:
            if len(sess) != len(prompts):
                raise ConfigError(f"got {len(prompts)} prompts but {len(sess)} sessions")
        checked = []
        for i, p in enumerate(prompts):
            ids = self.prompt_ids(i, p, extra)
            _check_session(sess[i], i)
            checked.append((ids, sess[i]))
        return checked

    def _account(self, stats: CallStats) -> None:
        self.prefill_tokens_computed += stats.prefill_tokens_computed
        self.reused_tokens += stats.reused_tokens
        self.shared_tokens += stats.shared_tokens
        self.decode_steps += stats.decode_steps
        self.prefill_forwards += stats.prefill_forwards
        self.last_call_stats = stats

    def _evict_oldest(self) -> None:
        _, old = self._sessions.popitem(last=False)
        self._cached_bytes -= old.nbytes
        self.runner.free(old.kv)

    def _open_kv(self) -> Any:
        """A fresh runner handle, evicting least recently used sessions while the runner has no
        room (a static runner has a fixed number of slots)."""
        kv = self.runner.open()
        if self.runner.capacity is None:
            return kv
        while kv is None and self._sessions:
            self._evict_oldest()
            kv = self.runner.open()
        if kv is None:
            raise AssertionError("the LM runner has no free KV slot and no session to evict")
        return kv

    @torch.inference_mode()
    def _prefill(self, prompt: list[int], session: Hashable | None, stats: CallStats,
                 want_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """Canonical block prefill of ``prompt``; returns (last logits, last hidden, KV handle).

        The returned handle covers all ``len(prompt)`` positions. The session's entry (if any)
        is taken out of the table; the caller puts it back with ``_store`` once done.
        """
        (logits,), (hidden,), (kv,) = self._prefill_rows([(prompt, session)], stats, want_hidden)
        return logits, hidden, kv

    def _prefill_rows(self, rows: list[tuple[list[int], Hashable | None]], stats: CallStats,
                      want_hidden: bool = False) -> tuple[list[torch.Tensor], list[Any], list[Any]]:
        """``_prefill`` of every prompt of ``rows`` at once: in waves, each wave ONE
        ``prefill_blocks`` call with the next block of every prompt that still needs one (on a
        runner that ``prefills_together`` they share forwards: a block's bits do not depend on its
        neighbours there). Returns the last logits, last hidden states and KV handles, in order;
        on an error every handle is freed."""
        t0, B = time.perf_counter(), self.block_size
        kvs: list[Any] = []
        starts: list[int] = []
        logits: list[Any] = [None] * len(rows)
        hidden: list[Any] = [None] * len(rows)
        try:
            for prompt, session in rows:
                kv, start = self._prefill_begin(prompt, session, stats)
                kvs.append(kv)
                starts.append(start)
            while True:
                todo = [i for i, (prompt, _) in enumerate(rows) if starts[i] < len(prompt)]
                if not todo:
                    break
                ends = {i: min(starts[i] - starts[i] % B + B, len(rows[i][0])) for i in todo}  # canonical blocks
                outs = self.runner.prefill_blocks([kvs[i] for i in todo], [rows[i][0][starts[i]:ends[i]] for i in todo],
                                                  [ends[i] == len(rows[i][0]) for i in todo], want_hidden)
                for i, (kv, last_logits, last_hidden) in zip(todo, outs):
                    kvs[i] = kv
                    if ends[i] == len(rows[i][0]):
                        logits[i], hidden[i] = last_logits, last_hidden
                    stats.prefill_forwards += 1
                    stats.prefill_tokens_computed += ends[i] - starts[i]
                    if ends[i] % B == 0:
                        self._share(rows[i][0][:ends[i]], kv)
                    starts[i] = ends[i]
        except BaseException:
            for kv in kvs:
                self.runner.free(kv)
            raise
        assert all(x is not None for x in logits)  # reuse <= (L-1)//B*B < L: the last block is computed
        stats.prefill_s += time.perf_counter() - t0
        return logits, hidden, kvs

    def _prefill_begin(self, prompt: list[int], session: Hashable | None, stats: CallStats) -> tuple[Any, int]:
        """The KV handle for ``prompt`` holding what can be reused (the session's blocks, then the
        shared prefix blocks), and the position where computing starts (a block boundary, before
        the block holding the last position). The session's entry is taken out of the table."""
        B, L = self.block_size, len(prompt)
        entry = self._sessions.pop(session, None) if session is not None else None
        if entry is not None:
            self._cached_bytes -= entry.nbytes
        reuse = 0
        if entry is not None and entry.threads == torch.get_num_threads():
            lcp = 0
            for a, b in zip(entry.ids, prompt):
                if a != b:
                    break
                lcp += 1
            # round down to a block; never reuse the block holding the last position
            reuse = min(lcp // B * B, (L - 1) // B * B)
            try:
                kv = self.runner.crop(entry.kv, reuse)
            except BaseException:  # the entry is out of the table: give its handle back
                self.runner.free(entry.kv)
                raise
        else:
            if entry is not None:
                self.runner.free(entry.kv)
            kv = self._open_kv()
        try:
            kv, start = self._import_shared(kv, prompt, reuse)
        except BaseException:
            self.runner.free(kv)
            raise
        stats.shared_tokens += start - reuse
        stats.prompt_tokens += L
        stats.reused_tokens += reuse
        return kv, start

    def _import_shared(self, kv: Any, prompt: list[int], start: int) -> tuple[Any, int]:
        """Extend ``kv`` (holding ``prompt[:start]``, ``start`` a multiple of B) with the shared
        prefix blocks that follow, up to but never including the block that holds the last
        position (its forward gives the logits). Returns the handle and the new start."""
        B, table = self.block_size, self.prefix_blocks
        if not table.enabled:
            return kv, start
        threads = torch.get_num_threads()
        last_block = (len(prompt) - 1) // B * B
        while start < last_block:
            block = table.get(threads, prompt[:start + B])
            if block is None:
                break
            kv = self.runner.import_block(kv, block)
            start += B
        return kv, start

    def _share(self, prefix: list[int], kv: Any) -> None:
        """Offer the block that ``kv`` just computed at the end of ``prefix`` to the shared table."""
        table, threads = self.prefix_blocks, torch.get_num_threads()
        if not table.enabled or (threads, prefix) in table:
            return
        exported = self.runner.export_block(kv, len(prefix) - self.block_size, len(prefix))
        if exported is not None:
            table.put(threads, prefix, *exported)

    def _store(self, session: Hashable | None, prompt: list[int], kv: Any) -> None:
        """Crop ``kv`` to the prompt's full blocks and keep it for ``session`` (LRU insert).

        Called after the last forward that uses ``kv``. Caches with layers that cannot be
        cropped (sliding-window attention) are not kept: such models simply get no reuse.
        """
        keep = len(prompt) // self.block_size * self.block_size
        if session is None or self.max_sessions == 0 or keep == 0 or not self.runner.croppable(kv):
            self.runner.free(kv)
            return
        try:
            kv = self.runner.crop(kv, keep)
        except BaseException:  # not in the table yet: give the handle back
            self.runner.free(kv)
            raise
        stale = self._sessions.pop(session, None)  # the same session twice in one batch: keep the last
        if stale is not None:
            self._cached_bytes -= stale.nbytes
            self.runner.free(stale.kv)
        entry = _Session(ids=prompt[:keep], kv=kv, nbytes=self.runner.nbytes(kv),
                         threads=torch.get_num_threads())
        self._sessions[session] = entry
        self._cached_bytes += entry.nbytes
        while self._sessions and (len(self._sessions) > self.max_sessions or (
                self.max_cache_bytes is not None and self._cached_bytes > self.max_cache_bytes)):
            self._evict_oldest()

    @torch.inference_mode()
    def _generate_rows(self, rows: list[tuple[list[int], Hashable | None]], n: int, stats: CallStats,
                       modes: list[Sampling | None]) -> list[list[int]]:
        """Prefill each prompt of ``rows`` (at most ``runner.batch_rows``) into its own KV handle,
        then decode them together with ONE ``runner.decode_batch`` call."""
        kvs: list[Any] = []
        firsts: list[torch.Tensor] = []
        try:
            if self.runner.prefills_together:
                firsts, _, kvs = self._prefill_rows(rows, stats)
            else:  # one prompt at a time: a later prompt may import the shared blocks of an earlier one
                for prompt, session in rows:
                    logits, _, kv = self._prefill(prompt, session, stats)
                    kvs.append(kv)
                    firsts.append(logits)
            t0 = time.perf_counter()
            keep = [m is not None and m.logprobs is not None and self.max_scored_chunks > 0 for m in modes]
            chunks = self.runner.decode_batch(kvs, firsts, n, [_picker(m) for m in modes], self.stop_token_ids,
                                              keep)
        except BaseException:
            for kv in kvs:
                self.runner.free(kv)
            raise
        stats.decode_s += time.perf_counter() - t0
        for j, ((prompt, session), kv, chunk) in enumerate(zip(rows, kvs, chunks)):
            stats.decode_steps += chunk.steps
            stats.generated_tokens += len(chunk.tokens)
            try:
                self._store(session, prompt, kv)
            except BaseException:  # the rows not stored yet give their handles back
                for rest in kvs[j + 1:]:
                    self.runner.free(rest)
                raise
        # scored after every handle is back in the table: a failing score leaks no KV slot
        for (prompt, _), chunk, mode in zip(rows, chunks, modes):
            if chunk.logits is not None:  # kept for a mode with logprobs (``keep`` above)
                self._remember_scores(prompt, chunk.tokens, mode.logprobs, chunk.logits)
        return [chunk.tokens for chunk in chunks]

    def _remember_scores(self, prompt: list[int], tokens: list[int], top_k: int, logits: torch.Tensor) -> None:
        """Score a decoded chunk from the logits its tokens were chosen from (the values
        ``token_logprobs`` replays: the same bits) and keep them for ``prompt`` (LRU)."""
        key, scores = tuple(prompt), _scored(logits, tokens, top_k)
        with self._scored_lock:
            self._scored.pop(key, None)
            self._scored[key] = (tuple(tokens), top_k, scores)
            while len(self._scored) > self.max_scored_chunks:
                self._scored.popitem(last=False)


def _modes(sampling: Any) -> list[Sampling | None]:
    """A call's sampling settings as a list, each ``None`` or a ``Sampling``, or a ``ConfigError``."""
    try:
        modes = list(sampling)
    except TypeError:
        raise ConfigError(f"sampling must be a list of Sampling or None, got {type(sampling).__name__}") from None
    for i, m in enumerate(modes):
        if m is not None and not isinstance(m, Sampling):
            raise ConfigError(f"sampling {i} must be a Sampling or None, got {type(m).__name__}")
    return modes


def _scored_tokens(tokens: Sequence[int], top_k: int) -> list[int]:
    """The tokens of a logprobs request as ints, after checking them and ``top_k`` (ConfigError)."""
    if not is_int(top_k, 0):
        raise ConfigError(f"top_k must be an integer >= 0, got {top_k!r}")
    if isinstance(tokens, (str, bytes)):
        raise ConfigError("tokens to score must be token ids, got a string")
    return token_ids(tokens)


def _check_session(session: Any, i: int | None = None) -> None:
    """ConfigError unless ``session`` can name a session (is hashable)."""
    try:
        hash(session)
    except TypeError:
        which = "session" if i is None else f"session {i}"
        raise ConfigError(f"{which} ({type(session).__name__}) is not hashable") from None


def _picker(sampling: Sampling | None) -> SeededPick | None:
    """The runner's ``pick`` for ``sampling``: None (greedy on the runner) or the seeded draw
    (evaluated where the logits are: ``ralmspec.lm.sampling``)."""
    if sampling is None or sampling.greedy:
        return None
    return SeededPick(sampling)


def _scored(logits: torch.Tensor, tokens: list[int], top_k: int) -> list[TokenLogprob]:
    """Row ``i``'s ``tokens[i]`` log-probability under ``log_softmax`` (float64) and its ``top_k``
    best (ties -> lower id), computed where the logits are; one read of ``(1 + top_k)`` numbers
    per row back to the host."""
    lp = torch.log_softmax(logits.double(), -1)
    cols = [lp.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None].to(lp.device))]
    if top_k > 0:
        top = torch.sort(lp, dim=-1, descending=True, stable=True)
        cols += [top.values[:, :top_k], top.indices[:, :top_k].double()]  # ids < 2**53: exact as doubles
    rows = torch.cat(cols, 1).tolist()  # the one read
    return [TokenLogprob(t, row[0], tuple(zip((int(i) for i in row[1 + top_k:]), row[1:1 + top_k])))
            for t, row in zip(tokens, rows)]


def make_runner(model: torch.nn.Module, runner: str, *, max_len: int, device: torch.device,
                block_size: int | None = None, concurrent: bool = False) -> KVRunner:
    """The ``KVRunner`` named ``runner`` ("eager", "static", "batched", "compiled" or "auto") for ``model``.

    "auto" picks the static runner on CUDA for the families it implements; on the CPU the eager
    runner for one request at a time (the static one measured no faster there), and for a
    backend that serves ``concurrent`` requests (``ralmspec serve``) the batched runner, whose
    8-row step costs about 1.2-2x one row on the CPU (docs/lm-runner.md, "Measured"); any other
    family keeps the eager runner. "batched" is
    the static runner in its batch-invariant mode: every decode step is one forward of
    ``BATCH_ROWS`` rows, which concurrent sessions share (cross-request batching in serving).
    "compiled" is the static runner with its 1-row step ``torch.compile``d (one graph per
    attention span, compiled on first use; the first span at construction). On CUDA the static
    runners also pad every aligned prompt block to ``block_size`` rows, so that each block is a
    captured graph (``StaticRunner.prefill_rows``); on the CPU a block is as long as it is.
    """
    if runner not in LM_RUNNERS:
        raise ConfigError(f"LM runner must be one of {', '.join(LM_RUNNERS)}, got {runner!r}")
    kind = "cuda" if device.type == "cuda" else "cpu"
    slot_len = min(max_len, STATIC_SLOT_LENGTH[kind])
    if runner == "auto":
        if not supports_static(model, slot_len):
            runner = "eager"
        elif kind == "cuda":
            runner = "static"
        else:
            runner = "batched" if concurrent else "eager"
    if runner == "eager":
        return EagerRunner(model)
    padded = kind == "cuda" and block_size is not None and block_size <= slot_len
    return StaticRunner(model, max_len=slot_len, capacity=STATIC_SLOTS[kind],
                        batch_rows=BATCH_ROWS if runner == "batched" else 1, compile_step=runner == "compiled",
                        prefill_rows=block_size if padded else None)
