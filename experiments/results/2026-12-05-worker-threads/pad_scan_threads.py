"""Pad scan (1M x 384, FlatScan) alone and beside a 1-thread tiny-LM decode loop; FAISS OMP threads of the scanning thread = argv[1]."""
import sys, time, statistics as st
from concurrent.futures import ThreadPoolExecutor
import numpy as np, faiss
from ralmspec.threads import set_threads
set_threads(1)
from ralmspec.retrieval.emulated import build_pad_index
from ralmspec.retrieval.dense import FlatScan
from ralmspec.lm.models import load_lm
from ralmspec.knnlm.model import IncrementalDecoder
omp = int(sys.argv[1])
idx = build_pad_index(1_000_000, 384)
scan = FlatScan(idx)
lm = load_lm("tiny", device="cpu"); dec = IncrementalDecoder(lm); dec.start(list(range(100, 140)))
rng = np.random.default_rng(1)
def q(b):
    x = rng.standard_normal((b, 384)).astype(np.float32); return x / np.linalg.norm(x, axis=1, keepdims=True)
pool = ThreadPoolExecutor(1, initializer=lambda: faiss.omp_set_num_threads(omp))
def timed(x):
    t = time.perf_counter(); scan.search(x, 36); return time.perf_counter() - t
for b in (1, 2, 4, 8):  # warm the path trials
    for _ in range(3): pool.submit(timed, q(b)).result()
def steps():
    if dec.length > 300: dec.truncate(40)
    return dec.step(200).seconds
for b in (1, 2, 4, 8):
    alone = [pool.submit(timed, q(b)).result() for _ in range(5)]
    beside, lmb = [], []
    for _ in range(5):
        f = pool.submit(timed, q(b))
        while not f.done(): lmb.append(steps())
        beside.append(f.result())
    lma = [steps() for _ in range(20)]
    m = lambda x: 1000 * st.median(x)
    print(f"omp {omp} batch {b}: scan alone {m(alone):.0f} ms, beside LM {m(beside):.0f} ms; LM step alone {m(lma):.1f} beside {m(lmb):.1f} ms", flush=True)
