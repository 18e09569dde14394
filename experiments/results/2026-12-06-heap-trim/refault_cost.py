"""What a heap trim costs the allocations after it: pages handed back to the OS are faulted in
(and zeroed) again when reused. ~412 MiB of 96 KiB holes between live blocks are reallocated,
alternately right after ``malloc_trim`` and with the pages still resident; 8 rounds each.

    python experiments/results/2026-12-06-heap-trim/refault_cost.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from ralmspec.memory import trim_heap  # noqa: E402

BLOCK, N = 96 * 1024, 4400

keep = [bytearray(BLOCK) for _ in range(2 * N)]
del keep[::2]  # the holes: freed between live blocks, as in a fragmented heap
res: dict[bool, list[float]] = {True: [], False: []}
for i in range(8):
    for trimmed in ((True, False) if i % 2 else (False, True)):
        if trimmed:
            trim_heap()
        t = time.perf_counter()
        again = [bytearray(BLOCK) for _ in range(N)]
        res[trimmed].append(time.perf_counter() - t)
        del again
mib = N * BLOCK / (1 << 20)
for trimmed, v in res.items():
    print(f"{'after a trim' if trimmed else 'resident    '}: {mib:.0f} MiB reallocated, median "
          f"{1000 * statistics.median(v):.0f} ms {[round(1000 * x) for x in v]}")
extra = statistics.median(res[True]) - statistics.median(res[False])
print(f"re-faulting costs {1000 * extra / mib:.2f} ms per MiB handed back")
