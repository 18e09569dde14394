"""PNG plots of the studies (matplotlib, Agg backend). Every figure carries a footer with the
date, the machine and the workload, and says "EMULATED" wherever an emulated knowledge base is shown.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.breakdown import NAIVE_PARTS, SPEC_PARTS, breakdown  # noqa: E402

COLORS = {"lm": "#4c72b0", "rollback waste": "#c44e52", "retrieval": "#dd8452", "cache": "#8172b3",
          "verify wait": "#55a868", "other": "#bbbbbb"}


def _short_kb(label: str) -> str:
    if label.startswith("EMULATED"):
        return "EMUL. " + label.split(" ")[1]
    return label.replace(" passages", "")


def _finish(fig, path: str, footer: str) -> str:
    lines = textwrap.wrap(footer, width=int(fig.get_figwidth() * 22))
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=7, color="#555555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.012 + 0.035 * len(lines) * 4.2 / fig.get_figheight(), 1, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell_label(r: dict[str, Any], with_model: bool = True) -> str:
    kb = "" if r["kb"].startswith("real") else f"\n{_short_kb(r['kb'])}"
    return (f"{r['model']}/" if with_model else "") + f"{r['retriever']}{kb}"


def plot_speedups(rows: Sequence[dict[str, Any]], path: str, title: str, footer: str) -> str:
    """Grouped bars: one group per cell, one bar per variant; a dashed tick at each cell's limit."""
    cells: list[str] = []
    variants: list[str] = []
    for r in rows:
        lab = _cell_label(r, with_model=len({x["model"] for x in rows}) > 1)
        if lab not in cells:
            cells.append(lab)
        if r["variant"] not in variants:
            variants.append(r["variant"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cells) * max(1, len(variants)) ** 0.5 + 2), 4.2))
    width = 0.8 / max(1, len(variants))
    cmap = plt.get_cmap("tab10")
    limits: dict[int, float] = {}
    for vi, v in enumerate(variants):
        xs, ys = [], []
        for r in rows:
            if r["variant"] != v:
                continue
            ci = cells.index(_cell_label(r, with_model=len({x["model"] for x in rows}) > 1))
            xs.append(ci - 0.4 + width * (vi + 0.5))
            ys.append(r["speedup"])
            limits[ci] = r["limit"]
        bars = ax.bar(xs, ys, width=width, label=v, color=cmap(vi % 10))
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    for ci, lim in limits.items():
        ax.hlines(lim, ci - 0.45, ci + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.axhline(1.0, color="#888888", linewidth=0.8)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(cells, fontsize=8)
    ax.set_ylabel("speed-up over naive (x)")
    ax.set_title(title + "   (dashed: limit (a+r)/a)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="variant", title_fontsize=7)
    return _finish(fig, path, footer)


def plot_scaling(rows: Sequence[dict[str, Any]], path: str, footer: str) -> str:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["model"], r["variant"]), []).append(r)
    for (model, variant), pts in series.items():
        pts = sorted(pts, key=lambda r: r["kb_size"])
        xs = [p["kb_size"] for p in pts]
        ax.plot(xs, [p["speedup"] for p in pts], "o-", label=f"{model} {variant}: speed-up")
        ax.plot(xs, [p["limit"] for p in pts], "k--", marker="x", label=f"{model}: limit (a+r)/a")
        ax2.plot(xs, [p["naive_retrieval_ms"] for p in pts], "o-", label=f"{model}: retrieval ms/step")
        ax2.plot(xs, [p["naive_lm_ms"] for p in pts], "s--", label=f"{model}: LM ms/step")
    real = min((r["kb_size"] for r in rows), default=0)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlabel("knowledge-base vectors (EMULATED above the real corpus)")
        if real:
            a.axvline(real, color="#999999", linewidth=0.8)
            a.text(real, a.get_ylim()[1], " real", fontsize=7, va="top")
    ax.axhline(1.0, color="#888888", linewidth=0.8)
    ax.set_ylabel("speed-up over naive (x)")
    ax.set_title("Speed-up vs knowledge-base size", fontsize=10)
    ax2.set_ylabel("ms per naive step")
    ax2.set_title("Naive step cost", fontsize=10)
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    return _finish(fig, path, footer)


def plot_batch_cost(rows: Sequence[dict[str, Any]], path: str, footer: str) -> str:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['retriever']} ({_short_kb(r['kb'])})", []).append(r)
    for name, pts in series.items():
        pts = sorted(pts, key=lambda r: r["batch"])
        xs = [p["batch"] for p in pts]
        line, = ax.plot(xs, [p["search_ms"] for p in pts], "o-", label=name)
        one = next((p["search_ms"] for p in pts if p["batch"] == 1), None)  # no batch of 1: no line
        if one is not None:
            ax.plot(xs, [one * x for x in xs], ":", color=line.get_color(), linewidth=0.8)
        ax2.plot(xs, [p["per_query_ms"] for p in pts], "o-", label=name, color=line.get_color())
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("queries per search (batch size)")
    ax.set_ylabel("one batched search (ms)")
    ax.set_title("Batched search latency (dotted: b single searches)", fontsize=10)
    ax2.set_ylabel("ms per query")
    ax2.set_title("Amortised cost per query", fontsize=10)
    ax.legend(fontsize=7)
    return _finish(fig, path, footer)


def plot_breakdown(cell_runs: Sequence[tuple[str, list[dict[str, Any]], list[dict[str, Any]], str]],
                   path: str, footer: str) -> str:
    """One panel per cell: per request, a stacked bar for naive and one for the speculative variant.

    ``cell_runs``: (title, naive result dicts, speculative result dicts, variant name).
    """
    k = len(cell_runs)
    fig, axes = plt.subplots(k, 1, figsize=(9, 1.2 + 1.9 * k), squeeze=False)
    for ax, (title, naive, spec, vname) in zip(axes[:, 0], cell_runs):
        labels, ys = [], 0
        seen: set[str] = set()
        for i, (a, b) in enumerate(zip(naive, spec)):
            for mode, res, parts in (("naive", a, NAIVE_PARTS), (vname, b, SPEC_PARTS)):
                bd = breakdown(res)
                left = 0.0
                for p in parts:
                    w = bd.get(p, 0.0)
                    ax.barh(ys, w, left=left, color=COLORS[p], label=p if p not in seen else None, height=0.8)
                    seen.add(p)
                    left += w
                labels.append(f"q{i} {mode}")
                ys += 1
            ys += 0.5
        pos = []
        y = 0.0
        for i in range(len(naive)):
            pos += [y, y + 1]
            y += 2.5
        ax.set_yticks(pos)
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("seconds", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _finish(fig, path, footer)


TIMELINE_LANES = ("LM chunks", "guess / probe", "verification")


def timeline_bars(result: dict[str, Any]) -> dict[str, list[tuple[float, float, str]]]:
    """Lane -> [(start s, seconds, colour)] of one request's trace (pure; ``plot_timeline`` draws
    it). LM chunks later thrown away by a rollback are red, kept ones blue; verification rounds
    (``verify``) and real retrievals (``retrieve``) share the verification lane."""
    trace = result.get("trace") or []
    lanes: dict[str, list[tuple[float, float, str]]] = {lane: [] for lane in TIMELINE_LANES}
    pos, live = 0, []  # chunks not yet discarded: (start position, index in the LM lane)
    for ev in trace:
        kind, t, dur = ev.get("kind"), float(ev.get("t", 0.0)), float(ev.get("dur", 0.0))
        if kind == "lm":
            live.append((pos, len(lanes["LM chunks"])))
            lanes["LM chunks"].append((t, dur, COLORS["lm"]))
            pos += int(ev.get("n", 0))
        elif kind == "rollback":
            at = int(ev["at"])
            for start, i in live:
                if start >= at:
                    s, d, _ = lanes["LM chunks"][i]
                    lanes["LM chunks"][i] = (s, d, COLORS["rollback waste"])
            live = [(s, i) for s, i in live if s < at]
            pos = at
        elif kind in ("cache", "probe", "refine"):
            lanes["guess / probe"].append((t, dur, COLORS["cache"]))
        elif kind in ("verify", "retrieve"):
            lanes["verification"].append((t, dur, COLORS["verify wait"] if kind == "verify" else COLORS["retrieval"]))
    return lanes


def plot_timeline(runs: Sequence[tuple[str, dict[str, Any]]], path: str, footer: str) -> str:
    """One panel per request (``(title, GenerationResult.to_dict())``): its LM chunks, guesses
    and verification rounds on a shared time axis, rollbacks as red chunks, so overlap (two
    lanes busy at once) is visible."""
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 0.8 + 1.5 * len(runs)), squeeze=False, sharex=True)
    for ax, (title, res) in zip(axes[:, 0], runs):
        lanes = timeline_bars(res)
        for y, lane in enumerate(TIMELINE_LANES):
            bars = lanes[lane]
            if bars:
                ax.broken_barh([(s, max(d, 1e-4)) for s, d, _ in bars], (y - 0.4, 0.8),
                               facecolors=[c for _, _, c in bars], edgecolor="white", linewidth=0.3)
        ax.set_yticks(range(len(TIMELINE_LANES)))
        ax.set_yticklabels(TIMELINE_LANES, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("seconds since the request started", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in ("lm", "rollback waste", "cache", "verify wait",
                                                                       "retrieval")]
    axes[0, 0].legend(handles, ["LM chunk (kept)", "LM chunk (rolled back)", "guess / probe", "verification round",
                                "real retrieval"], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _finish(fig, path, footer)
