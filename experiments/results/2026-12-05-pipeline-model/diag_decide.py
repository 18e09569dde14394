"""Log every OS^3 decision (inputs + result) during a bench run."""
import sys
from ralmspec.speculation import stride as S
orig_decide = S.StrideScheduler.decide
def ms(x): return "-" if x is None else f"{1000*x:.1f}"
def decide(self):
    d = orig_decide(self)
    if not self.os3: return d
    b_al = self.search_line(); b_ov = self.search_line(True); e = self.encode_cost()
    naive = self.naive_step_cost()
    parts = []
    for ov in ([False, True] if self.async_verify else [False]):
        a = self.overlapped_step_cost() if ov else self.step_cost()
        b = b_ov if ov else b_al
        g = self.gamma(ov); gs = self.gamma(ov, capped=False)
        if a is None or b is None or g is None: continue
        s = S.best_stride(a, b, g, ov, self.s_max, e)
        parts.append(f"{'ov' if ov else 'sy'}: a {ms(a)} b({s}) {ms(b(s))} g {g:.2f}/{gs:.2f} s {s} cost {ms(S.seconds_per_step(a, b(s), gs, s, ov, self.regenerates, e))}")
    print(f"  decide -> {d.stride}{' ov' if d.overlap else ''}{' HOLD' if self.holding() else ''} | naive {ms(naive)} (lm {ms(S.median(self._lm))} r {ms(S.median(self._r))} e {ms(e)}) | " + " | ".join(parts)
          + f" | b_by_size { {k: ms(S.median(v)) for k, v in sorted(self._b_by_size.items())} } ov { {k: ms(S.median(v)) for k, v in sorted(self._b_ov_by_size.items())} }", file=sys.stderr)
    return d
S.StrideScheduler.decide = decide
from ralmspec.cli import main
sys.exit(main(sys.argv[1:]))
