"""python gamma_patch.py MODE bench ...: MODE 'base' (as shipped) or 'laplace' (γ = (matched+1)/(matched+bad+2), cap 0.98)."""
import sys
mode = sys.argv.pop(1)
from ralmspec.speculation import stride as S
if mode == "laplace":
    def gamma(self, overlapped=False, capped=True):
        rounds = self._rounds_ov if overlapped else self._rounds
        if not rounds:
            rounds = self._rounds if overlapped else self._rounds_ov
        if not rounds:
            return self._gamma_prior
        matched = sum(m for m, _ in rounds)
        bad = sum(1 for _, b in rounds if b)
        seen = (matched + 1) / (matched + bad + 2)
        return min(0.98, seen) if capped else seen
    S.StrideScheduler.gamma = gamma
from ralmspec.cli import main
sys.exit(main(sys.argv[1:]))
