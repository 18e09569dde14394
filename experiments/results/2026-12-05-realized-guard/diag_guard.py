"""Log the realized guard's inputs and trips during a bench run (guessers from argv)."""
import sys, time
from ralmspec.speculation import stride as S
orig_real, orig_ver, orig_decide = S.StrideScheduler.observe_realized, S.StrideScheduler.observe_verified_step, S.StrideScheduler.decide
def real(self, seconds, verified):
    before = self._hold
    orig_real(self, seconds, verified)
    print(f"  interval {seconds*1000:.0f} ms / {verified} steps = {seconds/verified*1000:.0f} ms/step; naive ref {1000*(self.naive_reference() or 0):.0f} ms; model naive {1000*(self.naive_step_cost() or 0):.0f}; γ {self.gamma(capped=False)}{'  TRIP hold %d' % self._hold if self._hold > before else ''}", file=sys.stderr)
def ver(self, seconds):
    orig_ver(self, seconds)
    print(f"  fallback step {seconds*1000:.0f} ms (hold left {self._hold})", file=sys.stderr)
S.StrideScheduler.observe_realized = real
S.StrideScheduler.observe_verified_step = ver
from ralmspec.cli import main
sys.exit(main(sys.argv[1:]))
