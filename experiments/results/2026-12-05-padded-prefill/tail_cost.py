"""A prompt tail of t tokens on the CPU: one t-row forward (CPU default) vs the same block padded
to 64 rows (CUDA's layout, where it is a captured graph). SmolLM2, 2 threads, median of 5.

    python experiments/results/2026-12-05-padded-prefill/tail_cost.py
"""
import statistics
import time

import torch

from ralmspec.lm.models import load_lm
from ralmspec.lm.static import StaticRunner

torch.set_num_threads(2)
lm = load_lm("smollm2")
plain = StaticRunner(lm.model, max_len=512, capacity=1)
padded = StaticRunner(lm.model, max_len=512, capacity=1, prefill_rows=64)
prefix = list(range(1000, 1256))
with torch.inference_mode():
    slots = {}
    for name, r in (("plain", plain), ("padded", padded)):
        slots[name] = r.open()
        r.prefill_block(slots[name], prefix, last=False, want_hidden=False)
    for t in (1, 5, 16, 32, 63):
        times = {"plain": [], "padded": []}
        for _ in range(6):
            for name, r in (("plain", plain), ("padded", padded)):
                r.crop(slots[name], 256)
                s = time.perf_counter()
                r.prefill_block(slots[name], list(range(2000, 2000 + t)), last=True, want_hidden=False)
                times[name].append(time.perf_counter() - s)
        m = {k: 1e3 * statistics.median(v[1:]) for k, v in times.items()}
        print(f"tail {t:2d} tokens: {m['plain']:6.1f} ms as {t} rows, {m['padded']:6.1f} ms padded to 64", flush=True)
