"""The batched runner's 8-row decode step on the CPU: attention per row (SDPA's ``enable_gqa``,
the CPU's layout) vs once per span group (``cuda_attention``, CUDA's), the flag toggled on one
runner, alternated round by round; 8 live rows (spans all 512), then 1.

    python experiments/results/2026-12-06-span-groups-cpu/ab_layout.py bfloat16
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # experiments/, for step_ops

from step_ops import one_step  # noqa: E402

from ralmspec.lm.models import load_lm  # noqa: E402
from ralmspec.lm.static import StaticRunner  # noqa: E402

torch.set_num_threads(2)
dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
lm = load_lm("smollm2", dtype=dtype, runner="eager")
runner = StaticRunner(lm.model, max_len=700, capacity=8, batch_rows=8)
for live in (8, 1):
    slots = [runner.open() for _ in range(live)]
    with torch.inference_mode():
        for i, slot in enumerate(slots):
            ids = [1000 + (7 * j + i) % 5000 for j in range(300 + 40 * i)]  # 300..580 positions: span 512
            for b in range(0, len(ids), 64):
                runner.prefill_block(slot, ids[b:b + 64], last=b + 64 >= len(ids), want_hidden=False)
        ms: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(6):
            for layout in (False, True):
                runner.decoder.cuda_attention = layout
                times = []
                for _ in range(8):
                    t = time.perf_counter()
                    one_step(runner, slots, 42)
                    times.append(time.perf_counter() - t)
                ms[layout].append(statistics.median(times[2:]) * 1e3)
    print(f"{dtype}, {live} live rows: per row {[round(x, 1) for x in ms[False]]} median "
          f"{statistics.median(ms[False]):.1f} ms; span groups {[round(x, 1) for x in ms[True]]} median "
          f"{statistics.median(ms[True]):.1f} ms")
    for slot in slots:
        runner.free(slot)
