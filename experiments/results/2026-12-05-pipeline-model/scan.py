import time, numpy as np, torch, faiss
torch.set_num_threads(1); faiss.omp_set_num_threads(1)
from ralmspec.retrieval.emulated import build_pad_index
from ralmspec.retrieval.dense import flat_ip_view, gemm_top_ip, blocked_top_ip
idx = build_pad_index(1_000_000, 384)
V = flat_ip_view(idx); Vt = torch.from_numpy(V)
rng = np.random.default_rng(1)
def t(f, reps=5):
    ts=[]
    for _ in range(reps):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return 1000*min(ts), 1000*np.median(ts)
kk = 20+16
for b in (1,2,3,4,8,16):
    q = rng.standard_normal((b,384)).astype(np.float32); q/=np.linalg.norm(q,axis=1,keepdims=True)
    r = {"faiss": t(lambda: idx.search(q, kk))}
    r["gemm"] = t(lambda: gemm_top_ip(Vt, q, kk)); r["blocked"] = t(lambda: blocked_top_ip(V, q, kk))
    qt = torch.from_numpy(q)
    r["mm only"] = t(lambda: torch.mm(Vt, qt.T))
    S = torch.mm(Vt, qt.T)
    r["topk dim0"] = t(lambda: torch.topk(S, kk, dim=0))
    St = S.T.contiguous()
    r["topk rows"] = t(lambda: torch.topk(St, kk, dim=1))
    r["mm q@V.T"] = t(lambda: torch.mm(qt, Vt.T))
    print(b, {k: f"{v[0]:.0f}/{v[1]:.0f}" for k, v in r.items()}, flush=True)
