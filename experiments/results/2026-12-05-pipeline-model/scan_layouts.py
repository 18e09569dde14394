import time, numpy as np, torch
torch.set_num_threads(1)
from ralmspec.retrieval.emulated import build_pad_index
from ralmspec.retrieval.dense import flat_ip_view
idx = build_pad_index(1_000_000, 384); V = flat_ip_view(idx); Vt = torch.from_numpy(V)
rng = np.random.default_rng(1)
def t(f, reps=4):
    ts=[]
    for _ in range(reps):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return 1000*min(ts)
for b in (1,2,4,8):
    q = rng.standard_normal((b,384)).astype(np.float32); qt = torch.from_numpy(q)
    r = {}
    r["mm"] = t(lambda: torch.mm(Vt, qt.T))
    for blk in (2048, 8192, 32768):
        out = torch.empty(1_000_000, b)
        def f():
            for s in range(0, 1_000_000, blk):
                torch.mm(Vt[s:s+blk], qt.T, out=out[s:s+blk])
        r[f"blkT{blk}"] = t(f)
        out2 = torch.empty(b, 1_000_000)
        def g():
            for s in range(0, 1_000_000, blk):
                out2[:, s:s+blk] = torch.mm(qt, Vt[s:s+blk].T)
        r[f"qVT{blk}"] = t(g)
    print(b, {k: round(v) for k, v in r.items()}, flush=True)
