"""python gamma_patch.py MODE bench ...: MODE 'base' (as shipped) or 'laplace' (γ = (matched+1)/(matched+bad+2), cap 0.98)."""
import sys
mode = sys.argv.pop(1)
from ralmspec.speculation import stride as S
if mode == "laplace":
    def gamma(self, overlapped=False, capped=True):
        rounds = (self._rounds_ov if overlapped else self._rounds) or (self._rounds if overlapped else self._rounds_ov)
        if not rounds:
            return self._gamma_prior
        m, bad = sum(x for x, _ in rounds), sum(b for _, b in rounds)
        g = (m + 1) / (m + bad + 2)
        return min(0.98, g) if capped else g
    S.StrideScheduler.gamma = gamma
from ralmspec.cli import main
sys.exit(main(sys.argv[1:]))
