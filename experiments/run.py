"""Run the latency studies of a config and write traces, tables and plots.

    python -m experiments.run experiments/configs/quick.toml [--quick] [--out DIR]

Outputs (``--out``, default ``experiments/results/<date>-<name>/``):

- ``README.md``: every table (Markdown) with its plots, the machine, the date, the command and the wall time;
- ``<study>.md`` / ``<study>.csv``: one table per study; ``summary.csv``: every (cell, variant);
- ``traces/<cell>.jsonl``: one line per request (naive and every variant) with its full trace;
- ``batch_cost.jsonl``: every raw batched-search measurement;
- ``plots/*.png``; ``meta.json``: machine, versions, thread settings, config, timings, status.

Exit status: 0 ok; 2 bad config or input; 3 a speculative output differed from the naive loop
(the harness stops at the first such cell, after writing its traces).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ralmspec.errors import RalmSpecError  # noqa: E402
from ralmspec.paths import check_output_path  # noqa: E402

from experiments import plots, studies  # noqa: E402
from experiments.config import ExperimentConfig, load_config, with_cache_dir  # noqa: E402
from experiments.grid import IdentityError, plan_cells, run_cell  # noqa: E402
from experiments.resources import Resources  # noqa: E402
from experiments.tables import Column, Table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
README_START = "<!-- latest-results:start -->"
README_END = "<!-- latest-results:end -->"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    import faiss
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "faiss": faiss.__version__}
    for pkg in ("transformers", "sentence_transformers", "numpy", "bm25s"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001
            pass
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "gpu": gpu, "platform": platform.platform(),
            "versions": versions, "git_commit": commit, "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(), "loadavg_start": os.getloadavg()}


def machine_line(m: dict[str, Any]) -> str:
    gpu = m["gpu"] or "no GPU"
    return f"{m['cores']}-core {m['cpu']}, {m['memory_gb']} GB RAM, {gpu}"


def load_line(m: dict[str, Any]) -> str:
    """The 1-minute load average at start and end: how busy the (possibly shared) machine was."""
    end = m.get("loadavg_end") or m["loadavg_start"]
    return (f"1-min load average {m['loadavg_start'][0]:.1f} at start, {end[0]:.1f} at end "
            f"({m['cores']} cores; above ~2 other jobs were competing for the CPU)")


def set_threads(cfg: ExperimentConfig) -> None:
    if cfg.run.torch_threads:
        import torch

        torch.set_num_threads(cfg.run.torch_threads)
    if cfg.run.faiss_threads:
        import faiss

        faiss.omp_set_num_threads(cfg.run.faiss_threads)


def footer(cfg: ExperimentConfig, meta: dict[str, Any], models: str) -> str:
    wl = cfg.workload
    return (f"{meta['date']} · {machine_line(meta)} · model {models} · {wl.dataset} · "
            f"max_new_tokens {wl.max_new_tokens}, stride {wl.stride}, query_len {wl.query_len} · "
            f"config {os.path.basename(cfg.source)}{' --quick' if meta.get('quick') else ''}")


def _models(rows) -> str:
    return ",".join(sorted({r["model"] for r in rows})) or "-"


def run_bench_cells(cfg: ExperimentConfig, res: Resources, cells: dict, out: str, show: bool) -> None:
    from tqdm import tqdm

    total = sum(c.key.n for c in cells.values())
    outer = tqdm(total=total, desc="questions (all cells)", position=0, disable=not show, dynamic_ncols=True)
    for i, cell in enumerate(cells.values(), 1):
        k = cell.key
        kb = "real KB" if k.pad == 0 else f"EMULATED +{k.pad:,}"
        inner = tqdm(total=k.n, desc=f"[{i}/{len(cells)}] {k.model}/{k.retriever}/{kb}", position=1,
                     leave=False, disable=not show, dynamic_ncols=True)

        def progress(msg: str, inner=inner) -> None:
            inner.update(1)
            outer.update(1)
            inner.set_postfix_str(msg.split("] ", 1)[-1][-60:])

        res.knowledge_base(k.retriever, k.pad)  # load / build before timing starts
        res.lm(k.model)
        run_cell(cell, res, cfg, os.path.join(out, "traces"), progress=progress)
        inner.close()
        s_all = ", ".join(f"{v} {s.speedup:.2f}x" for v, s in cell.summaries.items())
        tqdm.write(f"[{i}/{len(cells)}] {k.model}/{k.retriever}/{cell.kb_label}: limit "
                   f"{next(iter(cell.summaries.values())).limit:.2f}x; {s_all}; all identical "
                   f"({cell.wall_s:.0f}s)", file=sys.stderr)
    outer.close()


def write_readme(out: str, cfg: ExperimentConfig, meta: dict[str, Any], tables: list[Table],
                 figures: dict[str, list[str]]) -> str:
    lines = [f"# Latency study results: {cfg.run.name}", "",
             f"- date: {meta['date']}",
             f"- machine: {machine_line(meta)} (torch {meta['torch_threads']} threads, FAISS "
             f"{meta['faiss_threads']} threads); {load_line(meta)}",
             f"- command: `{meta['command']}`",
             f"- wall time: {meta['wall_s']:.0f} s (model/index loading included)",
             f"- workload: {cfg.workload.dataset}, questions {cfg.workload.question_offset}.."
             f"{cfg.workload.question_offset + cfg.workload.n - 1} (n per cell in the tables), "
             f"max_new_tokens {cfg.workload.max_new_tokens}, stride {cfg.workload.stride}, "
             f"query_len {cfg.workload.query_len}, passage_tokens {cfg.workload.passage_tokens}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
             f"- {studies.models_note(g.model for st in cfg.bench.values() for g in st.groups)} See "
             "experiments/README.md for what each study measures.", ""]
    for t in tables:
        lines.append(t.markdown(heading="##"))
        for fig in figures.get(t.name, []):
            lines.append(f"![{t.name}]({os.path.relpath(fig, out)})\n")
    path = os.path.join(out, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def update_experiments_readme(out: str, meta: dict[str, Any], tables: list[Table],
                              figures: dict[str, list[str]]) -> bool:
    """Replace the marked 'latest results' block of experiments/README.md (main + ablation tables)."""
    path = os.path.join(HERE, "README.md")
    if not os.path.isfile(path):
        return False
    text = open(path, encoding="utf-8").read()
    if README_START not in text or README_END not in text:
        return False
    rel = os.path.relpath(out, HERE)
    block = [README_START, "",
             f"Latest run: `{meta['command']}` on {meta['date']}, {machine_line(meta)}; wall time "
             f"{meta['wall_s']:.0f} s; {load_line(meta)}. Full results (every table, traces, plots): [{rel}/]({rel}/README.md).", ""]
    for t in tables:
        if t.name in ("main", "ablations", "scaling"):
            block.append(t.markdown(heading="####"))
            for fig in figures.get(t.name, []):
                block.append(f"![{t.name}]({os.path.relpath(fig, HERE)})\n")
    block.append(README_END)
    a, b = text.index(README_START), text.index(README_END) + len(README_END)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:a] + "\n".join(block) + text[b:])
    return True


def run(cfg: ExperimentConfig, out: str, only: set[str] | None, show: bool, command: str,
        quick: bool = False, update_readme: bool = False) -> int:
    t_start = time.perf_counter()
    set_threads(cfg)
    os.makedirs(out, exist_ok=True)
    meta = machine_info()
    meta.update(date=dt.date.today().isoformat(), started=dt.datetime.now().isoformat(timespec="seconds"),
                command=command, quick=quick, config=cfg.raw, status="running")
    meta_path = os.path.join(out, "meta.json")

    def save_meta() -> None:
        with open(meta_path, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, default=str)

    save_meta()
    if only:
        bench = {k: v for k, v in cfg.bench.items() if k in only}
        cfg = type(cfg)(cfg.run, cfg.workload, cfg.retrieval, cfg.speculation, bench,
                        cfg.batch_cost if "batch_cost" in only else None,
                        cfg.breakdown if "breakdown" in only else None, cfg.source, cfg.raw)
    res = Resources(cfg, show_progress=show)
    cells = plan_cells(cfg)
    _log(f"{len(cells)} bench cells: " + ", ".join(c.key.slug for c in cells.values()))
    tables: list[Table] = []
    figures: dict[str, list[str]] = {}
    pdir = os.path.join(out, "plots")
    try:
        if cells:
            run_bench_cells(cfg, res, cells, out, show)

        def bench_table(t: Table, title: str) -> None:
            tables.append(t)
            t.write(out)
            if t.rows:
                figures[t.name] = [plots.plot_speedups(t.rows, os.path.join(pdir, f"{t.name}.png"), title,
                                                       footer(cfg, meta, _models(t.rows)))]

        if "main" in cfg.bench:
            bench_table(studies.main_table(cfg, cells), "RaLMSpec speed-up per retriever")
        if "ablations" in cfg.bench:
            bench_table(studies.ablation_table(cfg, cells), "Ablations")
        if "stride" in cfg.bench:
            bench_table(studies.stride_table(cfg, cells), "Fixed stride vs OS^3")
        if "prefetch" in cfg.bench:
            bench_table(studies.prefetch_table(cfg, cells), "Prefetch size")
        if "scaling" in cfg.bench:
            t = studies.scaling_table(cfg, cells)
            tables.append(t)
            t.write(out)
            if t.rows:
                figures["scaling"] = [plots.plot_scaling(t.rows, os.path.join(pdir, "scaling.png"),
                                                         footer(cfg, meta, _models(t.rows)))]
        if cfg.batch_cost is not None:
            from tqdm import tqdm

            bc = cfg.batch_cost
            n_meas = (len(bc.retrievers) + len(bc.kb_pad)) * len(bc.batch_sizes) * bc.repeats
            with tqdm(total=n_meas, desc="batched-search cost", disable=not show, dynamic_ncols=True) as bar:
                t, raw = studies.run_batch_cost(bc, res, progress=bar.update)
            tables.append(t)
            t.write(out)
            with open(os.path.join(out, "batch_cost.jsonl"), "w", encoding="utf-8") as f:
                for r in raw:
                    f.write(json.dumps(r) + "\n")
            figures["batch_cost"] = [plots.plot_batch_cost(t.rows, os.path.join(pdir, "batch_cost.png"),
                                                           footer(cfg, meta, "n/a (retrieval only)"))]
        if cfg.breakdown is not None:
            t = studies.breakdown_table(cfg, cells)
            tables.append(t)
            t.write(out)
            figs = []
            for c in studies.breakdown_cells(cfg, cells):
                v = studies.breakdown_variant(c, cfg)
                title = (f"{c.key.model} / {c.key.retriever} / {c.kb_label}: naive vs {v} "
                         f"(limit {c.summaries[next(iter(c.summaries))].limit:.2f}x)")
                runs = [(title, [r.to_dict() for r in c.runs["naive"]],
                         [r.to_dict() for r in c.runs_of(v, cfg.speculation)], v)]
                figs.append(plots.plot_breakdown(runs, os.path.join(pdir, f"breakdown_{c.key.slug}.png"),
                                                 footer(cfg, meta, c.key.model)))
            figures["breakdown"] = figs
        rows = studies.all_bench_rows(cells.values(), cfg)
        if rows:
            Table("summary", "Every cell and variant", [
                *[Column(k, k) for k in rows[0].keys()]], rows).write(out)
        meta.update(status="ok")
    except IdentityError as e:
        meta.update(status=f"FAILED: {e}", wall_s=time.perf_counter() - t_start)
        save_meta()
        _log(f"error: {e}")
        return 3
    finally:
        meta.setdefault("wall_s", time.perf_counter() - t_start)
        meta["load_seconds"] = res.load_seconds
        meta["loadavg_end"] = os.getloadavg()
        meta["cells"] = [{"cell": asdict(c.key), "kb": c.kb_label, "wall_s": c.wall_s, "studies": sorted(c.studies),
                          "variants": {k: asdict(v) for k, v in c.variants.items()}, "pad_stats": c.pad_stats}
                         for c in cells.values()]
        save_meta()
        res.close()
    meta["wall_s"] = time.perf_counter() - t_start
    save_meta()
    readme = write_readme(out, cfg, meta, tables, figures)
    for t in tables:
        if t.name in ("main", "ablations", "scaling"):
            print(t.markdown())
    if update_readme and update_experiments_readme(out, meta, tables, figures):
        _log("updated the latest-results block of experiments/README.md")
    _log(f"wrote {readme} (wall time {meta['wall_s']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="TOML config (default with --quick: experiments/configs/quick.toml)")
    ap.add_argument("--quick", action="store_true",
                    help="apply the config's [quick] overrides (a small, fast version of it)")
    ap.add_argument("--out", help="output folder (default experiments/results/<date>-<name>)")
    ap.add_argument("--cache-dir", help="index cache folder (overrides [run] cache_dir)")
    ap.add_argument("--only", help="comma-separated studies to run (main,ablations,stride,prefetch,scaling,"
                                   "batch_cost,breakdown)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--update-readme", action="store_true",
                    help="also refresh the latest-results block of experiments/README.md")
    a = ap.parse_args(argv)
    try:
        path = a.config or (os.path.join(HERE, "configs", "quick.toml") if a.quick else None)
        if path is None:
            ap.error("give a config file (or --quick)")
        cfg = load_config(path, quick=a.quick)
        if a.cache_dir:
            cfg = with_cache_dir(cfg, a.cache_dir)
        only = None
        if a.only:
            only = {s.strip() for s in a.only.split(",") if s.strip()}
            from experiments.config import ALL_STUDIES

            bad = sorted(only - set(ALL_STUDIES))
            if bad:
                raise RalmSpecError(f"--only: unknown studies {', '.join(bad)}; choose from {', '.join(ALL_STUDIES)}")
        out = a.out or os.path.join(HERE, "results", f"{dt.date.today().isoformat()}-{cfg.run.name}")
        check_output_path(out, "--out", folder=True)
        command = "python -m experiments.run " + " ".join(argv)
        return run(cfg, out, only, show=not a.no_progress, command=command, quick=a.quick,
                   update_readme=a.update_readme)
    except RalmSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
