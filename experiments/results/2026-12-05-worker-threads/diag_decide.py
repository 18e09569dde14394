"""bench (argv) from /work/main; print every OS^3 decision of the oracle that falls back to naive, with its inputs."""
import sys
from ralmspec.speculation import stride as S
real = S.StrideScheduler.decide
def decide(self):
    d = real(self)
    if self.os3 and self.naive_fallback and self.async_verify:
        b = self.verification_line(); bo = self.verification_line(True)
        f = lambda x: None if x is None else round(1000 * x)
        print(f"stride {d.stride} ov {d.overlap} a {f(self.step_cost())} a_ov {f(self.overlapped_step_cost())} "
              f"lm {f(S.median(self._lm))} r {f(S.median(self._r))} e {f(S.median(self._encode))} naive {f(self.naive_step_cost())} "
              f"g {self.gamma()} g_ov {self.gamma(True)} b {[f(b(s)) for s in (1,2,3,4,6,8)] if b else None} "
              f"b_ov {[f(bo(s)) for s in (1,2,3,4,6,8)] if bo else None}", flush=True)
    return d
S.StrideScheduler.decide = decide
from ralmspec.cli import main
sys.exit(main(sys.argv[1:]))
