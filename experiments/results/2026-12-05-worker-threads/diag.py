"""run `ralmspec bench ...` (argv) from SRC=argv[1]; then print OS^3's cost memory and per-request strides."""
import sys
src = sys.argv.pop(1)
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, src)
import ralmspec.bench as B
real = B.run_bench
def wrapped(engine, *a, **k):
    s, runs = real(engine, *a, **k)
    c = engine.costs
    print("COSTS KEYS", list(c.keys()))
    c = c[sys.argv[-1]] if False else c.get("os3/oracle", list(c.values())[0])
    for key in ("_a", "_a_ov", "_lm", "_r", "_encode", "_b_by_size", "_b_ov_by_size"):
        v = c.get(key)
        if isinstance(v, dict):
            v = {kk: [round(1000 * x) for x in vv] for kk, vv in sorted(v.items())}
        elif v is not None and not isinstance(v, (int, float)):
            v = [round(1000 * x, 1) for x in v]
        print(key, v)
    for name, rs in runs.items():
        if name == "naive": continue
        for r in rs:
            print(name, "strides", r.stats.get("strides"), "naive_steps", r.stats.get("naive_steps"), f"{r.latency_s:.2f}s")
    return s, runs
B.run_bench = wrapped
from ralmspec.cli import main
sys.exit(main(sys.argv[1:]))
