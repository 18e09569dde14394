"""One place to open a knowledge base: what the engine, the server and the benchmarks search.

``open_knowledge_base(config, corpus_path, ray=..., shards=...)`` decides, in this order and
before any engine exists:

1. **the query encoder** of a dense index (``encoder.encoder_for``: ``config.encoder_device``,
   else cuda when the index searches on cuda and CUDA is there, else cpu), made once and shared
   by every part that encodes (the whole index, or the caller side of a sharded one);
2. **which folder**: ``config.index_dir`` if set (with a ``corpus_path`` too: a ConfigError, the
   corpus would go unread); else the cached index of ``corpus_path``, or of the embedded
   knowledge base, built on first use (its cached ``shards``-way split when shards are asked for);
3. **whole or sharded** (manifest dispatch, ``open_index``): a whole index opens as a dense or
   BM25 retriever; a sharded one (``shard_index.py``) with every shard in this process, or, with
   ``ray``, one Ray actor per shard (``ray_shards.py``);
4. **the EMULATED pad** (``config.emulate_pad``, exact only): a whole index is wrapped in
   ``emulated.PaddedCostRetriever``; Ray shards each build their share of the pad.

Bad input is a ``ConfigError`` / ``IndexNotFoundError`` saying what to do; on any failure after
something was opened, it is closed again (Ray actors, a local Ray cluster).
The kNN-LM datastores have their own opener, ``ralmspec.knnlm.open``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from ralmspec.cluster import RayShardConfig, import_ray
from ralmspec.config import RetrievalConfig, is_int
from ralmspec.data.corpus import Corpus
from ralmspec.data.loaders import default_corpus, load_corpus
from ralmspec.errors import ConfigError
from ralmspec.retrieval.base import Retriever
from ralmspec.retrieval.dense import DENSE_KINDS
from ralmspec.retrieval.emulated import emulate_larger_knowledge_base
from ralmspec.retrieval.encoder import QueryEncoder, encoder_for
from ralmspec.retrieval.index import EMBEDDED_SOURCE, ensure_index, is_sharded, load_retriever, read_manifest
from ralmspec.retrieval.ray_shards import open_ray_sharded
from ralmspec.retrieval.shard_index import ensure_sharded_index, open_sharded_local

Log = Callable[[str], None]


def open_index(index_dir: str, config: RetrievalConfig, encoder: QueryEncoder | None = None) -> Retriever:
    """The index folder ``index_dir``, whole or sharded (read from its manifest), every part in
    this process, with the search parameters of ``config`` (``encoder`` None: ``encoder_for``).
    ``IndexNotFoundError`` (with the build command) for a missing or incomplete folder,
    ``ConfigError`` for another kind of index than ``config.kind`` or another encoder."""
    index_dir = os.path.abspath(os.fspath(index_dir))
    if is_sharded(read_manifest(index_dir, config.kind)):
        return open_sharded_local(index_dir, config, encoder)
    return load_retriever(index_dir, config, encoder)


def open_knowledge_base(config: RetrievalConfig, corpus_path: str | None = None, *,
                        encoder: QueryEncoder | None = None, ray: RayShardConfig | None = None,
                        shards: int | None = None, show_progress: bool = True, log: Log | None = None) -> Retriever:
    """The knowledge base ``config`` names (module doc: encoder, folder, shards, EMULATED pad).

    ``ray``: serve a sharded index with one Ray actor per shard (``config.index_dir`` must then be
    a sharded index, or ``shards`` says how to split the cached one). ``shards`` without ``ray``:
    the cached split, every shard in this process; with ``config.index_dir`` it must match the
    folder's number of shards. ``log`` (default: stderr when ``show_progress``) hears about
    the EMULATED pad being built.
    """
    if shards is not None and not is_int(shards, 1):
        raise ConfigError(f"shards (--shards) must be an integer >= 1, got {shards!r}")
    if config.index_dir and corpus_path:  # the index holds its own passages: the corpus would go unread
        raise ConfigError("give an index (RetrievalConfig.index_dir, --index) or a corpus (corpus_path, --corpus), "
                          f"not both: the index {config.index_dir} holds its own "
                          f"passages, so {corpus_path} would not be used (build an index of it with "
                          "`ralmspec index build --corpus ...`, or leave --index out)")
    if ray is not None:
        import_ray()  # without Ray: a ConfigError saying how to install it, before anything loads
    if encoder is None and config.kind in DENSE_KINDS:
        encoder = encoder_for(config)
    index_dir = config.index_dir or _cached_index(config, corpus_path, encoder, shards, ray is not None,
                                                  show_progress)
    if ray is not None:  # the Ray shards split the EMULATED pad among themselves
        return open_ray_sharded(index_dir, config, ray, encoder, shards)
    retriever = open_index(index_dir, config, encoder)
    try:
        _check_shards(retriever, shards, index_dir)
        if config.emulate_pad and getattr(retriever, "n_shards", None) is not None:
            raise ConfigError("emulate_pad (--emulate-pad) pads a whole index in this process, or Ray shards "
                              "(--shards N); not a sharded index searched in this process")
        if log is None and show_progress:
            log = _stderr
        return emulate_larger_knowledge_base(retriever, config.emulate_pad, log=log)
    except BaseException:
        retriever.close()
        raise


def _cached_index(config: RetrievalConfig, corpus_path: str | None, encoder: QueryEncoder | None,
                  shards: int | None, on_ray: bool, show_progress: bool) -> str:
    """The cached index folder of ``corpus_path`` (or of the embedded knowledge base), built on
    first use; its ``shards``-way split when shards are asked for."""
    if on_ray and shards is None:
        raise ConfigError("shards (--shards N) is needed to build a sharded index on Ray "
                          "(or give a sharded index_dir, --index)")
    corpus, source = _corpus(corpus_path)
    if shards is not None:
        return ensure_sharded_index(corpus, config.kind, shards, config, encoder, show_progress,
                                    corpus_source=source)
    return ensure_index(corpus, config.kind, config, encoder, show_progress, corpus_source=source)


def _corpus(corpus_path: str | None) -> tuple[Corpus, str]:
    """(passages, source recorded in the manifest): ``corpus_path``'s, else the embedded ones."""
    if corpus_path:
        return load_corpus(corpus_path), os.path.abspath(corpus_path)
    return default_corpus(), EMBEDDED_SOURCE


def _check_shards(retriever: Retriever, shards: int | None, index_dir: str) -> None:
    have = getattr(retriever, "n_shards", None)
    if shards is not None and have != shards:
        raise ConfigError(f"--shards {shards} but the index at {index_dir} has "
                          f"{'no' if have is None else have} shards; build one with: ralmspec index build "
                          f"--retriever {retriever.kind} --shards {shards} --out DIR")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
