"""What one decode step of the static runner launches: ops (CPU) or kernels (CUDA) per token.

    python experiments/step_ops.py --model smollm2 --threads 2
    python experiments/step_ops.py --model smollm2 --device cuda --json out.json

On a GPU the captured 1-row step is bound by its kernels, not by its FLOPs (SmolLM2 on an H200:
~1,200 kernels, 7.0 ms/token, where the weights' bytes take well under 0.1 ms): fewer kernels
per step is what makes it faster. This counts them: the 1-row step (``step_logits``, the step
``decode`` runs, uncaptured so the profiler sees each op) at a 300-token position, or with
``--rows N`` the batched runner's 8-row step with N live sessions, ``--steps`` times under
``torch.profiler``, per step:
- ``cuda_kernels``: kernels launched on the GPU (CUDA only): what a captured graph replays
  (and by name: which attention kernel ``scaled_dot_product_attention`` picked for the masked,
  grouped-query row is among them);
- ``ops``: the ATen ops the step's Python code dispatches (outermost ops; views, allocations and
  other metadata-only ops, ``VIEW_OPS``, left out): on the CPU the closest count to "kernels"
  there is (a composite such as ``mean`` counts once), each a dispatch of a few microseconds;
and the top ``--top`` by name, and the step's wall time uncaptured (the median, after
``--warmup`` steps). Not a benchmark of the runner (``experiments/lm_runner.py`` is).

``--compare``: the same for the step as written until session 13 (``legacy_forward``: the HF
norm modules, eight ops each, queries and keys rotated apart by ``neg`` + ``cat``), its logits
compared bit for bit with today's, both timed in ``--rounds`` alternated rounds over one loaded
model.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

VIEW_OPS = frozenset({
    "aten::view", "aten::as_strided", "aten::transpose", "aten::slice", "aten::select", "aten::unsqueeze",
    "aten::squeeze", "aten::expand", "aten::t", "aten::permute", "aten::_reshape_alias", "aten::alias",
    "aten::detach", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resolve_conj",
    "aten::resolve_neg", "aten::lift_fresh", "aten::result_type", "aten::_unsafe_view", "aten::unflatten",
    "aten::reshape", "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::narrow",
    "aten::contiguous", "aten::_has_compatible_shallow_copy_type", "aten::is_nonzero",
})


def one_step(runner, slots: list, token: int) -> None:
    """One decode step at the slots' positions, which it leaves where they were (so every step
    has the same shapes): ``step_logits`` for one slot; for several, the batched runner's
    ``batch_rows``-row step over all of them (``_step_rows``, what ``decode_batch`` runs)."""
    import torch

    start = [s.length for s in slots]
    if len(slots) == 1:
        runner.step_logits(slots[0], token)
    else:
        runner._step_rows(slots, torch.full((len(slots),), token, device=runner.decoder.device))
    for s, n in zip(slots, start):
        s.length = n


def count_step(runner, slots: list, token: int, steps: int, device) -> dict:
    """Profile ``steps`` steps (``one_step``); ops and kernels per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            one_step(runner, slots, token)
        if device.type == "cuda":
            torch.cuda.synchronize()
    ops: collections.Counter[str] = collections.Counter()
    kernels: collections.Counter[str] = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name[:120]] += 1
        elif (ev.name.startswith("aten::") and ev.name not in VIEW_OPS
              and (ev.cpu_parent is None or not ev.cpu_parent.name.startswith("aten::"))):
            ops[ev.name] += 1
    return {"ops_per_step": sum(ops.values()) / steps,
            "cuda_kernels_per_step": sum(kernels.values()) / steps if device.type == "cuda" else None,
            "ops_by_name": {k: v / steps for k, v in ops.most_common()},
            "cuda_kernels_by_name": {k: v / steps for k, v in kernels.most_common()}}


def time_step(runner, slots: list, token: int, steps: int, warmup: int, device) -> float:
    import torch

    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        one_step(runner, slots, token)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def legacy_forward(runner):
    """Switch ``runner``'s decoder to session 12's Llama forward (``--compare``): HF's norm
    modules (eight ops each), queries and keys rotated apart by ``neg`` + ``cat``, grouped-query
    attention by SDPA's ``enable_gqa`` (no ``cuda_attention`` layout). Returns the undo."""
    import torch

    d = runner.decoder
    half = d.head_dim // 2
    plain_sin = torch.cat((-d.sin[:, :half], d.sin[:, half:]), dim=-1)  # the model's own table

    def rotate(x, cos, sin):
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def forward(slots, ids, pos, spans, pool=None):
        masks = [None if span is None else d.key_index(span)[None, :] <= pos[r][:, None]
                 for r, span in enumerate(spans)]
        cos, sin, h = d.cos[pos][:, None], plain_sin[pos][:, None], d.embed(ids)
        for i, blk in enumerate(d.layers):
            x = blk.input_layernorm(h)
            proj = blk.self_attn
            q = rotate(d._heads(proj.q_proj(x), d.n_heads), cos, sin)
            k = rotate(d._heads(proj.k_proj(x), d.n_kv), cos, sin)
            attn = d._attend(slots, i, q, k, d._heads(proj.v_proj(x), d.n_kv), pos, spans, masks, pool)
            h = h + proj.o_proj(attn)
            h = h + blk.mlp(blk.post_attention_layernorm(h))
        return d.norm(h)

    d.forward, layout, d.cuda_attention = forward, d.cuda_attention, False

    def undo() -> None:
        del d.forward
        d.cuda_attention = layout
    return undo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: library default)")
    ap.add_argument("--position", type=int, default=300, help="prompt tokens before the step")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps")
    ap.add_argument("--timed", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--attention", choices=("auto", "cuda", "gqa"), default="auto",
                    help="grouped-query attention layout (auto: cuda on CUDA, gqa on the CPU; StaticRunner.cuda_attention)")
    ap.add_argument("--rows", type=int, default=1, help="live rows: 1 = the 1-row step; 2..8 = the batched "
                    "runner's 8-row step with that many sessions (--lm-runner batched)")
    ap.add_argument("--compare", action="store_true", help="also the step of session 12 (module doc)")
    ap.add_argument("--rounds", type=int, default=6, help="--compare: alternated timing rounds")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch

    from ralmspec.lm.hf import BATCH_ROWS
    from ralmspec.lm.loader import resolve_lm_dtype
    from ralmspec.lm.models import load_lm
    from ralmspec.lm.static import StaticRunner

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = resolve_lm_dtype(a.dtype, a.device)
    lm = load_lm(a.model, device=a.device, dtype=dtype, runner="eager")
    layout = None if a.attention == "auto" else a.attention == "cuda"
    if not 1 <= a.rows <= BATCH_ROWS:
        ap.error(f"--rows must be in [1, {BATCH_ROWS}]")
    batched = a.rows > 1
    runner = StaticRunner(lm.model, max_len=a.position + 64, capacity=BATCH_ROWS if batched else 1,
                          batch_rows=BATCH_ROWS if batched else 1, cuda_graphs=False, cuda_attention=layout)
    if batched:
        runner._pooled().gather = lm.device.type == "cuda"  # read keys as CUDA's captured step does
    slots = [runner.open() for _ in range(a.rows)]
    ids = [1000 + (7 * i) % 5000 for i in range(a.position)]
    with torch.inference_mode():
        for slot in slots:
            for s in range(0, len(ids), 64):
                runner.prefill_block(slot, ids[s:s + 64], last=s + 64 >= len(ids), want_hidden=False)
        counted = count_step(runner, slots, 42, a.steps, lm.device)
        ms = time_step(runner, slots, 42, a.timed, a.warmup, lm.device)
        compare = None
        if a.compare and runner.decoder.kind != "llama":
            print(f"--compare: {a.model} is not a Llama-style model (its step did not change)", file=sys.stderr)
        elif a.compare:
            slot = slots[0]
            start = slot.length
            now_logits = runner.step_logits(slot, 42)[1].clone()
            undo = legacy_forward(runner)
            slot.length = start
            old_logits = runner.step_logits(slot, 42)[1].clone()
            slot.length = start
            old_count = count_step(runner, slots, 42, a.steps, lm.device)
            undo()
            times: dict[str, list[float]] = {"today": [], "session 12": []}
            for _ in range(a.rounds):
                times["today"].append(time_step(runner, slots, 42, a.timed, a.warmup, lm.device))
                undo = legacy_forward(runner)
                times["session 12"].append(time_step(runner, slots, 42, a.timed, a.warmup, lm.device))
                undo()
            compare = {"same_logits_bits": bool(torch.equal(now_logits, old_logits)),
                       "session12_ops_per_step": old_count["ops_per_step"],
                       "session12_cuda_kernels_per_step": old_count["cuda_kernels_per_step"],
                       "step_ms_by_round": {k: [round(x, 3) for x in v] for k, v in times.items()},
                       "step_ms_median": {k: round(statistics.median(v), 3) for k, v in times.items()}}
    out = {"model": a.model, "device": str(lm.device), "dtype": dtype, "threads": torch.get_num_threads(),
           "cuda_attention": runner.decoder.cuda_attention, "live_rows": a.rows, "runner": runner.name,
           "position": a.position, "torch": torch.__version__, "step_ms_uncaptured": round(ms, 3), **counted}
    kern = out["cuda_kernels_per_step"]
    print(f"{a.model} on {lm.device} ({dtype}): {out['ops_per_step']:.0f} ops per step"
          + ("" if kern is None else f", {kern:.0f} CUDA kernels") + f", {ms:.2f} ms per step uncaptured")
    for name, n in list(out["ops_by_name"].items())[:a.top]:
        print(f"  {n:7.1f}  {name}")
    if out["cuda_kernels_by_name"]:
        print("CUDA kernels per step (which attention kernel ran is among them):")
        for name, n in list(out["cuda_kernels_by_name"].items())[:a.top]:
            print(f"  {n:7.1f}  {name}")
    if compare is not None:
        out["compare"] = compare
        old_k = compare["session12_cuda_kernels_per_step"]
        med = compare["step_ms_median"]
        print(f"session 12's step: {compare['session12_ops_per_step']:.0f} ops"
              + ("" if old_k is None else f", {old_k:.0f} CUDA kernels")
              + f"; same logits bit for bit: {compare['same_logits_bits']}; uncaptured ms per step over "
              f"{a.rounds} alternated rounds (median): today {med['today']:.2f}, session 12 {med['session 12']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
