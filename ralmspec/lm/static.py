"""The static LM runner: preallocated KV slots, rollback by length, one host sync per chunk.

In the spirit of gpt-fast's ``model.py`` / ``generate.py``: the model's forward over KV slots is
``ralmspec.lm.slot_decoder`` (``SlotDecoder``: the HF model's own modules, attention by position,
the CUDA attention layout); this module is the loop around it.

- **KV slots.** Each session owns one *slot*: per layer, a key and a value buffer
  ``[1, kv_heads, max_len, head_dim]`` allocated once (on the slot's first use) and written in
  place at the positions a forward covers (``index_copy_``). Cropping a session to ``keep``
  positions (a rollback, a passage switch) only sets its length: nothing is copied or freed.
  Stale entries past the length are never read, because attention masks keys by position.
- **Canonical numerics.** The block discipline of ``ralmspec.lm.hf`` is kept: prompt KV is only
  computed in aligned blocks, 1-row steps only generate. The attention of a forward that ends at
  position ``e`` reads the first ``attention_span(e)`` keys of the slot (the next power of two,
  at least 64, at most ``max_len``), a function of the position alone, so every position's
  arithmetic is the same whatever the history: reuse equals no reuse bit for bit, as in the
  eager runner. With ``prefill_rows`` B (CUDA), an aligned block of at most B prompt tokens runs
  as ONE forward of exactly B rows (padding rows after it): its rows' bits are those of the full
  block (tested), and the forward is a captured graph per (slot, span).
- **Decode on the device.** Greedy tokens are chosen on the device (``argmax``, ties -> lowest
  id) and fed back without a host round trip; the chunk's tokens are read once, after the last
  step (``decode_sync_every`` bounds the wasted steps after a stop token in long chunks). On
  CUDA every 1-row step is a captured CUDA graph, one per (slot, attention span), replayed;
  with ``compile_step`` (``--lm-runner compiled``) the step captured is ``torch.compile``d, one
  compiled graph per span. Seeded sampling draws on the device too where the logits are on
  CUDA (``device_sampling``: the draw rule of ``ralmspec.lm.sampling`` evaluated with torch, its
  noise made on the host beside the steps), so a sampled chunk also syncs once; on the CPU the
  rule runs on the host (numpy's is faster there, and a host read costs nothing). kNN-LM's
  per-token step (``step_hidden``, logits and final hidden state) is the same 1-row step.
- **Cross-request batching** (``batch_rows`` > 1, ``--lm-runner batched``): the decode steps of
  several sessions run as ONE forward per token over ``batch_rows`` rows, each row at its own
  position in its own slot; a lone session's steps run in that same shape (padding rows), and
  attention runs per row over the row's own span (on CUDA per run of equal spans, in a call of
  the same fixed shape), so a row's arithmetic does not depend on its neighbours (the canonical
  numerics above extend across the batch; docs/lm-runner.md). The slots are rows of one pooled
  buffer addressed by device-side indices, so on CUDA a step is a graph per set of spans
  (``step_order``), whichever sessions fill it.
"""

from __future__ import annotations

import collections
import threading
import warnings
from typing import Any, Callable, Sequence

import torch

from ralmspec.errors import ConfigError
from ralmspec.lm.runner import DecodeChunk, KVRunner
from ralmspec.lm.sampling import SeededPick
from ralmspec.lm.slot_decoder import KVPool, Slot, SlotDecoder, attention_span, static_unsupported

# One CUDA graph capture at a time in the process: torch does not intend two stream captures at
# once (torch.cuda.graph's docs), and a capture's entry synchronises the device and empties the
# allocator's cache, which must not happen inside another thread's capture (``_capture``).
_CAPTURE_LOCK = threading.Lock()
_CAPTURE_STREAMS: dict[torch.device, Any] = {}  # guarded by _CAPTURE_LOCK


def _capture_stream(device: torch.device) -> Any:
    """The stream every warm-up and capture on ``device`` runs on (call with ``_CAPTURE_LOCK``
    held). Its own, not ``torch.cuda.Stream()``'s per-capture pick nor ``torch.cuda.graph``'s
    default: both hand out the 32 streams of the low-priority pool in turn, so every 32nd of them
    is another's (the query encoder's stream, another thread's warm-up), whose kernels would land
    in a capture running on it. The high-priority pool's first stream; nothing else here draws
    from that pool."""
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device, priority=-1)
    return stream


COMPILE_LIMIT = 64  # graphs of the compiled step in one process: one per (model, attention span); spans <= 7


class StaticRunner(KVRunner):
    """KV slots + device-side decode (module doc). ``capacity`` slots of ``max_len`` positions.

    ``batch_rows`` 1: every decode step is a 1-row forward (on CUDA a graph per slot and span).
    ``batch_rows`` k > 1, the **batch-invariant mode**: every decode step, a lone session's
    included, is ONE forward of exactly k rows (sessions stepped together, the rest padding rows),
    so a row's GEMMs always run in the same shape and its tokens do not depend on which sessions
    share its step (docs/lm-runner.md has the measurements that make the fixed shape necessary).
    Its slots are rows of one pooled buffer (``KVPool``, allocated at the first ``open``), so on
    CUDA a step is a graph per *span pattern*: the live rows sorted by span (ties: call order),
    padding last. Of each kind of graph (1-row steps, batch-invariant steps, prompt blocks) at
    most ``max_graphs`` are kept, the least recently used dropped.
    ``compile_step`` (``batch_rows`` 1 only): the 1-row step ``torch.compile``d, its first span
    compiled here so that a broken compiler is a ``ConfigError`` now, not inside a request.
    ``device_sampling`` (default: on CUDA): seeded draws (``SeededPick``) run on the device and
    their tokens are read with the greedy ones, once per ``decode_sync_every`` steps; off, a
    sampled token is drawn on the host (one read per token).
    ``cuda_attention`` (default: on CUDA): grouped-query attention laid out for CUDA's fused
    masked kernel (``SlotDecoder._sdpa``) and, in the batch-invariant mode, one attention call per
    span group (``SpanGroup``); off, SDPA's ``enable_gqa``, row by row.
    """

    name = "static"

    def __init__(self, model: torch.nn.Module, *, max_len: int, capacity: int,
                 cuda_graphs: bool | None = None, decode_sync_every: int = 16, batch_rows: int = 1,
                 max_graphs: int = 256, compile_step: bool = False, prefill_rows: int | None = None,
                 device_sampling: bool | None = None, cuda_attention: bool | None = None) -> None:
        why = static_unsupported(model, max_len)
        if why is not None:
            raise ConfigError(f"the static LM runner cannot run this model: {why}; "
                              "use lm_runner='eager' (--lm-runner eager)")
        if capacity < 1 or max_len < 2:
            raise ConfigError(f"static runner needs capacity >= 1 and max_len >= 2, got {capacity}, {max_len}")
        if not 1 <= batch_rows <= capacity:
            raise ConfigError(f"static runner needs 1 <= batch_rows <= capacity ({capacity}), got {batch_rows}")
        if compile_step and batch_rows > 1:
            raise ConfigError("the compiled step is the 1-row step: compile_step needs batch_rows 1")
        if prefill_rows is not None and not 1 <= prefill_rows <= max_len:
            raise ConfigError(f"static runner needs 1 <= prefill_rows <= max_len ({max_len}), got {prefill_rows}")
        dev = next(model.parameters()).device
        self.decoder = SlotDecoder(model, max_len, dev.type == "cuda" if cuda_attention is None else bool(cuda_attention))
        self.max_len = max_len
        self.capacity = capacity
        self.batch_rows = batch_rows
        if batch_rows > 1:
            self.name = "batched"
        self.cuda_graphs = dev.type == "cuda" if cuda_graphs is None else bool(cuda_graphs and dev.type == "cuda")
        self.decode_sync_every = max(1, decode_sync_every)
        self.device_sampling = dev.type == "cuda" if device_sampling is None else bool(device_sampling)
        self.max_graphs = max(1, max_graphs)
        # batch-invariant mode: number of ``batch_rows``-row forwards by how many sessions they stepped
        self.live_rows: collections.Counter[int] = collections.Counter()
        self._free = list(range(capacity - 1, -1, -1))
        self._buffers: dict[int, Slot] = {}  # slot index -> its buffers, kept for reuse
        self._held: dict[int, Slot] = {}  # slot index -> the handle its holder got from ``open``
        self._kv_pool: KVPool | None = None  # batch-invariant mode, from the first ``open``
        # step inputs at fixed addresses for the CUDA graphs: 1-row, and ``batch_rows``-row
        self._tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self._rows_tok = torch.zeros(batch_rows, 1, dtype=torch.long, device=dev)
        self._rows_pos = torch.zeros(batch_rows, 1, dtype=torch.long, device=dev)
        # captured graphs, least recently used first: 1-row steps by (slot, span), batch-invariant
        # steps by their spans, padded prompt blocks by (slot, span)
        self._graphs: collections.OrderedDict[tuple[int, int], Any] = collections.OrderedDict()
        # CUDA graphs captured since start (a graph dropped past max_graphs and captured again
        # counts again): what a benchmark compares to see capture work inside a request
        self.graph_captures = 0
        self._step_graphs: collections.OrderedDict[tuple[int | None, ...], Any] = collections.OrderedDict()
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # padded prompt blocks (``prefill_block``): token ids and positions at a fixed address
        self.prefill_rows = prefill_rows
        self.prefill_graphs = self.cuda_graphs
        self._block_in = torch.zeros(2, prefill_rows or 1, dtype=torch.long, device=dev)
        self._block_graphs: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
        self.padded_blocks = 0  # prompt blocks run padded to ``prefill_rows`` rows
        # ``prefills_together``: the pooled blocks' inputs, and its forwards counted by live rows
        self._rows_block_in = torch.zeros(2, batch_rows, prefill_rows or 1, dtype=torch.long, device=dev)
        self.block_rows: collections.Counter[int] = collections.Counter()
        cfg = self.decoder
        self.slot_bytes = (2 * len(cfg.layers) * cfg.n_kv * max_len * cfg.head_dim
                           * torch.empty(0, dtype=cfg.dtype).element_size())
        self._compiled: Callable[[Slot, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.compiled_spans: set[int] = set()  # attention spans the compiled step has run at
        if compile_step:
            self.name = "compiled"
            self._compiled = torch.compile(self._row_forward, fullgraph=True, dynamic=False)
            self._compile_now()

    @property
    def captured_graphs(self) -> int:
        """CUDA graphs held now: 1-row steps, batch-invariant steps and padded prompt blocks."""
        return len(self._graphs) + len(self._step_graphs) + len(self._block_graphs)

    def state(self) -> dict[str, Any]:
        """``KVRunner.state`` with the CUDA graphs held, the spans the compiled step ran at
        (``compile_step``), the batch-invariant steps counted by live rows (``batch_rows`` > 1) and
        the shared prompt-block forwards counted by live rows (``prefills_together``)."""
        out: dict[str, Any] = {"name": self.name, "cuda_graphs": self.captured_graphs,
                               "graph_captures": self.graph_captures}
        if self._compiled is not None:
            out["compiled_spans"] = sorted(self.compiled_spans)
        if self.batch_rows > 1:
            out["batched_steps_by_live_rows"] = dict(sorted(self.live_rows.items()))
        if self.prefills_together:
            out["prefill_forwards_by_live_rows"] = dict(sorted(self.block_rows.items()))
        return out

    def kv_bytes(self) -> int:
        """The KV allocated so far: the pool (batch-invariant mode: every slot and the spare at
        once), else the slots opened at least once (each keeps its buffers for reuse). Derived
        from an attribute and a dict's length, so a reader on another thread (``/v1/stats``)
        needs no lock."""
        if self._kv_pool is not None:
            return (self.capacity + 1) * self.slot_bytes
        return len(self._buffers) * self.slot_bytes

    # ------------------------------------------------------------------ slots

    def open(self) -> Slot | None:
        if not self._free:
            return None
        i = self._free.pop()
        buffers = self._buffers.get(i)
        if buffers is None:
            d = self.decoder
            if self.batch_rows > 1:
                pool = self._pooled()
                slot = Slot(i, [k[i:i + 1] for k in pool.keys], [v[i:i + 1] for v in pool.values])
            else:
                shape = (1, d.n_kv, self.max_len, d.head_dim)
                slot = Slot(i, [torch.zeros(shape, dtype=d.dtype, device=d.device) for _ in d.layers],
                            [torch.zeros(shape, dtype=d.dtype, device=d.device) for _ in d.layers])
            self._buffers[i] = buffers = slot
        # a new handle on the slot's buffers for each holder: a stale handle is never the held one
        slot = self._held[i] = Slot(i, buffers.keys, buffers.values)
        return slot

    def _pooled(self) -> KVPool:
        """The batch-invariant mode's pooled KV (class doc), allocated once: zeros, so a key past a
        slot's length (masked) never carries a NaN into the attention."""
        if self._kv_pool is None:
            d = self.decoder
            shape = (self.capacity + 1, d.n_kv, self.max_len, d.head_dim)
            self._kv_pool = KVPool([torch.zeros(shape, dtype=d.dtype, device=d.device) for _ in d.layers],
                                   [torch.zeros(shape, dtype=d.dtype, device=d.device) for _ in d.layers],
                                   torch.full((self.batch_rows,), self.capacity, dtype=torch.long, device=d.device),
                                   torch.full((self.batch_rows,), self.capacity, dtype=torch.long, device=d.device),
                                   gather=self.cuda_graphs)
        return self._kv_pool

    def crop(self, kv: Slot, keep: int) -> Slot:
        if keep > kv.length:
            raise AssertionError(f"cannot crop a slot of {kv.length} positions to {keep}")
        kv.length = keep
        return kv

    def free(self, kv: Slot | None) -> None:
        """Give ``kv``'s slot back to the pool. Only the handle ``open`` last returned for that
        slot frees it, once: a second free, or a stale handle (an earlier holder's, one from
        before ``close``), is a no-op, where it would put the slot in the pool twice and let two
        sessions write one slot's KV."""
        if kv is None or self._held.get(kv.index) is not kv:
            return
        del self._held[kv.index]
        kv.length = 0
        self._free.append(kv.index)

    def nbytes(self, kv: Slot | None) -> int:
        return 0 if kv is None else self.slot_bytes

    def check_fits(self, end: int) -> None:
        """ConfigError unless a slot holds ``end`` positions."""
        if end > self.max_len:
            raise ConfigError(f"{end} positions exceed the static runner's slot length {self.max_len}")

    def export_block(self, kv: Slot, start: int, end: int) -> tuple[Any, int] | None:
        block = [(k[:, :, start:end].clone(), v[:, :, start:end].clone()) for k, v in zip(kv.keys, kv.values)]
        return block, sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in block)

    def import_block(self, kv: Slot, block: Any) -> Slot:
        start, n = kv.length, int(block[0][0].shape[2])
        self.check_fits(start + n)
        for (k, v), keys, values in zip(block, kv.keys, kv.values):
            keys[:, :, start:start + n].copy_(k)  # in place: captured graphs keep reading these buffers
            values[:, :, start:start + n].copy_(v)
        kv.length = start + n
        return kv

    # ------------------------------------------------------------------ forwards

    @property
    def prefills_together(self) -> bool:
        """The batch-invariant mode with padded prompt blocks (CUDA): every padded block is a row
        of ONE ``batch_rows`` x ``prefill_rows`` forward, which the blocks of several sessions
        share (``prefill_blocks``), a lone block's included (the fixed shape keeps its bits)."""
        return self.batch_rows > 1 and self.prefill_rows is not None

    def _paddable(self, kv: Slot, n: int) -> bool:
        """A block of ``n`` tokens at ``kv.length`` runs padded to ``prefill_rows`` rows: it starts on
        a block boundary, fits a block, and its padding rows fit the slot."""
        B = self.prefill_rows
        return B is not None and kv.length % B == 0 and n <= B and kv.length + B <= self.max_len

    def prefill_blocks(self, kvs: Sequence[Slot], blocks: Sequence[Sequence[int]], lasts: Sequence[bool],
                       want_hidden: bool) -> list[tuple[Slot, torch.Tensor | None, torch.Tensor | None]]:
        """``prefill_block`` of several slots; with ``prefills_together``, their padded blocks run
        ``batch_rows`` at a time as one forward (the rest, one by one, unpadded)."""
        if not self.prefills_together:
            return super().prefill_blocks(kvs, blocks, lasts, want_hidden)
        out: list[Any] = [None] * len(kvs)
        fits = [self._paddable(kv, len(ids)) for kv, ids in zip(kvs, blocks)]
        padded = [i for i, f in enumerate(fits) if f]
        for i in (i for i, f in enumerate(fits) if not f):
            out[i] = self.prefill_block(kvs[i], blocks[i], last=lasts[i], want_hidden=want_hidden)
        for g in range(0, len(padded), self.batch_rows):
            part = padded[g:g + self.batch_rows]
            rows = self._pooled_blocks([kvs[i] for i in part], [blocks[i] for i in part])
            for i, row in zip(part, rows):
                out[i] = self._block_out(kvs[i], row, lasts[i], want_hidden)
        return out

    def _block_out(self, kv: Slot, row: torch.Tensor, last: bool,
                   want_hidden: bool) -> tuple[Slot, torch.Tensor | None, torch.Tensor | None]:
        if not last:
            return kv, None, None
        return kv, self.decoder.logits(row[None])[0], (row if want_hidden else None)

    def prefill_block(self, kv: Slot, ids: Sequence[int], *, last: bool,
                      want_hidden: bool) -> tuple[Slot, torch.Tensor | None, torch.Tensor | None]:
        start, end = kv.length, kv.length + len(ids)
        self.check_fits(end)
        d, span = self.decoder, attention_span(end, self.max_len)
        if self.prefills_together and self._paddable(kv, len(ids)):
            return self._block_out(kv, self._pooled_blocks([kv], [ids])[0], last, want_hidden)
        if self._paddable(kv, len(ids)):
            row = self._padded_block(kv, ids, span)
        else:
            x = _host_to(torch.tensor([list(ids)], dtype=torch.long), d.device)
            pos = torch.arange(start, end, device=d.device)[None]
            row = d.forward([kv], x, pos, [span])[0, -1]
        kv.length = end
        return self._block_out(kv, row, last, want_hidden)

    def _pooled_blocks(self, kvs: list[Slot], blocks: list[Sequence[int]]) -> list[torch.Tensor]:
        """Aligned prompt blocks of up to ``batch_rows`` slots as ONE pooled forward of
        ``batch_rows`` x ``prefill_rows`` rows (``prefills_together``): each slot's block padded as
        in ``_padded_block``, the rows ordered by span (``step_order``), padding rows on the spare
        slot; on CUDA a graph per set of spans. Returns each block's last real row's final hidden
        state, in the order of ``kvs``, and advances the slots' lengths."""
        d, b, B, n = self.decoder, self.batch_rows, self.prefill_rows, len(kvs)
        assert B is not None and 1 <= n <= b
        spans = [attention_span(kv.length + len(ids), self.max_len) for kv, ids in zip(kvs, blocks)]
        order = step_order(spans + [None] * (b - n))
        host = torch.zeros(2, b, B + 1, dtype=torch.long)  # ids, positions; column B: slot index
        for j, r in enumerate(order):
            if r < n:
                host[0, j, :len(blocks[r])] = torch.tensor(list(blocks[r]), dtype=torch.long)
                host[1, j, :B] = torch.arange(kvs[r].length, kvs[r].length + B)
                host[0, j, B] = kvs[r].index
            else:  # a padding row: distinct positions of the spare slot
                host[1, j, :B] = torch.arange(j * B, (j + 1) * B) % self.max_len
                host[0, j, B] = self.capacity
        host = _host_to(host, d.device)  # one host-to-device copy
        self._rows_block_in.copy_(host[:, :, :B])
        pool = self._pooled()
        pool.rows.copy_(host[0, :, B])
        key = tuple(spans[r] if r < n else None for r in order)
        slots = [kvs[r] if r < n else None for r in order]

        hidden = self._block_hidden(("rows",) + key, lambda: d.forward(  # [b, B, d]
            slots, self._rows_block_in[0], self._rows_block_in[1], key, pool))
        place = {r: j for j, r in enumerate(order)}
        rows = [hidden[place[r], len(blocks[r]) - 1].clone() for r in range(n)]  # before the next replay
        for kv, ids in zip(kvs, blocks):
            kv.length += len(ids)
        self.padded_blocks += n
        self.block_rows[n] += 1
        return rows

    def _padded_block(self, kv: Slot, ids: Sequence[int], span: int) -> torch.Tensor:
        """An aligned prompt block of at most ``prefill_rows`` tokens as ONE forward of exactly
        ``prefill_rows`` rows (token 0 in the rows after ``ids``, at the next positions, whose KV
        lies past the slot's length: never read); the final hidden state of its last real row.
        A real row's bits are then those it has in the full block (tested), and on CUDA the forward
        is a graph per (slot, span), whatever the number of real rows."""
        t, B = len(ids), self.prefill_rows
        assert B is not None
        start = kv.length
        self.padded_blocks += 1
        host = torch.zeros(2, B, dtype=torch.long)
        host[0, :t] = torch.tensor(list(ids), dtype=torch.long)
        host[1] = torch.arange(start, start + B)
        self._block_in.copy_(_host_to(host, self.decoder.device))  # one host-to-device copy
        hidden = self._block_hidden((kv.index, span), lambda: self.decoder.forward(  # [B, d]
            [kv], self._block_in[0:1], self._block_in[1:2], [span])[0])
        return hidden[t - 1].clone()  # a graph's buffer is overwritten by its next replay

    def _block_hidden(self, key: Any, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A padded prompt-block forward's final hidden states: the graph of ``key`` replayed
        (captured on first use), or ``forward()`` itself without graphs. A capture failure warns
        and turns off the prompt-block graphs only: the decode graphs stay."""
        if self.prefill_graphs:
            try:
                return self._replayed(self._block_graphs, key, forward)
            except RuntimeError as exc:
                warnings.warn(f"CUDA graph capture of a prefill block failed ({exc}); prefill continues "
                              "without graphs", RuntimeWarning, stacklevel=3)
                self.prefill_graphs = False
                self._block_graphs.clear()
        return forward()

    def decode(self, kv: Slot, first_logits: torch.Tensor, n: int,
               pick: Callable[[torch.Tensor, int], int] | None, stop_ids: frozenset[int], *,
               keep_logits: bool = False) -> DecodeChunk:
        """Tokens ``0..n-1`` after the prompt whose last logits are ``first_logits``; ``pick``
        None means greedy on the device; a seeded draw runs on the device with
        ``device_sampling``; any other pick is a host draw per token (one sync each)."""
        if self.batch_rows > 1:
            return self.decode_batch([kv], [first_logits], n, [pick], stop_ids, [keep_logits])[0]
        choose = self._chooser(pick)
        if choose is None:
            assert pick is not None
            return self.decode_on_host(kv, first_logits, n, pick, stop_ids, keep_logits=keep_logits)
        d = self.decoder
        out = torch.empty(n, dtype=torch.long, device=d.device)
        kept = [first_logits]
        nxt = choose(first_logits, 0)
        out[0] = nxt
        steps, i = 0, 1
        while True:
            stop_at = min(n, i + self.decode_sync_every)
            while i < stop_at:
                logits = self._step_logits(kv, nxt)
                if keep_logits:
                    kept.append(logits.clone())  # a graph's output buffer: copied before the next replay
                # the draw reads the step's output buffer before the next replay overwrites it
                nxt = choose(logits, i)
                out[i] = nxt
                steps += 1
                i += 1
            got = out[:i].tolist()  # the one host sync of this stretch
            if i >= n or any(t in stop_ids for t in got):
                break
        tokens = _until_stop(got, stop_ids)
        return DecodeChunk(tokens=tokens, steps=steps,
                           logits=torch.stack(kept[:len(tokens)]) if keep_logits else None)

    def _chooser(self, pick: Callable[[torch.Tensor, int], int] | None
                 ) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
        """How ``pick`` chooses a token without leaving the device (a 0-d tensor from the logits
        and the token's index in the chunk): greedy's argmax, a seeded draw with
        ``device_sampling``; None where only the host can run ``pick``."""
        if pick is None:
            return lambda logits, _i: torch.argmax(logits)
        if self.device_sampling and isinstance(pick, SeededPick):
            return pick.on_device
        return None

    def decode_batch(self, kvs: Sequence[Slot], first_logits: Sequence[torch.Tensor], n: int,
                     picks: Sequence[Callable[[torch.Tensor, int], int] | None],
                     stop_ids: frozenset[int], keep_logits: Sequence[bool] | None = None) -> list[DecodeChunk]:
        """``decode`` of several slots; with ``batch_rows`` > 1, groups of up to ``batch_rows``
        slots step together, one ``batch_rows``-row forward per token (class doc)."""
        if self.batch_rows == 1:
            return super().decode_batch(kvs, first_logits, n, picks, stop_ids, keep_logits)
        keep = list(keep_logits or [False] * len(kvs))
        out: list[DecodeChunk] = []
        for g in range(0, len(kvs), self.batch_rows):
            part = slice(g, g + self.batch_rows)
            out += self._decode_rows(list(kvs[part]), list(first_logits[part]), n, list(picks[part]), stop_ids,
                                     keep[part])
        return out

    def _decode_rows(self, kvs: list[Slot], first_logits: list[torch.Tensor], n: int,
                     picks: list[Callable[[torch.Tensor, int], int] | None],
                     stop_ids: frozenset[int], keep: list[bool]) -> list[DecodeChunk]:
        """One group of the batch-invariant mode. Rows chosen on the device (greedy; seeded draws
        with ``device_sampling``): tokens read once per ``decode_sync_every`` steps. Other rows:
        the host draw of ``picks[r]`` per token (one sync per step while such a row is running).
        A row that has stopped (a stop token seen) becomes a padding row: the forward keeps its
        shape, the others' bits with it."""
        d, rows = self.decoder, len(kvs)
        toks = torch.zeros(rows, n, dtype=torch.long, device=d.device)
        live = [True] * rows  # still stepped (a device row's stop is only seen at a sync)
        steps = [0] * rows
        chooses = [None if pick is None else self._chooser(pick) for pick in picks]  # None: argmax / host
        kept: list[list[torch.Tensor] | None] = [[first] if k else None for first, k in zip(first_logits, keep)]
        for r, (first, pick, choose) in enumerate(zip(first_logits, picks, chooses)):
            if pick is None:
                toks[r, 0] = torch.argmax(first)
            elif choose is not None:
                toks[r, 0] = choose(first, 0)
            else:
                toks[r, 0] = tok = pick(first, 0)
                live[r] = tok not in stop_ids
        i = 1
        while i < n and any(live):
            logits = self._step_rows([kv if on else None for kv, on in zip(kvs, live)], toks[:, i - 1])
            toks[:, i] = torch.argmax(logits, dim=-1)  # [rows, vocab]: one row per slot of ``kvs``
            for r in range(rows):
                if not live[r]:
                    continue
                steps[r] += 1
                rows_kept = kept[r]
                if rows_kept is not None:
                    rows_kept.append(logits[r])
                if chooses[r] is not None:
                    toks[r, i] = chooses[r](logits[r], i)
                elif picks[r] is not None:
                    toks[r, i] = tok = picks[r](logits[r], i)
                    live[r] = tok not in stop_ids
            i += 1
            if i % self.decode_sync_every == 0 and i < n:  # the greedy rows' periodic sync
                for r, got in enumerate(toks[:, :i].tolist()):
                    live[r] = live[r] and not any(t in stop_ids for t in got)
        chunks = [DecodeChunk(tokens=_until_stop(got[:i], stop_ids), steps=steps[r])
                  for r, got in enumerate(toks.tolist())]
        for chunk, rows_kept in zip(chunks, kept):
            if rows_kept is not None:
                chunk.logits = torch.stack(rows_kept[:len(chunk.tokens)])
        return chunks

    def step_logits(self, kv: Slot, token: int) -> tuple[Slot, torch.Tensor]:
        """The logits after feeding ``token`` at position ``kv.length`` (a copy: a graph's output
        buffer is overwritten by its next replay). In the batch-invariant mode the step is the
        ``batch_rows``-row forward that ``decode`` runs, so they are decoding's logits bit for bit."""
        tok = _host_to(torch.tensor([int(token)]), self.decoder.device)  # no host wait on CUDA
        if self.batch_rows > 1:
            return kv, self._step_rows([kv], tok)[0]
        return kv, self._step_logits(kv, tok[0]).clone()

    def step_logits_each(self, kv: Slot, tokens: Sequence[int]) -> tuple[Slot, torch.Tensor]:
        """``step_logits`` per token with the tokens uploaded once and the rows kept on the
        device: nothing is read back to the host (the caller reads what it needs)."""
        toks = _host_to(torch.tensor([int(t) for t in tokens], dtype=torch.long), self.decoder.device)
        rows = []
        for i in range(len(tokens)):
            if self.batch_rows > 1:
                rows.append(self._step_rows([kv], toks[i:i + 1])[0])
            else:
                rows.append(self._step_logits(kv, toks[i]).clone())  # before the next replay overwrites it
        return kv, torch.stack(rows) if rows else torch.empty(0, device=self.decoder.device)

    def step_hidden(self, kv: Slot, token: int) -> tuple[Slot, torch.Tensor, torch.Tensor]:
        """The decode step with its final hidden state. 1-row mode: the 1-row step (a CUDA graph
        on CUDA, compiled with ``compile_step``); uncompiled and without ``prefill_rows`` these
        are the bits of a one-token ``prefill_block`` (tested). Batch-invariant mode: the
        ``batch_rows``-row step (``step_hidden_rows`` of this slot alone), so a kNN-LM session's
        bits are the same alone and stepped among other sessions (``lm/shared_runner.py``)."""
        if self.batch_rows > 1:
            logits, hidden = self.step_hidden_rows([kv], [token])
            return kv, logits[0], hidden[0]
        logits, hidden = self._step_state(kv, _host_to(torch.tensor(int(token)), self.decoder.device))
        return kv, logits.clone(), hidden.clone()

    def step_hidden_rows(self, kvs: Sequence[Slot], tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-invariant mode: ``tokens[r]`` fed to ``kvs[r]``, up to ``batch_rows`` slots per
        ``batch_rows``-row forward; ``(logits [n, vocab], final hidden states [n, d])`` in the order
        of ``kvs``, each row the bits of that slot stepped alone (class doc)."""
        if self.batch_rows == 1:
            raise ConfigError("step_hidden_rows needs the batch-invariant mode (batch_rows > 1)")
        if len(kvs) != len(tokens) or not kvs:
            raise ValueError(f"need one token per slot, got {len(kvs)} slots and {len(tokens)} tokens")
        toks = _host_to(torch.tensor([int(t) for t in tokens], dtype=torch.long), self.decoder.device)
        parts = [self._step_rows_state(list(kvs[g:g + self.batch_rows]), toks[g:g + self.batch_rows])
                 for g in range(0, len(kvs), self.batch_rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _step_rows(self, kvs: Sequence[Slot | None], toks: torch.Tensor) -> torch.Tensor:
        """One ``batch_rows``-row forward: ``toks[r]`` fed at position ``kvs[r].length`` for each
        slot (``None`` and the rows past ``len(kvs)`` are padding); logits ``[len(kvs), vocab]``
        in the order of ``kvs`` (a copy: a graph's output is overwritten by its next replay)."""
        return self._step_rows_state(kvs, toks)[0]

    def _step_rows_state(self, kvs: Sequence[Slot | None], toks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``_step_rows`` with the rows' final hidden states: ``(logits, hidden)``, copies."""
        d, b, n = self.decoder, self.batch_rows, len(kvs)
        live = [kv for kv in kvs if kv is not None]
        if live:
            self.check_fits(max(kv.length for kv in live) + 1)
        spans = [None if kv is None else attention_span(kv.length + 1, self.max_len) for kv in kvs]
        order = step_order(spans + [None] * (b - n))
        slots = [kvs[r] if r < n else None for r in order]
        place = [0] * b  # row r of ``kvs`` runs at place[r] of the step
        for j, r in enumerate(order):
            place[r] = j
        meta = torch.tensor([[self.capacity if s is None else s.index for s in slots],  # the spare slot
                             [j % self.max_len if s is None else s.length for j, s in enumerate(slots)],
                             [r if r < n else 0 for r in order], place],
                            dtype=torch.long)
        meta = _host_to(meta, d.device)  # one host-to-device copy per step
        pool = self._pooled()
        pool.rows.copy_(meta[0])
        self._rows_pos[:, 0].copy_(meta[1])
        self._rows_tok[:, 0].copy_(toks[:n].index_select(0, meta[2]))
        logits, hidden = self._rows_state(slots, tuple(spans[r] if r < n else None for r in order), pool)
        self.live_rows[len(live)] += 1
        for kv in live:
            kv.length += 1
        back = meta[3, :n]
        return logits.index_select(0, back), hidden.index_select(0, back)

    def _rows_state(self, slots: list[Slot | None], spans: tuple[int | None, ...],
                    pool: KVPool) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's logits ``[batch_rows, vocab]`` and final hidden states ``[batch_rows, d]`` in
        step order: the graph of ``spans``, replayed (captured on its first use), or the forward
        itself without graphs."""
        def step() -> tuple[torch.Tensor, torch.Tensor]:
            h = self.decoder.forward(slots, self._rows_tok, self._rows_pos, spans, pool)[:, -1]
            return self.decoder.logits(h), h

        if self.cuda_graphs:
            try:
                return self._replayed(self._step_graphs, spans, step)
            except RuntimeError as exc:
                self._without_graphs(exc)
        return step()

    def _step_logits(self, kv: Slot, tok: torch.Tensor) -> torch.Tensor:
        return self._step_state(kv, tok)[0]

    def _step_state(self, kv: Slot, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tok`` at position ``kv.length``: the logits and the final hidden state after it
        (a graph's output buffers on CUDA: copy before the slot's next step)."""
        pos = kv.length
        self.check_fits(pos + 1)
        span = attention_span(pos + 1, self.max_len)
        self._tok.view(-1).copy_(tok.view(-1))
        self._pos.fill_(pos)
        kv.length = pos + 1
        if self.cuda_graphs:
            try:
                return self._replayed(self._graphs, (kv.index, span), lambda: self._one_row(kv, span))
            except RuntimeError as exc:
                self._without_graphs(exc)
        return self._one_row(kv, span)

    def _one_row(self, kv: Slot, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The 1-row step: the forward itself, or its ``torch.compile``d form (``compile_step``)."""
        if self._compiled is None:
            return self._row_forward(kv, span)
        # one compiled graph per span (<= 7: 64 .. 4096), whatever else the process compiles
        self.compiled_spans.add(span)
        with torch._dynamo.config.patch(recompile_limit=COMPILE_LIMIT):
            return self._compiled(kv, span)

    def _row_forward(self, kv: Slot, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and final hidden state of the 1-row step: the ops of a one-token ``prefill_block``."""
        d = self.decoder
        row = d.forward([kv], self._tok, self._pos, [span])[0, -1]
        return d.logits(row[None])[0], row

    def _compile_now(self) -> None:
        """Compile the 1-row step for the first span now (and capture it on CUDA), so that a
        failing compiler is a ``ConfigError`` at start-up, not an error inside a request."""
        slot = self.open()
        assert slot is not None
        try:
            with torch.inference_mode():
                self.prefill_block(slot, [0], last=True, want_hidden=False)
                self._step_logits(slot, torch.zeros((), dtype=torch.long, device=self.decoder.device))
        except Exception as exc:
            raise ConfigError(f"--lm-runner compiled: torch.compile of the decode step failed here "
                              f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}); "
                              "use --lm-runner static") from exc
        finally:
            self.free(slot)

    def _replayed(self, graphs: collections.OrderedDict, key: Any, step: Callable[[], Any]) -> Any:
        """``step``'s outputs by replaying the graph of ``key`` in ``graphs``, captured on first use
        (``RuntimeError`` if it cannot be); at most ``max_graphs`` per kind are kept, the least
        recently used dropped (re-captured if it comes back)."""
        entry = graphs.get(key)
        if entry is None:
            entry = graphs[key] = self._capture(step)
            self.graph_captures += 1
            if len(graphs) > self.max_graphs:
                graphs.popitem(last=False)
        else:
            graphs.move_to_end(key)
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, step: Callable[[], Any]) -> tuple[Any, Any]:
        """A CUDA graph of ``step`` (one decode step over the fixed-address inputs) and its output
        buffers. The warm-up runs write the very KV the step writes (same inputs), so they change
        nothing.

        Captured in ``thread_local`` error mode: graphs are captured on first use, while other
        threads may be working on the same GPU (the verification worker encoding queries, the
        kNN-LM server's other decoding threads stepping or capturing their own runners), and in
        torch's default ``global`` mode any other thread's unsafe CUDA call during the capture
        invalidates it, which would leave this runner without graphs for good
        (``_without_graphs``). Only this thread's own unsafe calls now fail the capture; the
        other threads' kernels run on their own streams and are not captured (capture follows the
        stream); torch's inductor (cudagraph trees) captures the same way. The price: CUDA no
        longer flags another thread's unsafe call during a capture, so the GPU test checks both
        sides, the graphs' tokens and a bystander encoder's vectors. Captures of all runners in
        the process take turns (``_CAPTURE_LOCK``): the kNN-LM server's threads each capture
        their own runner's graphs, and their warm-ups too, on one stream of their own
        (``_capture_stream``): a warm-up on the capturing stream would be captured."""
        with _CAPTURE_LOCK:
            stream = _capture_stream(self.decoder.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool, stream=stream, capture_error_mode="thread_local"):
                out = step()
        return graph, out

    def _without_graphs(self, exc: BaseException) -> None:
        """Keep serving, uncaptured, and say so once."""
        warnings.warn(f"CUDA graph capture failed ({exc}); the static runner continues without graphs",
                      RuntimeWarning, stacklevel=3)
        self.cuda_graphs = self.prefill_graphs = False
        self._drop_graphs()

    def _drop_graphs(self) -> None:
        for graphs in (self._graphs, self._step_graphs, self._block_graphs):
            graphs.clear()
        if self._graph_pool is not None:  # graphs captured from now on go into a new pool: torch
            self._graph_pool = torch.cuda.graph_pool_handle()  # asserts a reused pool is still in use

    def close(self) -> None:
        self._drop_graphs()
        self._buffers.clear()
        self._held.clear()
        self._kv_pool = None
        self._free = list(range(self.capacity - 1, -1, -1))


def _host_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (a CPU tensor) on ``device``. On CUDA through pinned memory, queued behind the
    kernels already launched (the caching host allocator keeps the pinned copy until the copy is
    done): a step's inputs go up without the host waiting for the previous step, so the host
    prepares step ``i + 1`` while the GPU runs step ``i`` (a plain copy from pageable memory
    would wait for the stream)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def step_order(spans: Sequence[int | None]) -> list[int]:
    """The rows of a batch-invariant step in the order they run: live rows by attention span,
    longest first (ties: call order), then the padding rows (``None``). Their spans in this order
    are the step's graph key, so the key is the step's *set* of spans and a handful of graphs
    serve every mix of sessions (a row's bits do not depend on its place in the fixed shape)."""
    return sorted(range(len(spans)), key=lambda r: (spans[r] is None, -(spans[r] or 0)))


def _until_stop(tokens: list[int], stop_ids: frozenset[int]) -> list[int]:
    """``tokens`` cut right after the first stop token (kept), if any."""
    for j, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:j + 1]
    return tokens
