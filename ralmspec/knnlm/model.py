"""Naive kNN-LM greedy decoding (the oracle the speculative decoder must reproduce token for token).

Semantics (docs/design.md §1, kNN-LM; Khandelwal et al., 2020)
-------------------------------------------------------
At every generated position the query is the LM's final hidden state at the last position (the
input of the LM head, the same representation the datastore keys are made of, see
:mod:`ralmspec.knnlm.datastore`). The datastore's canonical search returns the ``k`` nearest
entries with squared L2 distances ``d_i`` (float64) and values ``v_i``; then

    p_knn(y) = Σ_{i: v_i = y} exp(-d_i / T) / Σ_i exp(-d_i / T)
    p_lm     = softmax(logits)                       (float64)
    p        = λ · p_knn + (1 - λ) · p_lm
    next     = argmax_y p(y)                         (ties -> the lowest token id)

``d`` is the *squared* Euclidean distance (what FAISS's L2 indexes return, and what the kNN-LM
paper uses, with T = 1 by default). The softmax over ``-d/T`` is computed stably by subtracting
the smallest distance. All of this lives in :func:`next_token`, the one function naive decoding,
speculation and verification share.

LM determinism (why speculative == naive bit for bit)
-----------------------------------------------------
Both decoders drive the model through :class:`IncrementalDecoder` (on the LM's runner, the
seam of ``ralmspec.lm.runner``): ONE forward over the whole prompt, then one 1-row forward per
token with the KV cache. A rollback crops the KV cache back
to a prefix and continues with 1-row forwards. So the hidden state / logits at position ``p``
are always produced by the same float operations with the same shapes (a 1-row forward at past
length ``p``, or the prompt prefill) whatever the history — hence the same bits in both
decoders, and the queries and ``p_lm`` entering :func:`next_token` are identical. (Recomputing
a position inside a larger prefill would NOT be bit-identical: a 300-row and a 1-row forward
round differently.) This relies on deterministic CPU kernels for a fixed shape and fixed
``torch.get_num_threads()``, which holds for a process. Only models whose logits are
``lm_head(final hidden state)`` are supported (GPT-2 and most decoder-only LMs).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np

from ralmspec.config import check_text, check_type, is_int
from ralmspec.errors import ClosedError, ConfigError
from ralmspec.knnlm.datastore import Datastore, hidden_size
from ralmspec.lm.base import context_limit


@dataclass(frozen=True)
class KNNLMConfig:
    """kNN-LM decoding parameters. Same values (and model, datastore) => same tokens."""

    k: int = 16  # neighbours per query
    lam: float = 0.25  # λ: weight of p_knn (kNN-LM paper: 0.25 on WikiText-103)
    temperature: float = 1.0  # T in exp(-d/T), d = squared L2 distance
    max_new_tokens: int = 32
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if not is_int(self.k, 1, 4096):
            raise ConfigError(f"k must be an integer in [1, 4096], got {self.k!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"lam (λ) must be in [0, 1], got {self.lam!r}")
        if not self.temperature > 0.0 or not np.isfinite(self.temperature):
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 4096:
            raise ConfigError(f"max_new_tokens must be an integer in [1, 4096], got {self.max_new_tokens!r}")


# ------------------------------------------------------------------ the distribution


def knn_distribution(dists: np.ndarray, values: np.ndarray, vocab_size: int, temperature: float) -> np.ndarray:
    """``p_knn`` over the vocabulary (float64): softmax of ``-d/T`` summed per value.

    ``dists`` (squared L2) and ``values`` are in the canonical neighbour order, so the float
    summation order is a function of the neighbour list alone.
    """
    d = np.asarray(dists, dtype=np.float64)
    v = np.asarray(values, dtype=np.int64)
    if d.shape != v.shape or d.ndim != 1 or d.size == 0:
        raise ConfigError(f"need one value per distance, got {d.shape} and {v.shape}")
    if v.min() < 0 or v.max() >= vocab_size:
        raise ConfigError(f"neighbour value outside [0, {vocab_size})")
    w = np.exp(-(d - d.min()) / temperature)
    w /= w.sum()
    return np.bincount(v, weights=w, minlength=vocab_size)


def lm_distribution(logits: np.ndarray) -> np.ndarray:
    """softmax(logits) in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def interpolate(p_knn: np.ndarray, p_lm: np.ndarray, lam: float) -> np.ndarray:
    """``λ·p_knn + (1-λ)·p_lm``."""
    return lam * p_knn + (1.0 - lam) * p_lm


@dataclass(frozen=True)
class LMScores:
    """The LM side of :func:`next_token` at one position, computed once per logits vector.

    ``exp = exp(z - max z)`` in float64 (``z`` = the logits), ``total = exp.sum()`` and
    ``argmax`` = the LM's own choice (lowest id on ties); ``p_lm(y) = exp[y] / total``. The
    vocabulary-wide work of a decision lives here, so deciding the same position twice (a
    speculated token, then its verification) pays for it once.
    """

    exp: np.ndarray  # float64 [V]
    total: float
    argmax: int

    @classmethod
    def of(cls, logits: np.ndarray) -> LMScores:
        e = np.array(logits, dtype=np.float64)  # one vocabulary-sized buffer, updated in place
        argmax = int(np.argmax(e))
        e -= e[argmax]
        np.exp(e, out=e)
        return cls(exp=e, total=float(e.sum()), argmax=argmax)


def next_token(logits: np.ndarray | LMScores, dists: np.ndarray, values: np.ndarray, config: KNNLMConfig) -> int:
    """The kNN-LM greedy choice: ``argmax_y λ·p_knn(y) + (1-λ)·p_lm(y)``, ties -> lowest id.

    ``logits`` may be given as their :class:`LMScores` (same result, no vocabulary-wide work).
    Equal to ``argmax(interpolate(knn_distribution(...), lm_distribution(logits), λ))`` (tested),
    computed only at the candidates that can win: the neighbours' values and the LM's own argmax
    ``y*`` (any other ``y`` has ``p(y) = (1-λ)·p_lm(y) <= (1-λ)·p_lm(y*) <= p(y*)``, and ``y* < y``
    on equality; float rounding is monotone, so this also holds for the computed values).
    """
    lm = logits if isinstance(logits, LMScores) else LMScores.of(logits)
    d = np.asarray(dists, dtype=np.float64)
    v = np.asarray(values, dtype=np.int64)
    if d.shape != v.shape or d.ndim != 1 or d.size == 0:
        raise ConfigError(f"need one value per distance, got {d.shape} and {v.shape}")
    if v.min() < 0 or v.max() >= lm.exp.size:
        raise ConfigError(f"neighbour value outside [0, {lm.exp.size})")
    w = np.exp(-(d - d.min()) / config.temperature)
    w /= w.sum()
    cand = np.unique(np.append(v, lm.argmax))  # sorted ascending
    p_knn = np.zeros(cand.size)
    np.add.at(p_knn, np.searchsorted(cand, v), w)
    p = config.lam * p_knn + (1.0 - config.lam) * (lm.exp[cand] / lm.total)
    return int(cand[int(np.argmax(p))])


# ------------------------------------------------------------------ the LM side


@dataclass
class LMState:
    """LM output at the last fed position: the kNN query and the next-token logits."""

    hidden: np.ndarray  # float32 [d]: input of the LM head
    logits: np.ndarray  # float32 [V]
    seconds: float  # wall time of the forward that produced it

    @cached_property
    def scores(self) -> LMScores:
        """:class:`LMScores` of ``logits``, computed on first use and kept."""
        return LMScores.of(self.logits)


class IncrementalDecoder:
    """Prefill once, then 1-row forwards through the LM's runner; ``truncate`` rolls back.

    The KV state is a handle of the LM's own runner (``ralmspec.lm.runner``: the eager
    ``DynamicCache`` runner on the CPU, the static KV-slot runner on CUDA), so kNN-LM decodes
    through the same seam as document-level RaLM: ``start`` = one ``prefill_block`` of the
    prompt, ``step`` = the runner's ``step_hidden`` (a one-token ``prefill_block``'s bits; on the
    static runner a captured CUDA graph on CUDA; on the batched runner its 8-row step; it returns
    the final hidden state the datastore is searched with, and the logits), ``truncate`` = ``crop`` (a static runner only
    moves a length). ``close`` gives the handle back (a static runner's slot). ``runner``
    (default: the LM's) may be a ``SharedRunner`` (``ralmspec.lm.shared_runner``: decoding
    threads whose steps share forwards). One decoder per request, used from one thread. Decoders
    of several threads may share the LM's own runner: each call on it holds the LM's lock
    (``driving_runner``), as the LM's own calls do (on a static runner, threads' steps read
    each other's inputs: wrong tokens); a ``SharedRunner`` gathers its threads' steps itself.
    """

    def __init__(self, lm: Any, runner: Any = None):
        self.runner = lm.runner if runner is None else runner
        driving = getattr(lm, "driving_runner", None)  # the LM's lock, on the LM's own runner only
        on_lms_runner = driving is not None and self.runner is getattr(lm, "runner", None)
        self._turn = driving if on_lms_runner else contextlib.nullcontext
        self._kv: Any = None
        self._len = 0
        self._open = False

    @property
    def length(self) -> int:
        """Number of positions whose KV is held."""
        return self._len

    def _forward(self, ids: Sequence[int]) -> LMState:
        import torch

        t0 = time.perf_counter()
        with self._turn(), torch.inference_mode():
            if self._len == 0:  # the prompt, one prefill
                self._kv, logits, hidden = self.runner.prefill_block(self._kv, ids, last=True, want_hidden=True)
            else:  # one token: the runner's step (a captured / compiled step where it has one)
                (token,) = ids
                self._kv, logits, hidden = self.runner.step_hidden(self._kv, token)
            h = hidden.float().cpu().numpy().copy()
            lg = logits.float().cpu().numpy().copy()
        self._len += len(ids)
        return LMState(hidden=h, logits=lg, seconds=time.perf_counter() - t0)

    def start(self, prompt_ids: Sequence[int]) -> LMState:
        """Reset and prefill ``prompt_ids`` in one forward; the state predicts the next token."""
        if len(prompt_ids) == 0:
            raise ConfigError("the prompt is empty; a kNN-LM prompt needs at least one token")
        self.close()
        with self._turn():
            self._kv = self.runner.open()
        if self._kv is None and self.runner.capacity is not None:
            raise ConfigError(f"the LM runner ({self.runner.name}) has no free KV slot for a kNN-LM request; "
                              "release LM sessions or use a runner with more slots")
        self._open, self._len = True, 0
        return self._forward(prompt_ids)

    def step(self, token: int) -> LMState:
        """Feed one token (1-row forward) and return the state after it."""
        if not self._open:
            raise RuntimeError("IncrementalDecoder.step() before start()")
        return self._forward([int(token)])

    def truncate(self, length: int) -> None:
        """Keep the KV of the first ``length`` positions (``1 <= length <= self.length``)."""
        if not 1 <= length <= self._len:
            raise ValueError(f"cannot truncate a decoder of {self._len} positions to {length}")
        if length < self._len:
            with self._turn():
                self._kv = self.runner.crop(self._kv, length)
            self._len = length

    def close(self) -> None:
        """Give the KV handle back to the runner (idempotent; a closed LM's runner has every
        handle back already)."""
        if self._open:
            try:
                with self._turn():
                    self.runner.free(self._kv)
            except ClosedError:
                pass
        self._kv, self._len, self._open = None, 0, False


# ------------------------------------------------------------------ results


@dataclass
class TokenTrace:
    """One naive decoding step: the LM forward that produced the query, then the search."""

    token: int
    lm_s: float
    search_s: float
    combine_s: float


@dataclass
class KNNLMResult:
    prompt_ids: list[int]
    tokens: list[int]  # new tokens only
    text: str  # decoded new tokens
    wall_s: float
    lm_s: float  # all LM forwards
    search_s: float  # all real searches (naive: one per token)
    trace: list[TokenTrace] = field(default_factory=list)  # naive only
    stats: Any = None  # speculative: SpeculativeStats
    mode: str = "naive"

    def limit(self) -> float:
        """(a + r) / a from this run's LM and search time: the best a perfect speculator could do
        (meaningful for a naive run)."""
        return (self.lm_s + self.search_s) / self.lm_s if self.lm_s > 0 else float("nan")

    def to_dict(self) -> dict:
        d = {"mode": self.mode, "prompt_tokens": len(self.prompt_ids), "tokens": self.tokens, "text": self.text,
             "wall_s": self.wall_s, "lm_s": self.lm_s, "search_s": self.search_s}
        if self.mode == "naive":
            d["limit"] = self.limit()
        if self.stats is not None:
            d["stats"] = self.stats.to_dict()
        return d


# ------------------------------------------------------------------ the decoder

OnTokens = Callable[[list[int]], None]  # newly verified tokens, in order
StopWhen = Callable[[Sequence[int]], bool]  # the generated tokens so far -> stop here?


def check_compatible(lm: Any, datastore: Any) -> int:
    """The vocabulary size of ``lm`` after checking that ``datastore`` was built for it (key
    dimension = the model's hidden size, same vocabulary, values inside it, and the LM decodes
    through a KV runner, ``ralmspec.lm.runner``: the transformers backend); ConfigError if not."""
    if getattr(lm, "runner", None) is None:
        raise ConfigError(f"kNN-LM needs the transformers backend (an LM with a KV runner), got {type(lm).__name__}")
    if isinstance(datastore, (str, os.PathLike)):
        raise ConfigError(f"datastore must be an opened datastore, got the path {str(datastore)!r}: "
                          "open it with ralmspec.knnlm.open.open_datastore(path)")
    if not all(hasattr(datastore, a) for a in ("dim", "values", "manifest", "search")):
        raise ConfigError(f"datastore must be a kNN-LM datastore (ralmspec.knnlm.open.open_datastore), "
                          f"got {type(datastore).__name__}")
    d = hidden_size(lm.model)
    if d != datastore.dim:
        raise ConfigError(f"the datastore keys have dimension {datastore.dim} but the model's hidden size is "
                          f"{d}; build the datastore with the same model ({datastore.model_name!r})")
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    ds_vocab = datastore.manifest.get("vocab_size")
    if ds_vocab is not None and ds_vocab != vocab:
        raise ConfigError(f"datastore vocabulary ({ds_vocab}) differs from the model's ({vocab})")
    if len(datastore.values) and not 0 <= int(datastore.values.min()) <= int(datastore.values.max()) < vocab:
        raise ConfigError(f"datastore values fall outside the model's vocabulary [0, {vocab}); rebuild the datastore")
    return vocab


def encode_prompt(lm: Any, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        check_text(prompt, "the prompt")
        ids = lm.tokenizer.encode(prompt)
    else:
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"prompt must be a str or a sequence of token ids: {exc}") from None
    if not ids:
        raise ConfigError("the prompt is empty (no tokens); give a non-empty prompt")
    return ids


class KNNLM:
    """A language model + a datastore, decoded greedily with kNN-LM interpolation.

    ``generate`` is the naive decoder: one real search per generated token. ``runner`` (default:
    the LM's) is what its decoders step through and ``search`` (default: the datastore's) what
    they search with: for decoding threads that share forwards and searches, a ``SharedRunner``
    and a ``SharedSearch.search`` (the same results, batch-invariant).
    """

    def __init__(self, lm: Any, datastore: Datastore, config: KNNLMConfig | None = None, runner: Any = None,
                 search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None):
        self.lm = lm
        self.runner = lm.runner if runner is None else runner  # what the decoders step (IncrementalDecoder)
        self._search = search  # None: the datastore's own, looked up at each call
        self.datastore = datastore
        check_type(config, KNNLMConfig, "config", optional=True)
        self.config = config or KNNLMConfig()
        self.vocab_size = check_compatible(lm, datastore)

    def with_config(self, config: KNNLMConfig) -> KNNLM:
        """The same LM and datastore (already checked compatible) decoded with ``config``."""
        other = copy.copy(self)
        other.config = config
        return other

    # shared helpers (used by the speculative decoder too)
    def check_prompt(self, prompt: str | Sequence[int], max_new_tokens: int) -> list[int]:
        if getattr(self.lm, "closed", False):  # its runner's KV slots were freed under any decoder
            raise self.lm.closed_error()
        ids = encode_prompt(self.lm, prompt)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ConfigError(f"prompt token id {bad[0]} outside [0, {self.vocab_size})")
        max_ctx = int(getattr(self.lm, "max_context", 1 << 30))
        if len(ids) + max_new_tokens > max_ctx:
            raise ConfigError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds "
                              f"{context_limit(self.lm)}; shorten the prompt")
        return ids

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The datastore's canonical k-NN of ``queries`` (``Datastore.search``), through ``search``."""
        return self.datastore.search(queries, k) if self._search is None else self._search(queries, k)

    def is_stop(self, token: int) -> bool:
        return self.config.stop_at_eos and self.lm.is_stop(token)  # EOS or the LM's other stop tokens

    def decide(self, lm: LMState | LMScores | np.ndarray, ids: np.ndarray, dists: np.ndarray) -> int:
        """:func:`next_token` at the position of ``lm`` (a state, its scores or its logits) with this
        datastore's values for neighbour ``ids``."""
        scores = lm.scores if isinstance(lm, LMState) else lm
        return next_token(scores, dists, self.datastore.values[ids], self.config)

    def decode_text(self, tokens: Sequence[int]) -> str:
        return self.lm.tokenizer.decode(list(tokens))

    def generate(self, prompt: str | Sequence[int], *, on_tokens: OnTokens | None = None,
                 stop_when: StopWhen | None = None) -> KNNLMResult:
        """Naive kNN-LM greedy decoding: per token, one LM forward and one real k-NN search.

        ``on_tokens(ids)`` receives each new token as it is decided (all verified here);
        ``stop_when(generated)``, asked after each token, ends the output like an EOS when true
        (a stop string: it must hold for every longer output once it holds, so that the
        speculative decoder, which asks it on speculated output too, stops at the same token)."""
        cfg = self.config
        ids = self.check_prompt(prompt, cfg.max_new_tokens)
        t_start = time.perf_counter()
        dec = IncrementalDecoder(self.lm, self.runner)
        out: list[int] = []
        trace: list[TokenTrace] = []
        try:
            state = dec.start(ids)
            while True:
                t0 = time.perf_counter()
                nb_ids, nb_d = self.search(state.hidden[None, :], cfg.k)
                t1 = time.perf_counter()
                tok = self.decide(state, nb_ids[0], nb_d[0])
                t2 = time.perf_counter()
                trace.append(TokenTrace(token=tok, lm_s=state.seconds, search_s=t1 - t0, combine_s=t2 - t1))
                out.append(tok)
                if on_tokens is not None:
                    on_tokens([tok])
                if len(out) >= cfg.max_new_tokens or self.is_stop(tok) or (stop_when is not None and stop_when(out)):
                    break
                state = dec.step(tok)
        finally:
            dec.close()
        wall = time.perf_counter() - t_start
        return KNNLMResult(prompt_ids=ids, tokens=out, text=self.decode_text(out), wall_s=wall,
                           lm_s=sum(t.lm_s for t in trace), search_s=sum(t.search_s for t in trace),
                           trace=trace, mode="naive")


__all__ = ["KNNLMConfig", "KNNLM", "OnTokens", "StopWhen", "KNNLMResult", "TokenTrace", "IncrementalDecoder", "LMState", "LMScores",
           "knn_distribution", "lm_distribution", "interpolate", "next_token", "encode_prompt", "check_compatible"]
