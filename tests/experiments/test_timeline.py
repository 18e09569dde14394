"""The one-request timeline (experiments/plots.py timeline_bars) replays rollbacks from the trace."""

from experiments.plots import COLORS, plot_timeline, timeline_bars


def _result(trace):
    return {"mode": "speculative", "latency_s": 1.0, "stats": {}, "trace": trace}


def test_timeline_marks_rolled_back_chunks_and_places_rounds():
    trace = [
        {"kind": "retrieve", "t": 0.0, "dur": 0.1},
        {"kind": "lm", "t": 0.1, "dur": 0.02, "n": 4},  # kept (position 0)
        {"kind": "cache", "t": 0.12, "dur": 0.01},
        {"kind": "lm", "t": 0.13, "dur": 0.02, "n": 4},  # position 4: rolled back
        {"kind": "cache", "t": 0.15, "dur": 0.01},
        {"kind": "lm", "t": 0.16, "dur": 0.02, "n": 4},  # position 8: rolled back
        {"kind": "verify", "t": 0.13, "dur": 0.1, "size": 2},
        {"kind": "rollback", "t": 0.23, "at": 4, "wasted": 8},
        {"kind": "lm", "t": 0.23, "dur": 0.02, "n": 4},  # position 4 again: kept
    ]
    lanes = timeline_bars(_result(trace))
    colours = [c for _, _, c in lanes["LM chunks"]]
    assert colours == [COLORS["lm"], COLORS["rollback waste"], COLORS["rollback waste"], COLORS["lm"]]
    assert [s for s, _, _ in lanes["guess / probe"]] == [0.12, 0.15]
    assert [(s, d) for s, d, _ in lanes["verification"]] == [(0.0, 0.1), (0.13, 0.1)]


def test_plot_timeline_writes_a_png(tmp_path):
    trace = [{"kind": "lm", "t": 0.0, "dur": 0.1, "n": 4}, {"kind": "verify", "t": 0.05, "dur": 0.1}]
    path = plot_timeline([("naive", _result([])), ("all", _result(trace))], str(tmp_path / "t.png"), "footer")
    assert (tmp_path / "t.png").stat().st_size > 1000 and path.endswith("t.png")


def test_each_variant_carries_its_own_os3_costs(tmp_path, monkeypatch):
    """experiments.timeline runs a warm-up pass, then the measured one: every variant's measured
    request must start from ITS warm-up's OS^3 costs. One engine.costs was shared, keyed by
    guesser, so `all-sync` started from the costs and acceptance `all` had just measured."""
    from ralmspec.engine import speculative
    from experiments import timeline

    used: list[tuple[bool, int]] = []
    init = speculative.RalmMode.__init__

    def watched(self, ctx, spec, *args):
        used.append((spec.async_verify, id(ctx.costs)))
        init(self, ctx, spec, *args)

    monkeypatch.setattr(speculative.RalmMode, "__init__", watched)
    monkeypatch.setattr("experiments.plots.plot_timeline", lambda titles, path, footer: path)
    rc = timeline.main(["--model", "tiny", "--max-new-tokens", "8", "--variants", "all,all-sync",
                        "--out", str(tmp_path / "t.png")])
    assert rc == 0
    (a1, x1), (s1, y1), (a2, x2), (s2, y2) = used  # warm-up all, all-sync; measured all, all-sync
    assert (a1, s1, a2, s2) == (True, False, True, False)
    assert x1 == x2 and y1 == y2 and x1 != y1
