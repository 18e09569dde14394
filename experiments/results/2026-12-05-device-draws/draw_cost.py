"""Host cost of one seeded draw over SmolLM2's vocabulary (49,152 ids), on this CPU: the host rule
(numpy, ``draw``) vs the device evaluation (torch, ``draw_on_device``) run on CPU tensors, for
top_p 1 and 0.9; and whether they agree over 300 positions.

    python experiments/results/2026-12-05-device-draws/draw_cost.py
"""
import statistics
import time

import torch

from ralmspec.config import Sampling
from ralmspec.lm.sampling import draw, draw_on_device, gumbel_noise

torch.set_num_threads(2)
V = 49152
gen = torch.Generator().manual_seed(0)
logits = torch.randn(V, generator=gen) * 3


def ms(f, n=60):
    f(0)
    ts = []
    for p in range(n):
        t = time.perf_counter()
        f(p)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


print(f"Philox noise alone: {ms(lambda p: gumbel_noise(7, p, V)):.2f} ms")
for top_p in (1.0, 0.9):
    s = Sampling(temperature=0.8, top_p=top_p, seed=7)
    host = ms(lambda p: draw(logits, s, p))
    dev = ms(lambda p: int(draw_on_device(logits, s, p)))
    same = sum(draw(logits, s, p) == int(draw_on_device(logits, s, p)) for p in range(300))
    print(f"top_p {top_p}: host rule {host:.2f} ms, device evaluation on the CPU {dev:.2f} ms, "
          f"same token {same}/300")
