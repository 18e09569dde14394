"""Does a GEMM row's result depend on the batch it runs in? (the batched LM runner's shape rule)

    python experiments/gemm_batch_invariance.py --threads 2
    python experiments/gemm_batch_invariance.py --threads 1 --device cpu
    python experiments/gemm_batch_invariance.py --threads 2 --dtype bfloat16

For the linear layers of SmolLM2 (d 576, kv 192, MLP 1536, vocab 49152) and of the tiny GPT-2
(d 128, vocab 30522), with random weights and inputs (``--dtype``, float32 by default), one
``F.linear`` over M rows,
for each M, is compared bit for bit with:
- ``alone``: each row computed alone (M = 1);
- ``in 8``: the same row computed inside M = 8 (the batched runner's bucket);
- ``neighbours``: row 0 with the other M - 1 rows replaced by other values (same M);
- ``position``: every row moved one place down (same M).
Prints one line per shape: ``M:`` then ``A`` (= alone), ``8`` (= in 8), ``n`` (neighbour-free),
``p`` (position-free), or ``.`` where that comparison differs in at least one bit.
"""

from __future__ import annotations

import argparse
import json
import sys

SHAPES = {"smollm2 q/o 576->576": (576, 576), "smollm2 k/v 576->192": (576, 192),
          "smollm2 gate/up 576->1536": (576, 1536), "smollm2 down 1536->576": (1536, 576),
          "smollm2 head 576->49152": (576, 49152), "tiny head 128->30522": (128, 30522)}
SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 32)


def probe(k: int, n: int, device: str, dtype: str = "float32") -> dict[int, str]:
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dt)
    x = torch.randn(max(SIZES), 1, k, generator=g).to(device, dt)
    other = torch.randn(max(SIZES), 1, k, generator=g).to(device, dt)
    alone = torch.cat([F.linear(x[r:r + 1], w) for r in range(max(SIZES))])
    in8 = F.linear(x[:8], w)
    out = {}
    for m in SIZES:
        y = F.linear(x[:m], w)
        mixed = torch.cat([x[:1], other[1:m]])
        rolled = F.linear(torch.roll(x[:m], 1, 0), w)
        flags = [
            "A" if torch.equal(y, alone[:m]) else ".",
            "8" if torch.equal(y[:min(m, 8)], in8[:min(m, 8)]) else ".",
            "n" if torch.equal(F.linear(mixed, w)[0], y[0]) else ".",
            "p" if all(torch.equal(rolled[(r + 1) % m], y[r]) for r in range(m)) else ".",
        ]
        out[m] = "".join(flags)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: library default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = {}
    for name, (k, n) in SHAPES.items():
        rows[name] = probe(k, n, a.device, a.dtype)
        print(f"{name:>26}: " + " ".join(f"{m}:{f}" for m, f in rows[name].items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "device": a.device, "dtype": a.dtype, "torch": torch.__version__,
                       "shapes": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
