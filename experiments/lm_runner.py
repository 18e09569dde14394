"""LM runners side by side: ms per generated token, eager vs static, on the device in use.

    python experiments/lm_runner.py --model smollm2 --device cpu --threads 2 --json out.json
    python experiments/lm_runner.py --model smollm2 --device cuda --dtype bfloat16
    python experiments/lm_runner.py --model smollm2 --threads 2 --runners eager,static,batched \
        --batch 1,8 --prompt 64 --new 32


Two shapes of work per runner, the same prompts for every runner (random token ids of the
model's vocabulary, seeded), every runner starting cold:
- ``chunk``: one call that decodes ``--new`` tokens after a ``--prompt``-token prompt (pure
  decode; the static runner syncs with the host once per 16 tokens);
- ``engine``: the RaLM engine's pattern, ``--new`` tokens in calls of ``--stride`` tokens, each
  call's prompt = the previous prompt + what was generated (the session reuses full blocks and
  re-prefills the rest), as ``ralmspec generate`` does while the passage stays the same.
With ``--batch B1,B2,..``, instead: ``batch``: one ``generate`` call of B prompts (as the serving
scheduler makes for B concurrent requests), ``--new`` tokens each, the runners over one loaded
model taking turns call by call (ratios survive a loaded machine); reported per batch size:
decode ms per step (the time to advance every row by one token: the eager and static runners
run the rows one by one, the batched runner steps them in one forward) and per row-token.
With ``--temperature T [--top-p P --seed S]`` every call draws its tokens with the seeded rule
(``ralmspec.lm.sampling``) instead of greedy: on CUDA the static runners draw on the device
(one sync per chunk) and on the CPU on the host; ``--draws host|device`` forces either (host:
one sync per token), the comparison that says what drawing on the device saves.
Tokens of every runner are compared with the first runner's (equal in practice, not promised
bit for bit: ralmspec/lm/runner.py). Timings are the median over ``--repeats`` prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time


def _sync(lm) -> None:
    import torch

    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def decoded(lm, prompts: list[list[int]], n: int, sessions: list, sampling=None, start: int = 0) -> list[list[int]]:
    """``n`` tokens after each prompt: greedy, or drawn with ``sampling`` (a ``Sampling``) from
    answer position ``start`` on."""
    if sampling is None:
        return lm.greedy(prompts, n, sessions)
    return lm.generate(prompts, n, sessions, [sampling.at(start)] * len(prompts))


def measure(lm, prompts: list[list[int]], new: int, stride: int, sampling=None) -> dict:
    chunk_ms, engine_ms, outs = [], [], []
    decoded(lm, [prompts[0]], new, ["warm"], sampling)  # first-use costs (allocation, graph capture) not timed
    decoded(lm, [prompts[0] + [1]], stride, ["warm"], sampling)
    for i, p in enumerate(prompts):
        _sync(lm)
        t = time.perf_counter()
        out = decoded(lm, [p], new, [f"c{i}"], sampling)[0]
        _sync(lm)
        chunk_ms.append((time.perf_counter() - t) * 1e3 / max(1, len(out)))
        gen: list[int] = []
        lm.greedy([p], 1, [f"e{i}"])  # the session holds the prompt's blocks, as after a retrieval
        _sync(lm)
        t = time.perf_counter()
        while len(gen) < new:
            step = decoded(lm, [p + gen], min(stride, new - len(gen)), [f"e{i}"], sampling, len(gen))[0]
            gen += step
            if step and step[-1] in lm.stop_token_ids:
                break
        _sync(lm)
        engine_ms.append((time.perf_counter() - t) * 1e3 / max(1, len(gen)))
        outs.append((out, gen))
    return {"chunk_ms_per_token": statistics.median(chunk_ms),
            "engine_ms_per_token": statistics.median(engine_ms), "outputs": outs}


def measure_batch(lms: dict, prompts: list[list[int]], new: int, sizes: list[int], repeats: int,
                  sampling=None) -> dict:
    """Decode time of one ``generate`` call of B prompts, per runner (``lms``: name -> backend
    over the same weights) and per B in ``sizes``: the runners take turns call by call, so
    machine load hits them alike; median of ``repeats`` calls with fresh sessions after one
    warm-up call each. Returns ``{runner: {B: {...}}}`` and every call's tokens."""
    times: dict = {name: {b: [] for b in sizes} for name in lms}
    outs: dict = {name: [] for name in lms}
    for b in sizes:
        for rep in range(repeats + 1):
            for name, lm in lms.items():
                _sync(lm)
                got = decoded(lm, prompts[:b], new, [f"b{b}-{rep}-{i}" for i in range(b)], sampling)
                _sync(lm)
                steps = max(1, max(len(g) for g in got) - 1)  # the first token comes from the prefill
                if rep:
                    times[name][b].append(lm.last_call_stats.decode_s * 1e3 / steps)
                outs[name].append(got)
    rows = {name: {b: {"decode_ms_per_step": round(statistics.median(v), 1),
                       "decode_ms_per_row_token": round(statistics.median(v) / b, 1)} for b, v in per.items()}
            for name, per in times.items()}
    return {"batch": rows, "outputs": outs}


def run_batch(a, dtype: str) -> list[dict]:
    """``--batch``: the runners over ONE loaded model, interleaved (``measure_batch``)."""
    from ralmspec.lm.hf import HFLanguageModel
    from ralmspec.lm.loader import load_language_model

    base = load_language_model(a.model, device=a.device, dtype=dtype, runner="eager")
    lms = {name: HFLanguageModel(base.model, base.tokenizer, eos_token_id=base.eos_token_id,
                                 stop_token_ids=base.stop_token_ids, max_context=base.max_context,
                                 device=base.device, runner=name) for name in a.runners.split(",")}
    sizes = [int(b) for b in a.batch.split(",")]
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, base.vocab_size) for _ in range(a.prompt)] for _ in range(max(sizes))]
    for lm in lms.values():
        set_draws(lm, a.draws, a.attention)
    m = measure_batch(lms, prompts, a.new, sizes, a.repeats, sampling_of(a))
    first = next(iter(lms))
    rows = []
    for name, per in m["batch"].items():
        same = sum(x == y for x, y in zip(m["outputs"][name], m["outputs"][first])) / len(m["outputs"][first])
        for b, r in per.items():
            print(f"{name:>7}: batch {b}: decode {r['decode_ms_per_step']:.1f} ms/step, "
                  f"{r['decode_ms_per_row_token']:.1f} ms/row-token", flush=True)
        print(f"{name:>7}: same tokens as {first}: {same:.0%}", flush=True)
        rows.append({"runner": name, "batch": per, "tokens_equal_to_first_runner": same})
    return rows


def sampling_of(a):
    """The ``Sampling`` of ``--temperature/--top-p/--seed``, or None (greedy)."""
    if not a.temperature:
        return None
    from ralmspec.lm.sampling import Sampling

    return Sampling(temperature=a.temperature, top_p=a.top_p, seed=a.seed)


def set_draws(lm, where: str, attention: str = "auto") -> None:
    """``--draws``: where a static runner draws its seeded tokens (``auto``: the runner's default);
    ``--attention``: its grouped-query attention layout (``cuda``: packed / repeated for the fused
    masked kernel, CUDA's default; ``gqa``: SDPA's ``enable_gqa``, the CPU's)."""
    if where != "auto" and hasattr(lm.runner, "device_sampling"):
        lm.runner.device_sampling = where == "device"
    if attention != "auto" and hasattr(lm.runner, "decoder"):
        lm.runner.decoder.cuda_attention = attention == "cuda"
        lm.runner._drop_graphs()  # graphs captured already (the compiled runner's first span) hold the old layout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--runners", default="eager,static")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: library default)")
    ap.add_argument("--prompt", type=int, default=300, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="generated tokens per prompt")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", default=None, help="batch sizes, e.g. 1,8: measure one generate call of B "
                    "prompts instead of the chunk / engine patterns")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: seeded sampling instead of greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", choices=("auto", "host", "device"), default="auto",
                    help="where static runners draw sampled tokens (auto: on the device on CUDA, the host on the CPU)")
    ap.add_argument("--attention", choices=("auto", "cuda", "gqa"), default="auto",
                    help="static runners' grouped-query attention layout (auto: cuda on CUDA, gqa on the CPU)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch

    from ralmspec.lm.loader import load_language_model, resolve_lm_dtype

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = resolve_lm_dtype(a.dtype, a.device)
    rows, ref = (run_batch(a, dtype) if a.batch else []), None
    for name in ([] if a.batch else a.runners.split(",")):
        t = time.perf_counter()
        try:
            lm = load_language_model(a.model, device=a.device, dtype=dtype, runner=name)
            set_draws(lm, a.draws, a.attention)
            load_s = time.perf_counter() - t
            rng = random.Random(0)
            prompts = [[rng.randrange(1000, lm.vocab_size) for _ in range(a.prompt)] for _ in range(a.repeats)]
            m = measure(lm, prompts, a.new, a.stride, sampling_of(a))
        except Exception as exc:  # noqa: BLE001 - report the failure, measure the other runners
            print(f"{name:>7}: FAILED {type(exc).__name__}: {exc}", flush=True)
            rows.append({"runner": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        outs = m.pop("outputs")
        same = None if ref is None else sum(x == y for x, y in zip(outs, ref)) / len(outs)
        ref = ref or outs
        row = {"runner": lm.runner.name, "device_sampling": getattr(lm.runner, "device_sampling", None),
               "cuda_attention": getattr(getattr(lm.runner, "decoder", None), "cuda_attention", None),
               "load_s": round(load_s, 2), **{k: round(v, 3) for k, v in m.items()},
               "tokens_equal_to_first_runner": same}
        rows.append(row)
        print(f"{row['runner']:>7}: chunk {row['chunk_ms_per_token']:.2f} ms/token, engine pattern "
              f"{row['engine_ms_per_token']:.2f} ms/token (stride {a.stride}), same tokens as "
              f"{rows[0]['runner']}: {'-' if same is None else f'{same:.0%}'}", flush=True)
        lm.close()
        del lm
    summary = {"model": a.model, "device": a.device, "dtype": dtype, "threads": torch.get_num_threads(),
               "prompt_tokens": a.prompt, "new_tokens": a.new, "stride": a.stride, "repeats": a.repeats,
               "batch": a.batch, "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed,
               "draws": a.draws, "attention": a.attention,
               "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None, "runners": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
