"""`ralmspec` command line: generate, index build, bench, serve, knnlm, info.

Every failure the user can cause ends with one line `error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Any, Iterator

from ralmspec import __version__
from ralmspec.cli_options import add_emulate_pad_arg, add_engine_args, apply_threads, engine_config_from_args
from ralmspec.config import BOUND_GUESSERS, GUESSERS, RETRIEVER_KINDS, EngineConfig, RetrievalConfig, check_text
from ralmspec.errors import ML_INSTALL_HINT, ML_MODULES, ConfigError, RalmSpecError
from ralmspec.lm.loader import dtype_name
from ralmspec.paths import check_output_path, write_text_atomically


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
    check_text(a.question, "the question")  # before the model loads
    if a.stream and a.json:
        raise RalmSpecError("--stream prints the answer as it is verified and --json the whole result "
                            "at the end; pass one of them")
    cfg = with_drawn_seed(engine_config_from_args(a))
    if a.logprobs is not None:
        cfg = replace(cfg, generation=replace(cfg.generation, logprobs=a.logprobs))
    if a.stop:
        cfg = replace(cfg, generation=replace(cfg.generation, stop=tuple(a.stop)))
    apply_threads(a)
    from ralmspec.engine.core import build_engine

    t = time.perf_counter()
    engine = build_engine(cfg, corpus_path=a.corpus)
    _log(f"loaded model {cfg.model!r} and {cfg.retrieval.kind} knowledge base "
         f"({len(engine.retriever.corpus)} passages) in {time.perf_counter() - t:.1f}s")
    if a.stream:
        print(f"question: {a.question}")
        print("answer:   ", end="", flush=True)
        printer = _AnswerPrinter(engine.lm.tokenizer, cfg.generation.stop)
        try:
            res = engine.generate_sync(a.question, retrieval=a.retrieval, on_tokens=printer)
        except BaseException:  # Ctrl-C, an error: the partial answer's line ends before the shell's prompt
            print(flush=True)
            raise
        printer.finish()
    else:
        res = engine.generate_sync(a.question, retrieval=a.retrieval)
    if a.json:
        print(json.dumps(res.to_dict(with_trace=True), indent=1))
        return 0
    if not a.stream:
        print(f"question: {a.question}")
        print(f"answer:   {res.text.strip()}")
    print(f"\n{res.mode} · {len(res.token_ids)} tokens · {res.latency_s:.2f}s · finish={res.finish_reason}")
    if res.logprobs is not None:
        _print_logprobs(res.logprobs, engine.lm.tokenizer)
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
    if res.token_ids:  # the LM's time over every token it produced (rolled-back ones included)
        print(f"  LM {s['lm_s'] / max(1, len(res.token_ids) + s.get('wasted_tokens', 0)) * 1e3:.2f} ms/token "
              f"(prefills included) · end to end {res.latency_s / len(res.token_ids) * 1e3:.2f} ms/token")
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
    runner = getattr(engine.lm, "runner", None)
    if runner is not None:
        state = _runner_state(engine.lm)
        extra = "".join(f" · {k[3:].replace('_', ' ')} {v}" for k, v in state.items())
        print(f"  LM runner {runner.name} on {getattr(engine.lm, 'device', '?')} in {dtype_name(engine.lm) or '?'}{extra}")
    return 0


class _AnswerPrinter:
    """``on_tokens`` for ``--stream``: prints the answer's text as its chunks are verified (stop
    strings applied: ``ralmspec.engine.stream.VerifiedText``; leading blanks dropped); ``finish``
    prints the rest and a newline (the engine passes every chunk before ``generate`` returns)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]):
        from ralmspec.engine.stream import VerifiedText

        self.text, self.started = VerifiedText(tokenizer, stops), False

    def __call__(self, chunk: list[int]) -> None:
        self._show(self.text.push(chunk))

    def finish(self) -> None:
        self._show(self.text.finish())
        print(flush=True)

    def _show(self, delta: str) -> None:
        if not self.started:
            delta = delta.lstrip()
            self.started = bool(delta)
        print(delta, end="", flush=True)


def _print_logprobs(logprobs: list, tokenizer) -> None:
    """One line per answer token: its text, log-probability and the alternatives (``--logprobs``)."""
    def piece(token: int) -> str:
        return repr(tokenizer.decode([token]))

    print("\ntoken logprobs (token, log-probability | the most likely tokens there):")
    for i, lp in enumerate(logprobs):
        top = ", ".join(f"{piece(t)} {v:.3f}" for t, v in lp.top)
        print(f"  {i:3d}  {piece(lp.token):<16} {lp.logprob:8.3f}" + (f"  | {top}" if top else ""))


def cmd_index_build(a: argparse.Namespace) -> int:
    from ralmspec.data.loaders import default_corpus, load_corpus
    from ralmspec.retrieval.encoder import QueryEncoder
    from ralmspec.retrieval.index import build_index

    cfg = RetrievalConfig(kind=a.retriever, device=a.retriever_device, hnsw_ef_search=a.ef_search,
                          ivf_nprobe=a.nprobe, ivf_nlist=a.nlist, hnsw_m=a.hnsw_m)
    if a.shards is not None and a.shards < 1:
        raise ConfigError("--shards must be >= 1")
    check_output_path(a.out, "--out", folder=True)
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


def _encoder_settings(retriever) -> dict:
    """The query encoder's device and batching, for a bench's settings (none for BM25)."""
    enc = getattr(retriever, "encoder", None)
    if enc is None or not hasattr(enc, "batching"):
        return {}
    return {"encoder_device": enc.device, "encoder_batching": enc.batching}


def _runner_state(lm: Any) -> dict:
    """What the LM runner did during the run (``KVRunner.state``: CUDA graphs held, spans the
    compiled step ran at), as ``lm_*`` keys: how a GPU run shows that its steps were captured."""
    runner = getattr(lm, "runner", None)
    state = runner.state() if runner is not None else {}
    return {f"lm_{k}": state[k] for k in ("cuda_graphs", "compiled_spans") if k in state}


def _write_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    write_text_atomically(path, json.dumps(obj, indent=1))
    _log(f"wrote {path}")


def _write_outputs(path: str | None, questions: list[str], answers: list[list[str]],
                   runs: dict[str, list]) -> None:
    """One JSON line per (question, mode): the generated text and its token ids, whether it holds
    a gold answer, latency, the passages used and the request's speculation stats, so that a
    table's answer_match, identity and speed-up can be checked from the file."""
    if not path:
        return
    from ralmspec.answers import contains_answer

    lines = []
    for mode, results in runs.items():
        for i, r in enumerate(results):
            row = {"i": i, "mode": mode, "question": questions[i], "answers": answers[i], "text": r.text,
                   "match": contains_answer(r.text, answers[i]) if answers[i] else None,
                   "latency_s": round(r.latency_s, 4), "tokens": len(r.token_ids),
                   "finish_reason": r.finish_reason, "passages": sorted({st.title for st in r.steps}),
                   "token_ids": list(r.token_ids), "stats": r.stats}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_text_atomically(path, "".join(lines))
    _log(f"wrote {path}")


def cmd_bench(a: argparse.Namespace) -> int:
    from ralmspec.bench import ablation_variants, format_table, identity_line, run_bench, run_closed_book
    from ralmspec.data.loaders import load_questions, resolve_questions
    from ralmspec.engine.core import build_engine

    if a.n < 1:
        raise RalmSpecError("--n must be >= 1")
    for flag, path in (("--json", a.json), ("--outputs", a.outputs)):
        if path is not None:  # before the run: not a traceback once it is done
            check_output_path(path, flag)
    cfg = with_drawn_seed(engine_config_from_args(a))
    qs = load_questions(resolve_questions(a.questions))
    questions = [q.question for q in qs[: a.n]]
    answers = [q.answers for q in qs[: a.n]]
    has_answers = any(answers)
    if len(questions) < a.n:
        _log(f"note: only {len(questions)} questions available")
    apply_threads(a)
    engine = build_engine(cfg, corpus_path=a.corpus)  # with the EMULATED pad of --emulate-pad (retrieval/open.py)
    label = cfg.retrieval.kind
    if a.emulate_pad:
        label = f"exact EMULATED {len(engine.retriever.corpus) + a.emulate_pad:,}"
    lm_runner = getattr(getattr(engine.lm, "runner", None), "name", None)
    settings = {"model": cfg.model, "lm_backend": cfg.lm_backend, "lm_runner": lm_runner,
                "lm_device": cfg.lm_device, "lm_dtype": dtype_name(engine.lm) or cfg.lm_dtype,
                "retriever": cfg.retrieval.kind, **_encoder_settings(engine.retriever),
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
    _write_json(a.json, {**out, "settings": settings | _runner_state(engine.lm)})
    _write_outputs(a.outputs, questions, answers, runs)
    bad = [s for s in summaries if s.identical_fraction < 1.0]
    for s in bad:
        _log(f"error: {s.variant}: tokens differ from the naive loop on questions {s.mismatched_questions}")
    return 1 if bad else 0


def cmd_info(a: argparse.Namespace) -> int:
    from ralmspec.info import collect_info, format_info

    info = collect_info()
    print(json.dumps(info, indent=1) if a.json else format_info(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ralmspec", description=__doc__)
    p.add_argument("--version", action="version", version=f"ralmspec {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one question with iterative retrieval")
    g.add_argument("question")
    g.add_argument("--json", action="store_true", help="print the full result with its trace as JSON")
    g.add_argument("--no-retrieval", dest="retrieval", action="store_false", default=True,
                   help="closed book: the same prompt format with no passage and no retrieval")
    g.add_argument("--stream", action="store_true",
                   help="print the answer as it is verified, chunk by chunk (never a speculated token)")
    g.add_argument("--stop", action="append", default=None, metavar="S",
                   help="end the answer before the first occurrence of S (repeatable: the first one the text completes)")
    g.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="also print every answer token's log-probability and its K most likely "
                        "alternatives (0-20; taken from decoding, identical with speculation on or off)")
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    ix = sub.add_parser("index", help="knowledge-base indexes").add_subparsers(dest="index_command", required=True)
    b = ix.add_parser("build", help="build and save an index")
    b.add_argument("--corpus", default="default", help="passages file, or 'default' (embedded WikiText-103 articles)")
    b.add_argument("--retriever", required=True, help=f"one of {', '.join(RETRIEVER_KINDS)}")
    b.add_argument("--out", required=True)
    b.add_argument("--retriever-device", default="cpu", help="cpu or cuda (faiss-gpu) (default %(default)s)")
    b.add_argument("--ef-search", type=int, default=128,
                   help="not saved with the index: HNSW efSearch is a search setting, given to generate / bench / "
                        "serve (their --ef-search, default 128)")
    b.add_argument("--nprobe", type=int, default=8,
                   help="not saved with the index: IVF nprobe is a search setting, given to generate / bench / "
                        "serve (their --nprobe, default 8)")
    b.add_argument("--nlist", type=int, default=64, help="IVF lists (default %(default)s)")
    b.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree M (default %(default)s)")
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
    add_engine_args(be)
    be.set_defaults(func=cmd_bench)

    inf = sub.add_parser("info", help="versions, devices and the cache (models, indexes): for a bug report")
    inf.add_argument("--json", action="store_true", help="print it as JSON")
    inf.set_defaults(func=cmd_info)

    from ralmspec.knnlm.cli import add_knnlm_subparsers
    from ralmspec.serving.cli import add_knnlm_serve_parser, add_serve_parser

    add_serve_parser(sub)
    add_knnlm_subparsers(sub, [add_knnlm_serve_parser])
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's ``KeyboardInterrupt`` is (see
    ``sigterm_as_interrupt``)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (a process manager's stop, ``kill``, ``timeout``) interrupts the
    main thread as Ctrl-C does, so the command's ``finally`` blocks run: a build removes its
    temporary folder (an index, a datastore, a model conversion: SIGTERM's default, an immediate
    exit, left them in the output's or the cache's folder, hidden). Off the main thread, where
    handlers cannot be set, a no-op. ``serve`` replaces it with its own handler while it listens."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return a.func(a) or 0
    except (RalmSpecError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a plain `pip install ralmspec`: no ML stack
        if (exc.name or "").split(".")[0] not in ML_MODULES:
            raise  # a bug, not an install to complete
        print(f"error: `ralmspec {a.command}` needs the ML stack, and the module {exc.name!r} is not installed: "
              f"{ML_INSTALL_HINT}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM: one line, no traceback
        sig = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        print(f"ralmspec {a.command}: stopped by {sig.name}", file=sys.stderr)
        return 128 + sig


if __name__ == "__main__":
    sys.exit(main())
