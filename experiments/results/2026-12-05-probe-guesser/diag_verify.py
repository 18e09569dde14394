"""run_at-style: python diag_verify.py SRC bench ...; logs every round's verification: size, overlapped,
the encode wait (t_search - t), the search, and what OS^3's model priced for it."""
import sys, collections
src = sys.argv.pop(1)
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "") and "editable" not in repr(f)]
sys.path.insert(0, src)
from ralmspec.engine import speculative as SP
from ralmspec.speculation import stride as S
LOG = collections.defaultdict(list)
real_verify = SP.RalmMode.verify_round
async def verify_round(self, queries, overlapped):
    sched = self.drv.sched
    e = S.median(sched._encode); line = sched.verification_line(overlapped); sl = sched.search_line(overlapped)
    enc_before = self.stats["encode_s"]
    hits, t, took = await real_verify(self, queries, overlapped)
    wait = self.stats["encode_s"] - enc_before
    key = (self.spec.guesser, len(queries), overlapped)
    LOG[key].append((wait, took - wait, None if line is None else line(len(queries)), None if sl is None else sl(len(queries)), e))
    return hits, t, took
SP.RalmMode.verify_round = verify_round
from ralmspec.cli import main
try:
    main(sys.argv[1:])
finally:
    f = lambda x: "-" if x is None else f"{1000*x:6.1f}"
    print("guesser size ov  n | wait(med) search(med) | model b  model search  e")
    import statistics as st
    for k in sorted(LOG):
        v = LOG[k]
        med = lambda i: st.median([x[i] for x in v if x[i] is not None]) if any(x[i] is not None for x in v) else None
        print(k[0], k[1], k[2], len(v), "|", f(med(0)), f(med(1)), "|", f(med(2)), f(med(3)), f(med(4)))
