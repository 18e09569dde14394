"""kNN-LM with speculative retrieval: speed-up vs limit, exact and approximate datastores, by size.

    python -m experiments.knnlm_bench --source DATASTORE_DIR --sizes 50000,200000,all \\
        --indexes flat,hnsw,ivf --n 10 --max-new-tokens 32 --out experiments/results/knnlm

``--source`` is a datastore built by ``ralmspec knnlm build`` (e.g. the "default" model on the
embedded WikiText-2 corpus). Each size is the corpus-order PREFIX of its entries (the datastore a
build with ``--max-tokens`` makes) and each index kind is built over exactly those entries
(``reindex_datastore``), cached under ``--work``. For every (size, index) cell,
:func:`ralmspec.knnlm.cli.run_bench` runs the naive kNN-LM and every speculative variant on the
same prompts, one request at a time, compares tokens, and reports speed-up beside the limit
(a+r)/a of the same naive runs. Writes ``knnlm_bench.json`` (everything, per prompt) and
``knnlm_bench.md`` (the table) to ``--out``. Exit status 3 if any output differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

VARIANTS = {
    "os3": dict(),  # OS^3 with the kNN-LM defaults (SpeculativeKNNConfig), synchronous
    "os3-g0.6": dict(gamma_max=0.6),  # the paper's cap
    "os3-g0.9": dict(gamma_max=0.9),
    "os3-g0.95": dict(gamma_max=0.95),
    "async": dict(async_verify=True),
    "s=4": dict(os3=False, fixed_stride=4),
    "s=8": dict(os3=False, fixed_stride=8),
    "async-s=4": dict(os3=False, fixed_stride=4, async_verify=True),
}


def _derive(source, size: int | None, kind: str, work: Path, args) -> "object":
    from ralmspec.knnlm.datastore import DatastoreBuildConfig, load_datastore, reindex_datastore

    name = f"{'all' if size is None else size}-{kind}"
    path = work / name
    if (path / "manifest.json").is_file():
        return load_datastore(path, gemm_min_batch=args.gemm_min_batch)
    cfg = DatastoreBuildConfig(index=kind, max_tokens=size, ivf_nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                               hnsw_ef_construction=args.ef_construction, hnsw_ef_search=args.ef_search)
    t0 = time.perf_counter()
    reindex_datastore(source, path, cfg)
    print(f"  built {name} index in {time.perf_counter() - t0:.1f} s", flush=True)
    return load_datastore(path, gemm_min_batch=args.gemm_min_batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True)
    p.add_argument("--sizes", default="50000,200000,all")
    p.add_argument("--indexes", default="flat,hnsw,ivf")
    p.add_argument("--variants", default="os3,s=4,async")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--prompts", choices=("passages", "questions"), default="passages")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--lam", type=float, default=0.25)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=64)
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--gemm-min-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default=None, help="where derived datastores are cached (default: SOURCE/../derived)")
    p.add_argument("--out", default="experiments/results/knnlm")
    args = p.parse_args(argv)
    from ralmspec.errors import RalmSpecError

    try:
        return _main(args, argv)
    except RalmSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _lists(args) -> tuple[list[int | None], list[str], list[str]]:
    """(sizes, index kinds, variant names) of --sizes / --indexes / --variants; ConfigError naming
    the first bad item (before anything loads)."""
    from ralmspec.errors import ConfigError

    def items(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    sizes: list[int | None] = []
    for s in items(args.sizes):
        if s != "all" and not (s.isascii() and s.isdigit() and int(s) > 0):
            raise ConfigError(f"--sizes takes a comma list of entry counts >= 1 or 'all', got {s!r}")
        sizes.append(None if s == "all" else int(s))
    kinds, names = items(args.indexes), items(args.variants)
    bad = [k for k in kinds if k not in ("flat", "hnsw", "ivf")] + [v for v in names if v not in VARIANTS]
    if bad or not (sizes and kinds and names):
        raise ConfigError(f"--sizes, --indexes (flat, hnsw, ivf) and --variants ({', '.join(VARIANTS)}) each "
                          f"take a non-empty comma list; unknown: {', '.join(bad) or '-'}")
    return sizes, kinds, names


def _main(args, argv) -> int:
    from ralmspec.knnlm.cli import bench_prompts, machine_info, run_bench
    from ralmspec.threads import set_threads
    from ralmspec.knnlm.datastore import load_datastore
    from ralmspec.knnlm.model import KNNLM, KNNLMConfig
    from ralmspec.knnlm.speculative import SpeculativeKNNConfig
    from ralmspec.lm.models import load_lm
    from ralmspec.paths import check_output_path

    sizes, kinds, names = _lists(args)
    set_threads(args.threads)
    check_output_path(args.out, "--out", folder=True)
    source = load_datastore(args.source)
    work = Path(args.work) if args.work else Path(args.source).resolve().parent / "derived"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_lm(source.model_name)
    cfg = KNNLMConfig(k=args.k, lam=args.lam, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    variants = {v: SpeculativeKNNConfig(**VARIANTS[v]) for v in names}
    prompts = bench_prompts(lm, args.prompts, args.n, args.prompt_tokens)
    result = {"command": " ".join(["python -m experiments.knnlm_bench", *(argv or sys.argv[1:])]),
              "source": source.describe() | {"build": source.manifest.get("build")},
              "knnlm": asdict(cfg), "variants": {k: asdict(v) for k, v in variants.items()},
              "machine_start": machine_info(), "cells": []}
    t_all = time.perf_counter()
    ok = True
    for size in sizes:
        if size is not None and size > source.n:
            print(f"skip size {size}: the source has only {source.n} entries", flush=True)
            continue
        for kind in kinds:
            ds = _derive(args.source, size, kind, work, args)
            knn = KNNLM(lm, ds, cfg)
            t0 = time.perf_counter()
            r = run_bench(knn, variants, prompts, warmup=1)
            cell = {"entries": ds.n, "index": kind, "index_info": ds.manifest["index"],
                    "index_build_s": ds.manifest.get("reindexed_from", {}).get("index_s"),
                    "disk_bytes": ds.disk_bytes(), "wall_s": time.perf_counter() - t0,
                    "loadavg_1m": machine_info().get("loadavg_1m"), **r}
            result["cells"].append(cell)
            for name, v in r["variants"].items():
                s = v["summary"]
                ok &= s["all_identical"]
                print(f"{ds.n:>7} {kind:>5} {name:>11}: identical={s['all_identical']} over "
                      f"{s['speculated_steps']} speculated tokens, speed-up {s['speedup']:.2f}x "
                      f"limit {s['limit']:.2f}x acceptance {s['acceptance_rate']:.3f} stride {s['mean_stride']:.2f} "
                      f"(naive {s['naive_lm_ms_per_token']:.1f}+{s['naive_search_ms_per_token']:.1f} ms/tok, "
                      f"spec {s['spec_ms_per_token']:.1f} ms/tok)", flush=True)
            (out / "knnlm_bench.json").write_text(json.dumps(result, indent=1))
    result["wall_s"] = time.perf_counter() - t_all
    result["machine_end"] = machine_info()
    (out / "knnlm_bench.json").write_text(json.dumps(result, indent=1))
    (out / "knnlm_bench.md").write_text(render_table(result))
    print(render_table(result))
    return 0 if ok else 3


def render_table(result: dict) -> str:
    names = list(result["variants"])
    head = ("| entries | index | naive LM ms/tok | naive search ms/tok | limit (a+r)/a | "
            + " | ".join(f"{n} speed-up (acc., stride)" for n in names) + " | identical |")
    lines = [head, "|" + "---|" * (6 + len(names))]
    for c in result["cells"]:
        s0 = c["variants"][names[0]]["summary"]
        cells = []
        for n in names:
            s = c["variants"][n]["summary"]
            cells.append(f"{s['speedup']:.2f}x ({s['acceptance_rate']:.2f}, {s['mean_stride']:.1f})")
        ident = all(c["variants"][n]["summary"]["all_identical"] for n in names)
        speculated = sum(c["variants"][n]["summary"]["speculated_steps"] for n in names)
        lines.append(f"| {c['entries']} | {c['index']} | {s0['naive_lm_ms_per_token']:.1f} | "
                     f"{s0['naive_search_ms_per_token']:.1f} | {s0['limit']:.2f}x | " + " | ".join(cells)
                     + f" | {'yes' if ident else 'NO'} over {speculated} speculated tokens |")
    m = result.get("machine_start", {})
    lines.append("")
    lines.append(f"Command: `{result['command']}`; machine: {m.get('cpu_count')} CPUs, torch threads "
                 f"{m.get('torch_threads')}, load average at start {m.get('loadavg_1m')}. Speed-up = Σ naive "
                 "latency / Σ speculative latency over the prompts (same process, alternating order); limit from "
                 "the same naive runs; acc. = accepted / speculated tokens; stride = speculated tokens per "
                 "verification round.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
