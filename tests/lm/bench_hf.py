"""Latency of the HF backend (not a test; run by hand).

    python tests/lm/bench_hf.py default --blocks 16,32,64 --reps 3
    python tests/lm/bench_hf.py default --threads 1 --cpu-time   # on a shared, busy machine

Prints, per block size: the canonical prefill of a 300-token prompt (time to the first token),
the per-token decode time, and the engine's usual next call (the same prompt grown by 4 tokens,
n = 4) with and without session reuse. Also the plain single-forward prefill of the 300 tokens
(not canonical; what a non-deterministic backend would pay). Times are the minimum over
``--reps`` runs (robust to a shared CPU).
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch


CLOCK = time.perf_counter  # --cpu-time: time.process_time (CPU seconds of this process)


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def main() -> None:
    from ralmspec.lm.models import load_lm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="random-small")
    ap.add_argument("--blocks", default="16")
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="report CPU seconds of this process instead of wall time: with --threads 1 "
                         "this approximates an idle core when the machine is shared")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_lm(args.model, device=args.device, dtype=args.dtype)
    n_params = sum(p.numel() for p in lm.model.parameters()) / 1e6
    print(f"model {args.model} ({n_params:.0f}M params, {args.dtype}, {args.device}), "
          f"torch threads {torch.get_num_threads()}, {'CPU' if args.cpu_time else 'wall'} time, "
          f"load average {os.getloadavg()[0]:.1f}")
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 30000) for _ in range(args.prompt_len)]
    grown = prompt + [rng.randrange(1000, 30000) for _ in range(4)]
    with torch.inference_mode():
        x = torch.tensor([prompt], device=lm.device)
        lm.model(input_ids=x, logits_to_keep=1)
        single = _best(lambda: lm.model(input_ids=x, logits_to_keep=1), args.reps)
    print(f"  single-forward prefill {args.prompt_len} tokens (not canonical): {1000 * single:.0f} ms")
    for b in (int(v) for v in args.blocks.split(",")):
        lm.block_size = b
        lm.close()
        pre = _best(lambda: lm.greedy([prompt], 1), args.reps)
        g33 = _best(lambda: lm.greedy([prompt], 33), args.reps)
        dec = (g33 - pre) / 32

        def reuse_call() -> None:
            lm.greedy([grown], 4, sessions=["s"])

        def prime_then_reuse() -> float:
            lm.release("s")
            lm.greedy([prompt], 4, sessions=["s"])
            t0 = CLOCK()
            reuse_call()
            return CLOCK() - t0

        reuse = min(prime_then_reuse() for _ in range(args.reps))
        st = lm.last_call_stats
        fresh = _best(lambda: lm.greedy([grown], 4), args.reps)
        print(f"  B={b}: canonical prefill {args.prompt_len} -> first token {1000 * pre:.0f} ms | "
              f"decode {1000 * dec:.1f} ms/token | +4-token call, n=4: reuse {1000 * reuse:.0f} ms "
              f"(reused {st.reused_tokens}, computed {st.prefill_tokens_computed}) vs "
              f"no reuse {1000 * fresh:.0f} ms  [load average {os.getloadavg()[0]:.1f}]")


if __name__ == "__main__":
    main()
