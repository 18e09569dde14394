"""First use of the compiled step per attention span (SmolLM2, CPU, 2 threads): the compile time.

    python experiments/results/2026-12-05-compiled-step/compile_times.py
"""
import time

import torch

from ralmspec.lm.models import load_lm
from ralmspec.lm.static import StaticRunner

torch.set_num_threads(2)
lm = load_lm("smollm2")
t = time.perf_counter()
runner = StaticRunner(lm.model, max_len=2048, capacity=2, compile_step=True)
print(f"made (span 64 compiled): {time.perf_counter() - t:.1f} s", flush=True)
slot = runner.open()
with torch.inference_mode():
    for length in (100, 200, 400):  # first steps at spans 128, 256, 512
        runner.crop(slot, 0)
        _, logits, _ = runner.prefill_block(slot, list(range(1000, 1000 + length)), last=True, want_hidden=False)
        t = time.perf_counter()
        runner.decode(slot, logits, 2, None, frozenset())  # one step: compiles this span
        first = time.perf_counter() - t
        runner.crop(slot, length)
        t = time.perf_counter()
        runner.decode(slot, logits, 2, None, frozenset())
        print(f"prompt {length}: first step {first:.1f} s, "
              f"next {1e3 * (time.perf_counter() - t):.0f} ms", flush=True)
print("compiled spans:", sorted(runner.compiled_spans))
