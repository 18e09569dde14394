"""The LM runner seam: how a transformers model turns KV state + token ids into logits.

``HFLanguageModel`` (``ralmspec.lm.hf``) owns the contract (validation, the canonical block
schedule, session reuse, statistics, locking) and drives one ``KVRunner``:

- ``open()`` a fresh, empty KV handle (``None`` when the runner has no room: the caller evicts a
  session and asks again); ``free(kv)`` gives it back;
- ``prefill_block(kv, ids, last=..., want_hidden=...)`` appends the KV of ``ids`` (positions
  ``length(kv) ..``) with ONE forward; for the last block of a prompt it also returns the
  logits (and the final hidden state) of the last position;
- ``decode(kv, first_logits, n, pick, stop_ids)`` generates up to ``n`` tokens, the first from
  ``first_logits`` (``pick`` ``None`` = greedy argmax, ties -> lowest id; else the host draw
  ``pick(logits, i)``), stopping after a stop token (included);
- ``step_logits(kv, token)`` feeds one given token (the 1-row step ``decode`` runs) and returns
  the next position's logits: scoring tokens already generated (logprobs) replays decoding;
- ``crop(kv, keep)`` rolls the handle back to its first ``keep`` positions;
- ``export_block(kv, start, end)`` / ``import_block(kv, block)``: a detached copy of a span's KV
  and its bytes / that copy appended at a handle's next positions, for the prompt blocks shared
  across sessions (``ralmspec.lm.prefix_cache``);
- ``decode_batch(kvs, first_logits, n, picks, stop_ids)`` is ``decode`` for several handles at
  once: one ``DecodeChunk`` per handle, each exactly what ``decode`` alone would give it. The
  default runs them one by one; a runner with ``batch_rows > 1`` steps up to ``batch_rows``
  handles in ONE forward per token (the static runner's batch-invariant mode).

Two implementations: ``EagerRunner`` (a transformers ``DynamicCache`` per session, one Python
forward per token; any causal LM) and ``StaticRunner`` (``ralmspec.lm.static``: preallocated KV
slots, on-device decode, CUDA graphs on a GPU). Each is deterministic for fixed shapes; the two
are equal token for token in practice but not bit for bit (different attention shapes), which is
why one engine uses one runner for the naive and the speculative loop alike.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass
class DecodeChunk:
    tokens: list[int]  # generated ids, a stop token included and last
    steps: int  # 1-row forwards run (the static runner may run a few past a stop token)
    # ``keep_logits``: the logits each token was chosen from, ``[len(tokens), vocab]`` on the
    # runner's device (what ``step_logits_each`` replays, bit for bit); else None
    logits: torch.Tensor | None = None


class KVRunner(abc.ABC):
    """See the module doc. ``capacity``: how many handles may be open at once (None: unbounded);
    ``batch_rows``: how many handles one ``decode_batch`` forward steps together (1: one at a time)."""

    name: str = "?"
    capacity: int | None = None
    batch_rows: int = 1

    @abc.abstractmethod
    def open(self) -> Any: ...

    @abc.abstractmethod
    def crop(self, kv: Any, keep: int) -> Any: ...

    def free(self, kv: Any) -> None:  # noqa: B027 - optional hook
        """Give ``kv`` back (a slot to the pool); the eager handle is just dropped."""

    @abc.abstractmethod
    def nbytes(self, kv: Any) -> int: ...

    def croppable(self, kv: Any) -> bool:
        return True

    @abc.abstractmethod
    def prefill_block(self, kv: Any, ids: Sequence[int], *, last: bool,
                      want_hidden: bool) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]: ...

    @abc.abstractmethod
    def decode(self, kv: Any, first_logits: torch.Tensor, n: int,
               pick: Callable[[torch.Tensor, int], int] | None, stop_ids: frozenset[int], *,
               keep_logits: bool = False) -> DecodeChunk: ...

    @abc.abstractmethod
    def step_logits(self, kv: Any, token: int) -> tuple[Any, torch.Tensor]: ...

    prefills_together = False  # prefill_blocks shares forwards between sessions (the static runner's)

    def prefill_blocks(self, kvs: Sequence[Any], blocks: Sequence[Sequence[int]], lasts: Sequence[bool],
                       want_hidden: bool) -> list[tuple[Any, torch.Tensor | None, torch.Tensor | None]]:
        """``prefill_block`` of several handles (one block each), each exactly what
        ``prefill_block`` alone gives it. This default: one by one."""
        return [self.prefill_block(kv, ids, last=last, want_hidden=want_hidden)
                for kv, ids, last in zip(kvs, blocks, lasts)]

    def step_logits_each(self, kv: Any, tokens: Sequence[int]) -> tuple[Any, torch.Tensor]:
        """``step_logits`` fed each of ``tokens`` in turn: ``(kv, logits [len(tokens), vocab])``, row
        ``i`` the logits after ``tokens[i]`` (logprobs replay decoding with it). Here: one
        ``step_logits`` per token; a runner that decodes on the device may keep the tokens and the
        rows there (the static runner does: no host read per token)."""
        rows = []
        for tok in tokens:
            kv, row = self.step_logits(kv, int(tok))
            rows.append(row)
        return kv, torch.stack(rows) if rows else torch.empty(0)

    def kv_bytes(self) -> int:
        """Bytes of KV the runner itself holds (preallocated slots or a pool). Here 0: the eager
        runner's KV lives in the sessions' caches, which the LM backend counts."""
        return 0

    def state(self) -> dict[str, Any]:
        """What the runner did so far, for reports (``generate``, the bench JSON, ``/v1/stats``):
        its name; runners that capture graphs or compile their step add those."""
        return {"name": self.name}

    def step_hidden(self, kv: Any, token: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Feed ``token`` at the next position: ``(kv, logits, final hidden state)`` after it (kNN-LM's
        step: the hidden state is its datastore query), a function of the handle's history and
        ``token`` alone, computed the same way at every call. Here: a one-token ``prefill_block``;
        a runner may override it with its own decode step (the static runner does)."""
        kv, logits, hidden = self.prefill_block(kv, [int(token)], last=True, want_hidden=True)
        assert logits is not None and hidden is not None
        return kv, logits, hidden

    def export_block(self, kv: Any, start: int, end: int) -> tuple[Any, int] | None:
        """A detached copy of the KV of positions ``[start, end)`` of ``kv`` and its bytes, for the
        shared prefix table (``ralmspec.lm.prefix_cache``); ``None``: this handle cannot share."""
        return None

    def import_block(self, kv: Any, block: Any) -> Any:
        """``kv`` extended by an exported ``block`` at its next positions, exactly as if they had
        been prefilled there (``kv`` may be a fresh handle)."""
        raise NotImplementedError(f"the {self.name} runner does not import KV blocks")

    def decode_batch(self, kvs: Sequence[Any], first_logits: Sequence[torch.Tensor], n: int,
                     picks: Sequence[Callable[[torch.Tensor, int], int] | None],
                     stop_ids: frozenset[int], keep_logits: Sequence[bool] | None = None) -> list[DecodeChunk]:
        """``decode`` of every handle (same ``n``, own ``pick`` and ``keep_logits``); this default:
        one by one."""
        keep = keep_logits or [False] * len(kvs)
        return [self.decode(kv, first, n, pick, stop_ids, keep_logits=k)
                for kv, first, pick, k in zip(kvs, first_logits, picks, keep)]

    def decode_on_host(self, kv: Any, first_logits: torch.Tensor, n: int,
                       pick: Callable[[torch.Tensor, int], int], stop_ids: frozenset[int], *,
                       keep_logits: bool = False) -> DecodeChunk:
        """``decode`` with every token chosen on the host by ``pick(logits, i)``: one
        ``step_logits`` (and one host sync) per token, stopping right after a stop token."""
        tok = pick(first_logits, 0)
        new, steps = [tok], 0
        kept = [first_logits] if keep_logits else []
        while len(new) < n and tok not in stop_ids:
            kv, logits = self.step_logits(kv, tok)
            steps += 1
            if keep_logits:
                kept.append(logits)
            tok = pick(logits, len(new))
            new.append(tok)
        return DecodeChunk(tokens=new, steps=steps, logits=torch.stack(kept) if keep_logits else None)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Drop every buffer."""


class EagerRunner(KVRunner):
    """A transformers ``DynamicCache`` per handle; one forward (and one host sync) per token.

    Blocks before the last one only need their KV: they run the trunk without the LM head (same
    KV arithmetic; saves one vocab-sized GEMV per block). The LM head is applied to the last row
    only (``logits_to_keep=1``), so the last-row logits go through the same GEMM shape whatever
    the block length.
    """

    name = "eager"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self._cache_kw = _cache_kwarg(model)  # transformers >= 5.2x names it `cache`
        trunk = getattr(model, "base_model", model)
        self._trunk = trunk if trunk is not model and isinstance(trunk, torch.nn.Module) else None
        self._trunk_cache_kw = _cache_kwarg(trunk) if self._trunk is not None else self._cache_kw

    def open(self) -> Any:
        return None  # a DynamicCache is made by the first forward (``_fresh_cache``)

    def crop(self, kv: Any, keep: int) -> Any:
        if kv is None or keep <= 0:
            return None
        cur = kv.get_seq_length()
        if keep < cur:
            kv.crop(keep - cur)  # crop(negative) removes that many tokens in transformers 4.x and 5.x
        elif keep > cur:
            raise AssertionError(f"cannot crop a cache of {cur} positions to {keep}")
        return kv

    def nbytes(self, kv: Any) -> int:
        return _cache_nbytes(kv)

    def croppable(self, kv: Any) -> bool:
        layers = getattr(kv, "layers", None)
        if layers is None:
            return hasattr(kv, "crop")
        return all(getattr(layer, "is_croppable", True) and not getattr(layer, "is_sliding", False)
                   for layer in layers)

    def prefill_block(self, kv: Any, ids: Sequence[int], *, last: bool,
                      want_hidden: bool) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        if kv is None:
            kv = _fresh_cache(self.model)
        if not last and self._trunk is not None:
            out = self._trunk(input_ids=x, use_cache=True, **{self._trunk_cache_kw: kv})
            return _out_cache(out), None, None
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1,
                         output_hidden_states=want_hidden, **{self._cache_kw: kv})
        if not last:
            return _out_cache(out), None, None
        hidden = out.hidden_states[-1][0, -1] if want_hidden else None
        return _out_cache(out), out.logits[0, -1], hidden

    def decode(self, kv: Any, first_logits: torch.Tensor, n: int,
               pick: Callable[[torch.Tensor, int], int] | None, stop_ids: frozenset[int], *,
               keep_logits: bool = False) -> DecodeChunk:
        if pick is None:  # the greedy path, unchanged bit for bit
            def pick(row: torch.Tensor, _i: int) -> int:
                return int(torch.argmax(row).item())
        return self.decode_on_host(kv, first_logits, n, pick, stop_ids, keep_logits=keep_logits)

    def step_logits(self, kv: Any, token: int) -> tuple[Any, torch.Tensor]:
        x = torch.tensor([[int(token)]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **{self._cache_kw: kv})
        return _out_cache(out), out.logits[0, -1]

    def export_block(self, kv: Any, start: int, end: int) -> tuple[Any, int] | None:
        layers = getattr(kv, "layers", None)
        if layers is None or not self.croppable(kv):
            return None
        block = [(layer.keys[:, :, start:end].clone(), layer.values[:, :, start:end].clone()) for layer in layers]
        return block, sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in block)

    def import_block(self, kv: Any, block: Any) -> Any:
        if kv is None:
            kv = _fresh_cache(self.model)
        for i, (k, v) in enumerate(block):
            kv.update(k, v, i)  # concatenates into new tensors: the table's block is never written
        return kv


def _fresh_cache(model: torch.nn.Module) -> Any:
    """An empty ``DynamicCache`` for ``model``: the model's own (``DynamicCache(config=...)``),
    except that sliding-window layers keep every position. The model's own sliding layer
    (Mistral, Gemma 2, Qwen2 with ``use_sliding_window``) keeps only the last ``window - 1``
    positions and cannot be cropped once the window is reached, so a rollback (the kNN-LM
    speculative decoder's ``truncate``) raised transformers' RuntimeError, and a RaLM session was
    never kept (``croppable``). The window stays in the model's attention mask, built from its
    config, so the model computes the same function; the cache only holds the positions the mask
    leaves out, which a rollback may need again. Other layer kinds (linear attention, ...) are
    left as the model makes them (``croppable`` says whether they can be rolled back)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    layers = getattr(cache, "layers", None)
    if layers and any(getattr(layer, "is_sliding", False) for layer in layers):
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        if all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
            cache.layers = [DynamicLayer() for _ in layers]
    return cache


def _cache_kwarg(module: torch.nn.Module) -> str:
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def _cache_nbytes(cache: Any) -> int:
    if cache is None:
        return 0
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56
        for layer in layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for name in ("key_cache", "value_cache"):  # older DynamicCache
        for t in getattr(cache, name, []):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
