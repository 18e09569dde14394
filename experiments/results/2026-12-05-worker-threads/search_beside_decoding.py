"""A 1-query kNN-LM search (100k flat) alone vs beside a 1-thread decode loop in the main thread; argv[1] = FAISS (OpenMP) threads of the search thread, at two GIL switch intervals."""
import sys, time, threading, statistics as st
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from ralmspec.threads import set_threads
set_threads(1)
from ralmspec.lm.models import load_lm
from ralmspec.knnlm.open import open_datastore
from ralmspec.knnlm.model import IncrementalDecoder

ds = open_datastore("/tmp/knnlm/tiny100000")
lm = load_lm("tiny", device="cpu")
dec = IncrementalDecoder(lm)
st0 = dec.start(list(range(100, 140)))
rng = np.random.default_rng(0)
qs = [st0.hidden + rng.normal(0, 0.1, st0.hidden.shape).astype(np.float32) for _ in range(40)]
ds.search(np.stack(qs[:1]), 16)

def search(q):
    t = time.perf_counter(); ds.search(q[None], 16); return time.perf_counter() - t

def steps(n):
    ts = []
    for i in range(n):
        if dec.length > 200: dec.truncate(40)
        s = dec.step(200 + i % 50); ts.append(s.seconds)
    return ts

import faiss
pool = ThreadPoolExecutor(1, initializer=lambda: faiss.omp_set_num_threads(int(sys.argv[1])))
for sw in [0.005, 0.001]:
    sys.setswitchinterval(sw)
    alone = [search(q) for q in qs]
    lm_alone = steps(40)
    beside, lm_beside = [], []
    for q in qs:
        f = pool.submit(search, q)
        while not f.done():
            lm_beside.extend(steps(1))
        beside.append(f.result())
    med = lambda x: 1000 * st.median(x)
    print(f"switch {sw*1000:.1f} ms: search alone {med(alone):.2f} beside {med(beside):.2f} ms; "
          f"lm step alone {med(lm_alone):.2f} beside {med(lm_beside):.2f} ms", flush=True)
