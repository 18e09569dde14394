"""Cost on the CPU of a prompt block in the three layouts of the static runners (SmolLM2, 2 threads):
[1, t] unpadded (the CPU default), [1, 64] padded (the 1-row runners on CUDA), [8, 64] pooled
(the batched runner on CUDA: sessions share the forward). A 5-token tail block after 128 held
positions, for 1 and for 8 sessions; median of 3 after one warm-up.

    python experiments/results/2026-12-05-pooled-prefill/block_cost.py
"""
import random
import statistics
import time

import torch

from ralmspec.lm.loader import load_language_model
from ralmspec.lm.static import StaticRunner

torch.set_num_threads(2)
lm = load_language_model("smollm2", device="cpu", runner="eager")
m = lm.model
rng = random.Random(0)
B = 64
kinds = {"[1, t] unpadded": StaticRunner(m, max_len=512, capacity=9),
         "[1, 64] padded": StaticRunner(m, max_len=512, capacity=9, prefill_rows=B),
         "[8, 64] pooled": StaticRunner(m, max_len=512, capacity=9, batch_rows=8, prefill_rows=B)}
head = [rng.randrange(1000, 40000) for _ in range(128)]
res = {k: {1: [], 8: []} for k in kinds}
with torch.inference_mode():
    for rep in range(4):
        for name, r in kinds.items():
            for rows in (1, 8):
                slots = [r.open() for _ in range(rows)]
                for s in slots:
                    r.prefill_block(s, head[:64], last=False, want_hidden=False); r.prefill_block(s, head[64:128], last=False, want_hidden=False)
                tails = [[rng.randrange(1000, 40000) for _ in range(5)] for _ in slots]
                t = time.perf_counter()
                r.prefill_blocks(slots, tails, [True] * rows, want_hidden=False)
                if rep: res[name][rows].append(time.perf_counter() - t)
                for s in slots: r.free(s)
for name, d in res.items():
    print(f"{name}: 5-token tail blocks of 1 session {statistics.median(d[1])*1e3:.1f} ms, of 8 sessions {statistics.median(d[8])*1e3:.1f} ms")
