"""The model's forward over KV slots: what the static runner (``ralmspec.lm.static``) runs.

gpt-fast keeps the model (``model.py``: the transformer over a preallocated KV cache) apart from
the loop that drives it (``generate.py``); this module is the first half. ``SlotDecoder`` runs a
HuggingFace model's layer stack over a session's *slot* (per layer a key and a value buffer
``[1, kv_heads, max_len, head_dim]``, written in place at the positions a forward covers) or
over several slots at once (``KVPool``: rows of one pooled buffer addressed by device-side
indices, so a captured CUDA graph serves any slots), with no HF cache object.

- **The model's own modules.** Embeddings, MLPs, projections, the rotary table and the norms'
  weights are the HF model's, so it runs exactly the model the eager runner runs; only the
  attention's KV handling is replaced. A Llama norm's statistics run as one ``F.rms_norm`` and
  a rotation as one roll (``_rms_norm``, ``_rotate``: fewer kernels per step, the modules' bits
  on the CPU, tested). Supported families: Llama-style (``llama``, ``qwen2``, ``mistral``;
  SmolLM2 is a Llama) and ``gpt2``, with the limits ``static_unsupported`` states; any other
  model keeps the eager runner.
- **Attention by position.** A forward ending at position ``e`` attends over the first
  ``attention_span(e)`` keys of its slot (a function of the position alone), masked by
  position, so stale entries past a slot's length are never read and a row's shapes do not
  depend on its history or its neighbours: the canonical numerics of ``ralmspec.lm.hf``.
- **Attention on CUDA** (``cuda_attention``): a masked grouped-query call has no fused kernel
  there, so a single query row's heads are packed as rows of their KV head and a prompt block's
  K and V heads are repeated (``SlotDecoder._sdpa``), and a pooled decode step attends once per
  run of equal spans in one fixed-row call (``SpanGroup``), not once per row; on the CPU SDPA's
  ``enable_gqa``, row by row.

No state but the model's weights, the rotary tables and cached key indices: slots, graphs and
decoding live in the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

LLAMA_TYPES = ("llama", "qwen2", "mistral")  # the same layer: a Mistral is a Llama with an optional window
STATIC_TYPES = LLAMA_TYPES + ("gpt2",)
MIN_SPAN = 64


def rope_types(model: torch.nn.Module) -> set[str]:
    """The ``rope_type`` of every rotary module of ``model`` (``"default"``, ``"linear"``,
    ``"llama3"``, ``"yarn"``, ``"dynamic"``, ``"longrope"``...); empty without rotary modules."""
    found: set[str] = set()
    for m in model.modules():
        kind = getattr(m, "rope_type", None)
        found.update(k for k in (kind.values() if isinstance(kind, dict) else [kind]) if isinstance(k, str))
    return found


def sliding_windows(model: torch.nn.Module) -> set[int]:
    """The attention windows of ``model``'s sliding-window layers (empty: full attention only),
    from its modules (Qwen2 keeps a layer's window there) and its config (Mistral reads it from
    the config at each call; Qwen2 sets it to None unless ``use_sliding_window``)."""
    found = {w for m in model.modules() if isinstance(w := getattr(m, "sliding_window", None), int) and w > 0}
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None)
    if isinstance(window, int) and window > 0 and getattr(cfg, "use_sliding_window", True) is not False:
        layer_types = getattr(cfg, "layer_types", None)
        if not layer_types or "sliding_attention" in layer_types:
            found.add(window)
    return found


def static_unsupported(model: torch.nn.Module, max_len: int | None = None) -> str | None:
    """Why the static runner (slots of ``max_len`` positions; ``None``: any) cannot run
    ``model`` exactly as the eager runner does, or ``None``.

    Only the families it implements (``STATIC_TYPES``); only attention over every earlier
    position: a sliding-window layer whose window is shorter than a slot would be run as full
    attention, silently another model (a window of at least ``max_len`` positions never leaves
    one out); and only rotary tables that are a function of the position (the table is
    evaluated once for every position, ``SlotDecoder``): ``longrope`` switches its factors with
    the length of each forward call and ``dynamic`` with the longest call so far (refused for
    every HF runner: ``ralmspec.lm.hf``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in STATIC_TYPES:
        return f"it supports {', '.join(STATIC_TYPES)} models, not {model_type!r}"
    window = min(sliding_windows(model), default=None)
    if window is not None and (max_len is None or window < max_len):
        return (f"it implements full attention only, and this model has sliding-window layers (window {window}, "
                f"shorter than the {max_len or 'unbounded'}-position context)")
    by_call = sorted(t for t in rope_types(model) if "dynamic" in t or t == "longrope")
    if by_call:
        return f"its rotary table is one function of the position, and rope_type {by_call[0]!r} changes with the call"
    return None


def supports_static(model: torch.nn.Module, max_len: int | None = None) -> bool:
    """True when the static runner runs ``model`` exactly (``static_unsupported``)."""
    return static_unsupported(model, max_len) is None


def attention_span(end: int, max_len: int) -> int:
    """Keys read by a forward whose last position is ``end - 1``: the next power of two >= end
    (at least ``MIN_SPAN``, at most ``max_len``). A function of the position alone (module doc)."""
    span = MIN_SPAN
    while span < end:
        span *= 2
    return min(span, max_len)


@dataclass
class Slot:
    """One session's KV buffers: ``keys[l]`` / ``values[l]`` are ``[1, kv_heads, max_len, hd]``."""

    index: int
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # positions whose KV is valid


@dataclass
class KVPool:
    """The batch-invariant mode's KV: per layer one key and one value buffer
    ``[capacity + 1, kv_heads, max_len, hd]`` (every slot's buffers are views of one row of it;
    the last row is the padding rows' spare), and ``rows``: the slot index of each row of the
    current step, on the device, so a captured step serves any slots."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    rows: torch.Tensor
    spare: torch.Tensor  # ``[batch_rows]``, every entry the spare slot's index: padding for a span group
    # read a row's keys by its device-side index (a copy; what a captured step needs), or, with no
    # graphs to capture, through its slot's view (no copy); the same values either way
    gather: bool = True


@dataclass
class SpanGroup:
    """Rows ``[start, end)`` of a pooled decode step that attend over the same ``span`` (the rows
    run sorted by span, ``step_order``), attended in ONE call of the step's fixed row count
    (``cuda_attention``): ``rows`` = their slots' indices, then the spare slot's as padding;
    ``mask`` ``[rows, 1, 1, span]``, additive, zeros on the padding."""

    start: int
    end: int
    span: int
    rows: torch.Tensor
    mask: torch.Tensor


class SlotDecoder:
    """The model's layer stack over slot buffers (Llama-style or GPT-2), no HF cache object."""

    def __init__(self, model: torch.nn.Module, max_len: int, cuda_attention: bool = False) -> None:
        cfg = model.config
        self.cuda_attention = cuda_attention  # grouped-query attention laid out for CUDA (``_sdpa``)
        self.model = model
        self.kind = "gpt2" if cfg.model_type == "gpt2" else "llama"
        dev = next(model.parameters()).device
        if self.kind == "gpt2":
            t = model.transformer
            self.embed, self.layers, self.norm = t.wte, list(t.h), t.ln_f
            self.n_heads = self.n_kv = cfg.n_head
            self.head_dim = cfg.n_embd // cfg.n_head
            # per layer: ``scale_attn_by_inverse_layer_idx`` divides layer i's by i + 1
            self.scales = [blk.attn.scaling for blk in self.layers]
            self.cos = self.sin = None
        else:
            t = model.model
            self.embed, self.layers, self.norm = t.embed_tokens, list(t.layers), t.norm
            attn = self.layers[0].self_attn
            self.head_dim = attn.head_dim
            self.n_heads = cfg.num_attention_heads
            self.n_kv = cfg.num_key_value_heads
            self.scales = [blk.self_attn.scaling for blk in self.layers]
            # the model's own rotary module, evaluated once for every position; the sine's first
            # half negated, so that a rotation is a roll (``_rotate``)
            probe = torch.zeros(1, dtype=next(model.parameters()).dtype, device=dev)
            pos = torch.arange(max_len, device=dev)[None]
            cos, sin = t.rotary_emb(probe, pos)
            half = self.head_dim // 2
            self.cos = cos[0]  # [max_len, head_dim]
            self.sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
            self.norms = [(_rms_norm(b.input_layernorm), _rms_norm(b.post_attention_layernorm)) for b in self.layers]
            self.final_norm = _rms_norm(self.norm)
        self.lm_head = model.get_output_embeddings()
        self.dtype = next(model.parameters()).dtype
        self.device = dev
        self.spans: dict[int, torch.Tensor] = {}

    def key_index(self, span: int) -> torch.Tensor:
        idx = self.spans.get(span)
        if idx is None:
            idx = self.spans[span] = torch.arange(span, device=self.device)
        return idx

    def forward(self, slots: Sequence[Slot | None], ids: torch.Tensor, pos: torch.Tensor,
                spans: Sequence[int | None], pool: KVPool | None = None) -> torch.Tensor:
        """Final hidden states ``[b, t, d]`` (after the last norm) of ``ids [b, t]`` at positions
        ``pos [b, t]``: row ``r`` writes its KV into ``slots[r]`` and attends to that slot's first
        ``spans[r]`` keys only (``None``: a padding row, no attention). The projections and MLPs
        run over all ``b`` rows at once; attention runs row by row, so a row's attention has the
        same shapes whatever its neighbours. Without ``pool`` (one row) the KV is read and written
        through the slot's own buffers; with it (``b`` rows: a decode step, ``t`` = 1, or prompt
        blocks, ``t`` = ``prefill_rows``) through the pooled buffers at the device-side slot
        indices ``pool.rows``, so the slots are data, not addresses. Shapes depend on
        ``(b, t, spans)`` only: a 1-row forward per (slot, span) and a pooled one per ``spans``
        can be captured as CUDA graphs."""
        # causal by position, additive (0 / -inf in the model's dtype), made once per forward: a
        # boolean mask would be converted by SDPA in every layer (the same bits: tested)
        masks = [None if span is None else torch.zeros(pos.shape[1], span, dtype=self.dtype, device=self.device)
                 .masked_fill_(self.key_index(span)[None, :] > pos[r][:, None], float("-inf"))
                 for r, span in enumerate(spans)]
        groups = (self._span_groups(spans, masks, pool)
                  if pool is not None and self.cuda_attention and ids.shape[1] == 1 else None)
        h = self.embed(ids)
        if self.kind == "gpt2":
            h = h + self.model.transformer.wpe(pos)
            for i, blk in enumerate(self.layers):
                q, k, v = blk.attn.c_attn(blk.ln_1(h)).split(blk.attn.split_size, dim=2)
                a = self._attend(slots, i, self._heads(q, self.n_heads), self._heads(k, self.n_kv),
                                 self._heads(v, self.n_kv), pos, spans, masks, pool, groups)
                h = h + blk.attn.c_proj(a)
                h = h + blk.mlp(blk.ln_2(h))
        else:
            b, t = ids.shape
            nq = self.n_heads
            cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # [b, t, 1, head_dim]
            for i, blk in enumerate(self.layers):
                at, (norm_in, norm_post) = blk.self_attn, self.norms[i]
                x = norm_in(h)
                # queries and keys rotated together: one rotation's kernels, not two
                qk = torch.cat((at.q_proj(x), at.k_proj(x)), dim=-1).view(b, t, nq + self.n_kv, self.head_dim)
                qk = _rotate(qk, cos, sin)
                q, k = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2)
                v = self._heads(at.v_proj(x), self.n_kv)
                h = h + at.o_proj(self._attend(slots, i, q, k, v, pos, spans, masks, pool, groups))
                h = h + blk.mlp(norm_post(h))
            return self.final_norm(h)
        return self.norm(h)

    def logits(self, hidden_row: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_row)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)

    def _span_groups(self, spans: Sequence[int | None], masks: Sequence[torch.Tensor | None],
                     pool: KVPool) -> list[SpanGroup]:
        """The runs of equal spans of a pooled decode step (``SpanGroup``), made once per forward."""
        b, out, r = len(spans), [], 0
        while r < b:
            span, end = spans[r], r + 1
            if span is None:
                r += 1
                continue
            while end < b and spans[end] == span:
                end += 1
            pad = b - (end - r)
            mask = torch.cat([m for m in masks[r:end] if m is not None]
                             + [torch.zeros(pad, span, dtype=self.dtype, device=self.device)])
            out.append(SpanGroup(r, end, span, torch.cat((pool.rows[r:end], pool.spare[:pad])),
                                  mask[:, None, None, :]))
            r = end
        return out

    def _attend(self, slots: Sequence[Slot | None], layer: int, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, pos: torch.Tensor, spans: Sequence[int | None],
                masks: Sequence[torch.Tensor | None], pool: KVPool | None,
                groups: list[SpanGroup] | None = None) -> torch.Tensor:
        b, _, t, _ = q.shape
        if pool is None:  # one row, through its slot's own buffers
            assert b == 1 and slots[0] is not None and spans[0] is not None, "an unpooled forward is one row"
            kc, vc = slots[0].keys[layer], slots[0].values[layer]
            kc.index_copy_(2, pos[0], k)
            vc.index_copy_(2, pos[0], v)
            span = spans[0]
            out = self._sdpa(q, kc[:, :, :span], vc[:, :, :span], masks[0], layer)
        else:  # b rows of t positions each: one write for all rows, then each row reads its own slot
            kp, vp = pool.keys[layer], pool.values[layer]
            at = (pool.rows[:, None], slice(None), pos)  # -> [b, t, kv, hd]; padding rows: the spare slot
            kp[at] = k.transpose(1, 2)
            vp[at] = v.transpose(1, 2)
            out = q.new_zeros(q.shape)
            if groups is not None:  # a decode step with ``cuda_attention``: one call per span group
                for g in groups:
                    n = g.end - g.start
                    kr, vr = (_group_rows(p, g, pool.gather,
                                          [getattr(slots[r], name)[layer] for r in range(g.start, g.end)])
                              for p, name in ((kp, "keys"), (vp, "values")))
                    qg = torch.cat((q[g.start:g.end], q.new_zeros((b - n,) + tuple(q.shape[1:]))))
                    out[g.start:g.end] = self._sdpa(qg, kr, vr, g.mask, layer)[:n]
            else:  # one call per row
                for r, span in enumerate(spans):
                    if span is None:
                        continue
                    if pool.gather:  # [1, kv, span, hd] gathered by device index: no host sync
                        row = pool.rows[r:r + 1]
                        kr, vr = kp[row, :, :span], vp[row, :, :span]
                    else:
                        slot = slots[r]
                        assert slot is not None
                        kr, vr = slot.keys[layer][:, :, :span], slot.values[layer][:, :, :span]
                    out[r:r + 1] = self._sdpa(q[r:r + 1], kr, vr, masks[r], layer)
        return out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              layer: int) -> torch.Tensor:
        """Attention of ``q [b, heads, t, d]`` over ``k, v [b, kv_heads, span, d]`` with the
        additive causal-by-position ``mask`` (``[t, span]``, or ``[b, 1, t, span]`` for a span
        group: ``b`` rows, each over its own keys). Grouped-query (kv_heads < heads) with a mask has
        no fused kernel on CUDA: SDPA falls back to its math kernel (about ten kernels, the K and
        V heads repeated); so with ``cuda_attention`` (on CUDA) a single query row has its heads
        packed as rows of their KV head (``[1, kv_heads, heads / kv_heads, d]``: every packed
        row sits at the same position, so the one mask row serves all), and several query rows
        get the K and V heads repeated first, so that SDPA takes its fused masked kernel
        (transformers' ``pack_gqa`` / ``repeat_kv`` for the same reason). Each row of the
        result is a function of that row's inputs in both layouts, so the canonical numerics
        hold; the layouts are not the same bits as ``enable_gqa`` (on this CPU, SmolLM2's step:
        float32 logits within ~4e-5, bfloat16 ones by bfloat16 steps), so one runner keeps one
        layout. ``layer`` picks the layer's attention scale."""
        scale = self.scales[layer]
        groups = self.n_heads // self.n_kv
        if groups == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        if not self.cuda_attention:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        b, h, t, d = q.shape
        if t == 1:  # (a mask of [t, span] or [b, 1, 1, span] serves every packed row)
            packed = q.reshape(b, self.n_kv, groups, d)
            return F.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=scale).reshape(b, h, 1, d)
        k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _group_rows(pooled: torch.Tensor, g: SpanGroup, gather: bool, views: list[torch.Tensor]) -> torch.Tensor:
    """A span group's keys (or values), ``[len(g.rows), kv, span, hd]``: gathered from the pooled
    buffer by the device-side indices (what a captured step does), or concatenated from the
    slots' views and the spare slot's row (the same values)."""
    if gather:
        return pooled[g.rows, :, :g.span]
    pad = len(g.rows) - len(views)
    return torch.cat([v[:, :, :g.span] for v in views] + [pooled[-1:, :, :g.span]] * pad)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding, ``x * cos + cat(-x2, x1) * sin`` with ``x = cat(x1, x2)``, as
    ``x * cos + roll(x) * signed_sin`` (``signed_sin`` = ``cat(-sin1, sin2)``): the same bits,
    since ``(-a) * b == a * (-b)`` exactly, in four kernels instead of five (neg and cat become
    one roll)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _rms_norm(norm: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Llama / Qwen2 RMSNorm module's function with its rounding kept (the statistics in
    float32, the normalized input rounded to the model's dtype, then times the weight in that
    dtype), in two kernels instead of eight: ``F.rms_norm`` without a weight computes in float32
    and returns the input's dtype (one fused kernel on CUDA, where its reduction may round
    unlike ``mean``: the static runner's own numerics, docs/lm-runner.md; on the CPU the
    module's own ops, so its bits, tested in float32, bfloat16 and float16), then the weight's
    multiply. A module that does not carry HF's ``weight`` and ``variance_epsilon`` runs as is."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(eps, float) or not hasattr(F, "rms_norm"):
        return norm
    shape = (weight.shape[-1],)

    def rms_norm(x: torch.Tensor) -> torch.Tensor:
        return weight * F.rms_norm(x, shape, None, eps)
    return rms_norm
