import time, statistics as st, numpy as np
from ralmspec.threads import set_threads
set_threads(1)
import torch
from ralmspec.retrieval.emulated import build_pad_index
from ralmspec.retrieval.dense import flat_ip_view, blocked_top_ip, gemm_top_ip
idx = build_pad_index(1_000_000, 384); arr = flat_ip_view(idx); vec = torch.from_numpy(arr)
rng = np.random.default_rng(1)
def q(b):
    x = rng.standard_normal((b, 384)).astype(np.float32); return x / np.linalg.norm(x, axis=1, keepdims=True)
def t(f, b):
    ts = []
    for _ in range(4):
        x = q(b); s = time.perf_counter(); f(x); ts.append(time.perf_counter() - s)
    return 1000 * st.median(ts[1:])
print("faiss 1:", round(t(lambda x: idx.search(x, 36), 1)))
for b in (2, 3, 4, 5, 6, 8, 12, 16):
    print(b, "blocked", round(t(lambda x: blocked_top_ip(arr, x, 36), b)), "gemm", round(t(lambda x: gemm_top_ip(vec, x, 36), b)), "faiss", round(t(lambda x: idx.search(x, 36), b)), flush=True)
