"""Log OS^3's observations during a bench run."""
import sys
from ralmspec.speculation import stride as S
def wrap(name, fmt):
    orig = getattr(S.StrideScheduler, name)
    def f(self, *a, **k):
        print(f"  {name} " + fmt(*a, **k), file=sys.stderr); return orig(self, *a, **k)
    setattr(S.StrideScheduler, name, f)
wrap("observe_search", lambda n, sec, overlapped=False: f"{n} {1000*sec:.1f} {'ov' if overlapped else ''}")
wrap("observe_encode", lambda sec: f"{1000*sec:.1f}")
wrap("observe_step", lambda sec, overlapped=False: f"{1000*sec:.1f} {'ov' if overlapped else ''}")
wrap("observe_lm", lambda sec: f"{1000*sec:.1f}")
wrap("observe_retrieval", lambda sec: f"{1000*sec:.1f}")
from ralmspec.cli import main
sys.exit(main(sys.argv[1:]))
