"""``ralmspec knnlm build | reindex | generate | bench | eval`` (argparse wiring + the command bodies).

The lead's CLI calls :func:`add_knnlm_subparsers` with its top-level ``subparsers`` object; each
leaf parser sets ``func`` (``args.func(args) -> int`` exit code). ``python -m ralmspec.knnlm.cli``
runs the same commands stand-alone.

- ``build``: ``--model`` (default "smollm2"), ``--corpus TEXT`` (default: the embedded WikiText-103
  passages; ``wt103:valid``, ``wt103:test:first-half``, ... or a file, ``ralmspec.knnlm.texts``),
  ``--max-documents N``, ``--out DIR``, ``--index {flat,ivf,hnsw}``, ``--max-tokens N``; ``--shards N`` builds
  the whole datastore aside and splits it into N entry-id shards (``--from-datastore DIR`` splits
  an existing one instead).
- ``generate "prompt" --datastore DIR [--no-speculate]``: prints the continuation (``--json``
  for the full result with timings and speculation stats).
- ``bench --datastore DIR --n N --json OUT``: naive vs speculative on the same prompts; checks
  token identity (exit code 1 if any prompt differs), reports speed-up, the limit (a+r)/a from
  the naive trace, and the acceptance rate.
- ``eval --datastore DIR --text TEXT [--lam 0,0.25] [--k 8,64] [--temperature 1] [--json FILE]``:
  perplexity of the base LM and of the kNN-LM for every (λ, k, T) from one LM pass, in sliding
  windows (``--context``, ``--stride``; default: the datastore's key windows); the search recall
  of an approximate index against exact search (``ralmspec.knnlm.perplexity``).

``generate`` and ``bench`` open a sharded ``--datastore`` in this process, or, with ``--shards N``
(or ``--ray-address``), with one Ray actor per shard (``--ray-cpus``, ``--shard-threads``,
``--shard-cpus`` as for ``ralmspec serve``); the tokens are the same either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ralmspec.config import LM_RUNNERS
from ralmspec.errors import ConfigError, RalmSpecError
from ralmspec.paths import check_output_path, staging_folder, write_text_atomically
from ralmspec.threads import set_threads

# `knnlm serve --lm-runner auto` shares the batched runner from this many decoding threads (on
# the CPU; make_runner's "concurrent"): measured on the 2-core VM (docs/knnlm.md), 2 clients
# decoded faster on the eager runner with speculation, 4 and 8 on the shared batched runner
SHARED_FROM = 4

# ------------------------------------------------------------------ shared options


def add_decoding_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kNN-LM decoding")
    g.add_argument("--model", default=None, help="LM (default: the model named in the datastore manifest)")
    g.add_argument("--k", type=int, default=16, help="neighbours per token (default 16)")
    g.add_argument("--lam", type=float, default=0.25, help="λ, weight of p_knn (default 0.25)")
    g.add_argument("--temperature", type=float, default=1.0, help="T in exp(-d/T), d = squared L2 (default 1)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: manifest)")
    g.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (default: manifest)")
    g.add_argument("--gemm-min-batch", type=int, default=None,
                   help="flat: batches of >= this many queries use one GEMM for candidates (0: never; "
                        "the answer is identical either way)")
    s = p.add_argument_group("speculation")
    s.add_argument("--stride", type=int, default=None, help="fixed speculation stride (default: OS^3)")
    s.add_argument("--successors", type=int, default=10, help="successors i+1..i+m cached per entry (default 10)")
    s.add_argument("--cache-capacity", type=int, default=2048, help="cache entries per request (default 2048)")
    s.add_argument("--gamma-max", type=float, default=None,
                   help="OS^3 cap on the acceptance estimate (default: SpeculativeKNNConfig's, 0.98)")
    s.add_argument("--s-max", type=int, default=16, help="OS^3 largest stride (default 16)")
    s.add_argument("--async", dest="async_verify", action="store_true", help="verify in a worker thread")
    s.add_argument("--strict", action="store_true", help="accept only identical top-k neighbour sets")
    p.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default: library defaults)")
    p.add_argument("--device", default="cpu", help="LM device (cpu, cuda)")
    p.add_argument("--lm-runner", default="auto", choices=LM_RUNNERS,
                   help="how the LM runs (docs/lm-runner.md): auto (static on cuda, eager on cpu; knnlm serve "
                        f"with --max-concurrent >= {SHARED_FROM} on cpu: batched, its requests sharing forwards), "
                        "eager, "
                        "static (KV slots; each token a captured CUDA graph on cuda), batched, compiled "
                        "(static with its step torch.compile'd)")


def speculative_config(args: argparse.Namespace):
    from ralmspec.knnlm.speculative import SpeculativeKNNConfig

    cap = {} if args.gamma_max is None else {"gamma_max": args.gamma_max}
    return SpeculativeKNNConfig(successors=args.successors, cache_capacity=args.cache_capacity,
                                os3=args.stride is None, fixed_stride=3 if args.stride is None else args.stride,
                                s_max=args.s_max,
                                strict=args.strict, async_verify=args.async_verify, **cap)


def add_shard_options(p: argparse.ArgumentParser) -> None:
    x = p.add_argument_group("scale-out (Ray; docs/scale-out.md)")
    x.add_argument("--shards", type=int, default=None, metavar="N",
                   help="search a sharded --datastore (N shards, `knnlm build --shards N`) with one Ray actor "
                        "per shard; without it a sharded datastore is searched in this process")
    x.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (`ray start --head` prints it) instead of starting a local one")
    x.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster started by --shards")
    x.add_argument("--shard-threads", type=int, default=1, help="FAISS / torch threads in each shard actor")
    x.add_argument("--shard-cpus", type=float, default=0.0,
                   help="CPUs Ray reserves per shard actor (placement only; 0: any number per host)")


def _check_shards(shards: int | None) -> None:
    if shards is not None and shards < 1:
        raise ConfigError(f"--shards must be >= 1, got {shards}")


def _open_datastore(args: argparse.Namespace):
    """The datastore of --datastore (``knnlm.open.open_datastore``): whole, sharded in this
    process, or sharded on Ray (--shards / --ray-address)."""
    from ralmspec.cluster import RayShardConfig
    from ralmspec.knnlm.open import open_datastore

    shards, ray_address = getattr(args, "shards", None), getattr(args, "ray_address", None)
    ray_cfg = None
    if shards is not None or ray_address:
        ray_cfg = RayShardConfig(address=ray_address, num_cpus=args.ray_cpus, threads=args.shard_threads,
                                 actor_cpus=args.shard_cpus)
    return open_datastore(args.datastore, ray=ray_cfg, shards=shards, nprobe=args.nprobe, ef_search=args.ef_search,
                          gemm_min_batch=getattr(args, "gemm_min_batch", None))


@contextlib.contextmanager
def open_knnlm(args: argparse.Namespace) -> Iterator[tuple[Any, Any]]:
    """(KNNLM, datastore) from --datastore and the decoding options; a sharded datastore's shards
    (Ray actors, a local Ray cluster) are released on exit."""
    from ralmspec.knnlm.model import KNNLM, KNNLMConfig
    from ralmspec.lm.models import load_lm

    ds = _open_datastore(args)
    try:
        # a server of several concurrent requests: "auto" may pick the batched runner (make_runner)
        lm = load_lm(args.model or ds.model_name, device=args.device, runner=args.lm_runner,
                     concurrent=getattr(args, "max_concurrent", 1) >= SHARED_FROM)
        cfg = KNNLMConfig(k=args.k, lam=args.lam, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
        yield KNNLM(lm, ds, cfg), ds
    finally:
        if hasattr(ds, "close"):
            ds.close()


# ------------------------------------------------------------------ build


def cmd_build(args: argparse.Namespace) -> int:
    from ralmspec.knnlm.datastore import DatastoreBuildConfig, build_datastore
    from ralmspec.lm.models import load_lm

    set_threads(args.threads)
    _check_shards(args.shards)
    check_output_path(args.out, "--out", folder=True)
    if args.from_datastore:  # split an existing whole datastore (knnlm/sharded.py)
        if args.shards is None:
            raise ConfigError("--from-datastore splits an existing datastore into shards: give --shards N")
        return _split(args.from_datastore, args, time.perf_counter())
    cfg = DatastoreBuildConfig(index=args.index, key_dtype=args.key_dtype, max_tokens=args.max_tokens,
                               window=args.window, stride=args.context_stride, batch_size=args.batch_size,
                               ivf_nlist=args.nlist, ivf_nprobe=args.nprobe, pq_m=args.pq_m, hnsw_m=args.hnsw_m,
                               hnsw_ef_construction=args.ef_construction, hnsw_ef_search=args.ef_search)
    corpus = _documents(args.corpus, args.max_documents)
    lm = load_lm(args.model, device=args.device)
    t0 = time.perf_counter()
    if args.shards is not None:  # build whole (aside), then split
        # built inside the locked staging folder (shard_index.build_sharded_index says why)
        with staging_folder(_parent(args.out), f".{Path(args.out).name}.whole-") as aside:
            build_datastore(lm, corpus, aside / "datastore", cfg, model_name=args.model, overwrite=True,
                            progress=not args.quiet)
            return _split(aside / "datastore", args, t0)
    ds = build_datastore(lm, corpus, args.out, cfg, model_name=args.model, overwrite=args.overwrite,
                         progress=not args.quiet)
    info = ds.describe() | {"build": ds.manifest["build"], "wall_s": round(time.perf_counter() - t0, 3)}
    print(json.dumps(info, indent=2))
    return 0


def _documents(source: str | None, max_documents: int | None) -> list[str]:
    """The documents of ``source`` (``ralmspec.knnlm.texts.load_documents``; None: the embedded
    corpus, test + valid articles), the first ``max_documents`` of them when given."""
    from ralmspec.knnlm.texts import load_documents

    if max_documents is not None and max_documents < 1:
        raise ConfigError(f"--max-documents must be >= 1, got {max_documents}")
    if source:
        docs = load_documents(source)
    else:
        from ralmspec.data.loaders import default_corpus
        from ralmspec.knnlm.datastore import corpus_documents

        docs = corpus_documents(default_corpus())
    return docs if max_documents is None else docs[:max_documents]


def _parent(out: str) -> str:
    parent = Path(out).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent)


def _split(src: str | os.PathLike, args: argparse.Namespace, t0: float) -> int:
    """``knnlm build --shards N``: split the whole datastore at ``src`` into ``args.out``; print a summary."""
    from ralmspec.knnlm.sharded import shard_datastore

    out = shard_datastore(src, args.out, args.shards, overwrite=args.overwrite)
    m = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"path": str(out), "entries": m["count"], "dim": m["dim"], "index": m["index"]["kind"],
                      "model": m["model"], "shards": m["shards"], "wall_s": round(time.perf_counter() - t0, 3)},
                     indent=2))
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    from ralmspec.knnlm.datastore import DatastoreBuildConfig, reindex_datastore

    set_threads(args.threads)
    check_output_path(args.out, "--out", folder=True)
    cfg = DatastoreBuildConfig(index=args.index, ivf_nlist=args.nlist, ivf_nprobe=args.nprobe, pq_m=args.pq_m,
                               hnsw_m=args.hnsw_m, hnsw_ef_construction=args.ef_construction,
                               hnsw_ef_search=args.ef_search, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    ds = reindex_datastore(args.datastore, args.out, cfg, overwrite=args.overwrite)
    print(json.dumps(ds.describe() | {"index": ds.manifest["index"], "wall_s": round(time.perf_counter() - t0, 3)},
                     indent=2))
    return 0


# ------------------------------------------------------------------ generate


def cmd_generate(args: argparse.Namespace) -> int:
    from ralmspec.knnlm.speculative import SpeculativeKNNLM

    set_threads(args.threads)
    with open_knnlm(args) as (knn, _):
        if args.no_speculate:
            res = knn.generate(args.prompt)
        else:
            res = SpeculativeKNNLM(knn, speculative_config(args)).generate(args.prompt)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(res.text)
    return 0


# ------------------------------------------------------------------ bench


def bench_prompts(lm: Any, source: str, n: int, prompt_tokens: int) -> list[list[int]]:
    """``n`` prompts as token ids (``bench_texts``), each cut to ``prompt_tokens`` tokens."""
    out = []
    for t in bench_texts(source, n):
        ids = lm.tokenizer.encode(t)[:prompt_tokens]
        if ids:
            out.append(ids)
    return out


def bench_texts(source: str, n: int) -> list[str]:
    """``n`` prompt texts: first sentences of passages spread evenly over the embedded corpus
    (``passages``) or the first embedded NQ questions (``questions``)."""
    if n < 1:
        raise ConfigError("--n must be >= 1")
    texts: list[str] = []
    if source == "passages":
        from ralmspec.data.loaders import default_corpus

        corpus = default_corpus()
        step = max(1, len(corpus) // n)
        for i in range(0, len(corpus), step):
            first = corpus[i].text.split(". ")[0]
            texts.append(first)
            if len(texts) == n:
                break
    elif source == "questions":
        from ralmspec.data.loaders import default_questions

        texts = [q.question for q in default_questions()[:n]]
    else:
        raise ConfigError(f"unknown prompt source {source!r}; choose passages or questions")
    return texts


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _summary(records: list[dict]) -> dict:
    sum_ = lambda key: sum(r[key] for r in records)  # noqa: E731
    tokens = max(1, sum_("new_tokens"))
    s = {
        "prompts": len(records),
        "all_identical": all(r["identical"] for r in records),
        "differing_prompts": [i for i, r in enumerate(records) if not r["identical"]],
        "new_tokens": sum_("new_tokens"),
        "naive_wall_s": sum_("naive_wall_s"), "spec_wall_s": sum_("spec_wall_s"),
        "speedup": sum_("naive_wall_s") / sum_("spec_wall_s"),
        "median_speedup": statistics.median(r["speedup"] for r in records),
        "limit": (sum_("naive_lm_s") + sum_("naive_search_s")) / sum_("naive_lm_s"),
        "naive_lm_ms_per_token": 1e3 * sum_("naive_lm_s") / tokens,
        "naive_search_ms_per_token": 1e3 * sum_("naive_search_s") / tokens,
        "spec_ms_per_token": 1e3 * sum_("spec_wall_s") / tokens,
        "spec_lm_ms_per_token": 1e3 * sum_("spec_lm_s") / tokens,
        "spec_cache_ms_per_token": 1e3 * sum_("spec_cache_s") / tokens,
        "spec_verify_ms_per_token": 1e3 * sum_("spec_verify_s") / tokens,
        "spec_verify_wait_ms_per_token": 1e3 * sum_("spec_verify_wait_s") / tokens,
        "acceptance_rate": sum_("accepted") / max(1, sum_("speculated")),
        # what the identity covered (a kNN-LM step is one token): speculated_steps 0 = naive vs naive
        "speculated_steps": sum_("speculated"), "verified_steps": sum_("verified_steps"), "accepted": sum_("accepted"),
        "rounds": sum_("rounds"), "rollbacks": sum_("rollbacks"),
        # OS^3's stride at each round's submission (as `ralmspec bench`), and tokens per round
        "mean_stride": _mean([x for r in records for x in r["strides"]]),
        "mean_verify_batch": sum_("speculated") / max(1, sum_("rounds")),
        "real_searches_per_token": sum_("real_searches") / tokens,
    }
    s["share_of_limit"] = (s["speedup"] - 1) / (s["limit"] - 1) if s["limit"] > 1 else None
    return s


def run_bench(knn: Any, variants: Any, prompts: Sequence[Sequence[int]], warmup: int = 1) -> dict:
    """Naive vs speculative kNN-LM on ``prompts``, one request at a time, in one process.

    ``variants``: one ``SpeculativeKNNConfig`` or a ``{name: config}`` mapping. For every prompt
    the naive decoder runs once and then each variant (the order naive/variants alternates from
    prompt to prompt), after ``warmup`` untimed prompts. Per variant: speed-up = Σ naive wall /
    Σ speculative wall; limit = (Σ LM + Σ search) / Σ LM of the naive runs, i.e. (a+r)/a;
    acceptance = Σ accepted / Σ speculated; every output is compared token for token.
    Returns ``{"variants": {name: {"summary", "records"}}}``, plus top-level ``summary`` and
    ``records`` when a single config was given.
    """
    from ralmspec.knnlm.speculative import SpeculativeKNNConfig, SpeculativeKNNLM

    single = isinstance(variants, SpeculativeKNNConfig)
    vmap = {"speculative": variants} if single else dict(variants)
    specs = {name: SpeculativeKNNLM(knn, cfg) for name, cfg in vmap.items()}
    for p in list(prompts)[:warmup]:
        knn.generate(p)
        for sp in specs.values():
            sp.generate(p)
    records: dict[str, list[dict]] = {name: [] for name in vmap}
    for i, p in enumerate(prompts):
        spec_res = {}
        if i % 2 == 0:
            a = knn.generate(p)
        for name, sp in specs.items():
            spec_res[name] = sp.generate(p)
        if i % 2 == 1:
            a = knn.generate(p)
        for name, b in spec_res.items():
            st = b.stats
            records[name].append({
                "prompt_tokens": len(p), "new_tokens": len(a.tokens), "identical": a.tokens == b.tokens,
                "naive_wall_s": a.wall_s, "naive_lm_s": a.lm_s, "naive_search_s": a.search_s,
                "spec_wall_s": b.wall_s, "spec_lm_s": st.lm_s, "spec_cache_s": st.cache_s,
                "spec_verify_s": st.verify_s, "spec_verify_wait_s": st.verify_wait_s,
                "spec_cache_add_s": st.cache_add_s, "real_searches": st.real_searches,
                "speculated": st.speculated, "accepted": st.accepted, "rounds": st.rounds,
                "rollbacks": st.rollbacks, "verified_steps": st.verified_steps, "naive_steps": st.naive_steps,
                "strides": st.strides, "verify_batch_sizes": st.verify_batch_sizes,
                "speedup": a.wall_s / b.wall_s if b.wall_s > 0 else float("nan"), "limit": a.limit(),
            })
    out: dict[str, Any] = {"variants": {name: {"summary": _summary(recs), "records": recs}
                                        for name, recs in records.items()}}
    if single:
        out["summary"] = out["variants"]["speculative"]["summary"]
        out["records"] = out["variants"]["speculative"]["records"]
    return out


def machine_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ralmspec.report import identity_phrase

    set_threads(args.threads)
    spec_cfg = speculative_config(args)
    if args.prompt_tokens < 1 or args.warmup < 0:
        raise ConfigError(f"--prompt-tokens must be >= 1 and --warmup >= 0, got {args.prompt_tokens} and {args.warmup}")
    if args.json:
        check_output_path(args.json, "--json")  # before the run: not a traceback once it is done
    with open_knnlm(args) as (knn, ds):
        prompts = bench_prompts(knn.lm, args.prompts, args.n, args.prompt_tokens)
        load0 = machine_info().get("loadavg_1m")
        t0 = time.perf_counter()
        result = run_bench(knn, spec_cfg, prompts, warmup=args.warmup)
        result["settings"] = {"datastore": ds.describe(), "knnlm": asdict(knn.config),
                              "lm": {"device": str(knn.lm.device), "runner": getattr(knn.lm.runner, "name", None)},
                              "speculation": asdict(spec_cfg), "prompts": args.prompts,
                              "prompt_tokens": args.prompt_tokens,
                              "machine": machine_info() | {"loadavg_1m_before": load0},
                              "bench_wall_s": time.perf_counter() - t0}
    s = result["summary"]
    identity = identity_phrase(s["prompts"] - len(s["differing_prompts"]), s["prompts"], "prompts",
                               s["speculated_steps"], s["verified_steps"], s["accepted"], s["rollbacks"], unit="tokens")
    print(f"{s['prompts']} prompts, {s['new_tokens']} tokens | {identity} | "
          f"speed-up {s['speedup']:.2f}x (median {s['median_speedup']:.2f}x) | limit (a+r)/a {s['limit']:.2f}x | "
          f"acceptance {s['acceptance_rate']:.3f} | mean stride {s['mean_stride']:.2f} | "
          f"naive LM {s['naive_lm_ms_per_token']:.1f} ms + search {s['naive_search_ms_per_token']:.1f} ms/token, "
          f"speculative {s['spec_ms_per_token']:.1f} ms/token")
    if args.json:
        write_text_atomically(args.json, json.dumps(result, indent=2))
    if not s["all_identical"]:
        print(f"ERROR: speculative output differs from naive for prompts {s['differing_prompts']}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------ eval


def _list_of(kind: type, what: str) -> Any:
    """argparse type: a comma-separated list of ``kind`` (``0,0.25`` / ``8,64``)."""
    def parse(text: str) -> tuple:
        try:
            items = tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError(f"expected at least one {what[:-1]}, got {text!r}")
        return items
    return parse


def _key_windows(ds: Any) -> tuple[int | None, int | None]:
    """(window, stride) the datastore's keys were computed with, from its manifest (None if absent)."""
    build = ds.manifest.get("build", {}).get("config", {})
    return build.get("window"), build.get("stride")


def overlap_line(res: Any) -> str:
    """The eval's statement of how much of the scored text the datastore holds verbatim
    (``ralmspec.knnlm.perplexity``, "Overlap"), a WARNING from ``OVERLAP_WARN`` on."""
    from ralmspec.knnlm.perplexity import OVERLAP_NGRAM, OVERLAP_WARN

    line = (f"overlap with the datastore: {res.overlap_tokens:,} of {res.tokens:,} scored tokens "
            f"({100 * res.overlap_fraction:.2f}%) lie in {OVERLAP_NGRAM}-token spans the datastore holds verbatim")
    if res.overlap_fraction >= OVERLAP_WARN:
        line = (f"WARNING: the text is (partly) inside the datastore: {line}; the kNN-LM perplexities are not "
                "held-out (its queries find their own text)")
    return line


def _index_label(ds: dict) -> str:
    """``flat`` / ``hnsw (approximate, efSearch 64)`` / ``ivf (approximate, nprobe 16)``: an
    approximate index with the search parameter its neighbours depend on."""
    kind, search = ds.get("index"), ds.get("search") or {}
    if kind == "hnsw" and "ef_search" in search:
        return f"hnsw (approximate, efSearch {search['ef_search']})"
    if kind == "ivf" and "nprobe" in search:
        return f"ivf (approximate, nprobe {search['nprobe']})"
    return f"{kind}"


def format_perplexity(res: Any, text: str) -> str:
    """The table ``knnlm eval`` prints."""
    ds = res.datastore
    lm = getattr(res, "lm", None)
    lines = [f"text {text}: {res.tokens:,} tokens scored in {res.documents} documents "
             f"(+{res.empty_documents} with < 2 tokens); context {res.context}, stride {res.stride}: every token "
             f"sees >= {res.context - res.stride} earlier tokens of its document (all near its start), documents "
             "scored apart, their first token not predicted",
             f"datastore {ds.get('path')}: {ds.get('entries', 0):,} entries, {_index_label(ds)} index, "
             f"model {ds.get('model')}" + (f"; evaluated LM {lm}" if lm is not None and lm != ds.get("model") else ""),
             overlap_line(res),
             f"base LM perplexity {res.ppl_base:.3f}",
             f"{'lam':>6} {'k':>6} {'T':>8} {'ppl':>10} {'vs base':>9}"]
    for r in res.runs:
        lines.append(f"{r.lam:>6g} {r.k:>6d} {r.temperature:>8g} {r.ppl:>10.3f} "
                     f"{100 * (r.ppl / res.ppl_base - 1):>+8.2f}%")
    b = res.best()
    lines.append(f"best: lam {b.lam:g}, k {b.k}, T {b.temperature:g}: {b.ppl:.3f} "
                 f"({100 * (b.ppl / res.ppl_base - 1):+.2f}% vs base)")
    if res.recall is not None:
        lines.append(f"search recall of the {ds.get('index')} index vs exact on the same {res.tokens:,} queries: "
                     + ", ".join(f"recall@{k} {v:.4f}" for k, v in res.recall.items()))
    lines.append(f"time: LM {res.lm_s:.1f} s, search {res.search_s:.1f} s, total {res.wall_s:.1f} s")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from ralmspec.knnlm.perplexity import OVERLAP_WARN, PerplexityConfig, evaluate_perplexity
    from ralmspec.lm.models import load_lm

    set_threads(args.threads)
    if args.json:
        check_output_path(args.json, "--json")  # before the run: not a traceback once it is done
    docs = _documents(args.text, args.max_documents)
    ds = _open_datastore(args)
    try:
        window, stride = _key_windows(ds)
        context = args.context if args.context is not None else window
        if context is None:
            raise ConfigError("give --context (the datastore's manifest records no key window to default to)")
        step = args.stride if args.stride is not None else (stride if args.context is None else max(1, context // 2))
        cfg = PerplexityConfig(context=context, stride=step, lams=args.lam, ks=args.k, temperatures=args.temperature,
                               max_tokens=args.max_tokens, search_batch=args.search_batch, recall=not args.no_recall)
        lm = load_lm(args.model or ds.model_name, device=args.device)
        res = evaluate_perplexity(lm, ds, docs, cfg, progress=not args.quiet)
    finally:
        if hasattr(ds, "close"):
            ds.close()
    print(format_perplexity(res, args.text))
    if res.overlap_fraction >= OVERLAP_WARN:  # also where a script keeps stderr only
        print(overlap_line(res), file=sys.stderr)
    if args.json:
        out = res.to_dict() | {"text": args.text, "model": args.model or ds.model_name,
                               "machine": machine_info()}
        write_text_atomically(args.json, json.dumps(out, indent=2))
    return 0


# ------------------------------------------------------------------ wiring


def add_knnlm_subparsers(subparsers: Any,
                         more: Sequence[Callable[[Any], Any]] = ()) -> argparse.ArgumentParser:
    """Add ``knnlm {build,reindex,generate,bench,eval}`` to a top-level ``subparsers``, and the
    commands that each of ``more`` registers on the knnlm sub-parsers (the lead's CLI adds
    ``serve`` from the serving package this way: it lives above this one); returns the knnlm parser."""
    p = subparsers.add_parser("knnlm", help="kNN-LM datastores and (speculative) kNN-LM decoding and serving",
                              description="kNN-LM with speculative retrieval (token-identical to naive kNN-LM)")
    names = ["build", "reindex", "generate", "bench", "eval"] + ["serve"] * bool(more)
    sub = p.add_subparsers(dest="knnlm_command", required=True, metavar="{" + ",".join(names) + "}")

    b = sub.add_parser("build", help="build a datastore from a corpus")
    b.add_argument("--model", default="smollm2", help="LM name (smollm2, tiny, random-small, random-medium) or local HF folder (default: smollm2)")
    b.add_argument("--corpus", default=None,
                   help="text to store: wt103:{test,valid}[:{all,first-half,second-half}] (the shipped WikiText-103 "
                        "articles), a passage corpus (.jsonl[.gz] / .tsv[.gz]), a WikiText .tokens file or a plain "
                        "text file; default: the embedded corpus (test + valid articles)")
    b.add_argument("--max-documents", type=int, default=None, help="only the first N documents (articles)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--index", choices=("flat", "ivf", "hnsw"), default="flat")
    b.add_argument("--max-tokens", type=int, default=None, help="at most this many entries (default: all)")
    b.add_argument("--key-dtype", choices=("float16", "float32"), default="float16")
    b.add_argument("--window", type=int, default=256, help="LM context window for keys (default 256)")
    b.add_argument("--context-stride", type=int, default=192, help="positions keyed per window (default 192)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~sqrt(N))")
    b.add_argument("--nprobe", type=int, default=16)
    b.add_argument("--pq-m", type=int, default=0, help="IVF-PQ sub-quantizers (0: IVF-Flat)")
    b.add_argument("--hnsw-m", type=int, default=32)
    b.add_argument("--ef-construction", type=int, default=64)
    b.add_argument("--ef-search", type=int, default=64)
    b.add_argument("--overwrite", action="store_true", help="replace an existing datastore folder")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--device", default="cpu")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--shards", type=int, default=None, metavar="N",
                   help="split the datastore into N contiguous entry-id shards (for --shards N of generate, "
                        "bench and serve, Ray); a flat datastore's shards answer exactly as the whole one (docs/scale-out.md)")
    b.add_argument("--from-datastore", default=None, metavar="DIR",
                   help="with --shards: split this existing (whole) datastore instead of building one")
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("reindex", help="same entries (keys reused; optionally a prefix), another index")
    r.add_argument("--datastore", required=True, help="existing datastore folder")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--index", choices=("flat", "ivf", "hnsw"), required=True)
    for name, kw in (("--nlist", dict(type=int, default=None)), ("--nprobe", dict(type=int, default=16)),
                     ("--pq-m", dict(type=int, default=0)), ("--hnsw-m", dict(type=int, default=32)),
                     ("--ef-construction", dict(type=int, default=64)), ("--ef-search", dict(type=int, default=64)),
                     ("--threads", dict(type=int, default=None)),
                     ("--max-tokens", dict(type=int, default=None, help="keep only the first N entries"))):
        r.add_argument(name, **kw)
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(func=cmd_reindex)

    g = sub.add_parser("generate", help="kNN-LM greedy continuation of a prompt")
    g.add_argument("prompt")
    g.add_argument("--datastore", required=True)
    g.add_argument("--no-speculate", action="store_true", help="naive kNN-LM (one search per token)")
    g.add_argument("--json", action="store_true", help="print the full result as JSON")
    add_decoding_options(g)
    add_shard_options(g)
    g.set_defaults(func=cmd_generate)

    n = sub.add_parser("bench", help="naive vs speculative kNN-LM on the same prompts")
    n.add_argument("--datastore", required=True)
    n.add_argument("--n", type=int, default=20, help="number of prompts (default 20)")
    n.add_argument("--json", default=None, help="write the full result here")
    n.add_argument("--prompts", choices=("passages", "questions"), default="passages")
    n.add_argument("--prompt-tokens", type=int, default=32, help="prompt length cap in tokens (default 32)")
    n.add_argument("--warmup", type=int, default=1)
    add_decoding_options(n)
    add_shard_options(n)
    n.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="perplexity of the base LM and of the kNN-LM on a text (λ / k / T sweeps)",
                       description="Token-level perplexity in sliding windows; every (λ, k, T) from one LM pass "
                                   "(ralmspec.knnlm.perplexity).")
    e.add_argument("--datastore", required=True)
    e.add_argument("--text", required=True,
                   help="wt103:{test,valid}[:{all,first-half,second-half}], a passage corpus (.jsonl[.gz] / "
                        ".tsv[.gz]), a WikiText .tokens file or a plain text file (one document)")
    e.add_argument("--lam", type=_list_of(float, "numbers"), default=(0.25,), help="λ values, e.g. 0,0.1,0.25")
    e.add_argument("--k", type=_list_of(int, "integers"), default=(16,), help="k values, e.g. 8,64,256")
    e.add_argument("--temperature", type=_list_of(float, "numbers"), default=(1.0,), help="T values (default 1)")
    e.add_argument("--context", type=int, default=None,
                   help="tokens per LM window (default: the datastore's key window)")
    e.add_argument("--stride", type=int, default=None,
                   help="tokens scored per window (default: the datastore's key stride; with --context: "
                        "context // 2)")
    e.add_argument("--max-tokens", type=int, default=None, help="score at most N tokens")
    e.add_argument("--max-documents", type=int, default=None, help="only the first N documents (articles)")
    e.add_argument("--search-batch", type=int, default=256, help="queries per datastore search (default 256)")
    e.add_argument("--no-recall", action="store_true",
                   help="approximate index: skip the exact search that measures its recall")
    e.add_argument("--model", default=None, help="LM (default: the model named in the datastore manifest)")
    e.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: manifest)")
    e.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (default: manifest)")
    e.add_argument("--json", default=None, metavar="FILE",
                   help='write {"tokens", "ppl_base", "runs": [{"lam", "k", "temperature", "ppl"}, ...], ...} here')
    e.add_argument("--threads", type=int, default=None, help="torch and FAISS threads")
    e.add_argument("--device", default="cpu")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)
    for register in more:
        register(sub)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ralmspec")
    add_knnlm_subparsers(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(["knnlm", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except RalmSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # as `ralmspec knnlm ...`: no traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
