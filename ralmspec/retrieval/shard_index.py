"""Sharded indexes on disk: split an index into contiguous doc-id shards, load one shard.

A sharded index directory holds

- ``manifest.json``: the unsharded index's fields (kind, n, dim, params, corpus hash, encoder)
  plus ``"shards": [{"dir", "start", "stop"}]`` and ``"sharded_from"``; written last, and the
  directory is built under a temporary name and renamed into place (as ``index.py`` does);
- ``passages.jsonl.gz``: the whole corpus (the caller's text store; doc ids = line order);
- ``shard-000/``, ``shard-001/``, ...: one folder per shard with ``shard.json`` (its range, kind,
  params, files) and
  - dense kinds: ``embeddings.npy`` (the shard's rows of the whole index's float32 vectors,
    bit for bit) and ``index.faiss`` over them, local ids ``0..size-1``;
  - ``bm25``: ``bm25.npz`` (the shard's rows of the whole index's token-major weight matrix)
    and ``vocab.json`` (the tokens that occur in the shard, in column order).

How each kind stays exact (``sharded.ShardedRetriever`` documents the merge):

- ``exact``: each shard is a flat index over its rows of the SAME vectors; the canonical float64
  re-scoring reads the same stored vector and the same query vector, so a doc's score is the
  same number in its shard as in the whole index, and each shard returns its true top-k.
- ``ivf``: every shard gets a copy of the whole index's TRAINED coarse quantizer, and each doc
  goes into the SAME inverted list it had in the whole index (copied, not re-assigned), so the
  canonically probed lists of a query are the same in every shard and their union is what the
  whole index probes: the merged answer equals the unsharded IVF answer.
- ``bm25``: bm25s precomputes one float32 weight per (token, passage) from the statistics of the
  WHOLE collection (idf of the token, average passage length). Shards get their rows of that
  matrix, so a shard scores with the global statistics, not its own (a shard built from its own
  passages would have different idf and avgdl and would not match). The query's tokens are summed
  in the same order as the whole index sums them (``sparse.accumulate_scores``).
- ``hnsw``: a graph cannot be cut, so each shard builds its own graph over its vectors with the
  whole index's build parameters. Search is approximate per shard; the merged answer is the exact
  merge of the shards' answers and CAN differ from the unsharded graph's answer.

Sharding is a step after a normal build (``ralmspec index build --shards N`` builds the whole
index, then splits it): the global statistics, the trained quantizer and the vectors all come
from one place, which is what makes the shards agree with it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from ralmspec.config import RetrievalConfig
from ralmspec.data.corpus import Corpus
from ralmspec.data.loaders import corpus_sha256, load_corpus
from ralmspec.errors import ConfigError, IndexNotFoundError
from ralmspec.paths import link_or_copy, staging_folder
from ralmspec.retrieval.base import Hit
from ralmspec.retrieval.dense import DENSE_KINDS, DenseRetriever, build_faiss_index
from ralmspec.retrieval.encoder import QueryEncoder, encoder_for
from ralmspec.retrieval.index import (
    BM25_DIR, EMBEDDINGS, FAISS_FILE, MANIFEST, PASSAGES, build_index, default_index_root, ensure_index,
    index_dir_name, is_sharded, publish_index, read_manifest, read_vectors,
)
from ralmspec.retrieval.sharded import (
    DenseCodec, LocalShards, QueryCodec, ShardedRetriever, ShardRange, TokenCodec, check_ranges, contiguous_ranges,
)
from ralmspec.retrieval.sparse import BM25Retriever, QueryTokenizer, accumulate_scores, load_bm25_matrix

SHARD_MANIFEST = "shard.json"
BM25_NPZ = "bm25.npz"
BM25_VOCAB = "vocab.json"
SHARD_FORMAT = 1


def shard_ranges(manifest: dict[str, Any]) -> tuple[ShardRange, ...]:
    """The shards' doc-id ranges of a sharded index's manifest (``IndexNotFoundError`` if malformed)."""
    try:
        return tuple(ShardRange(int(s["start"]), int(s["stop"])) for s in manifest["shards"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexNotFoundError(f"a sharded index's manifest has a malformed shard list ({exc!r}); "
                                 "delete the sharded folder and split the index again") from None


# --------------------------------------------------------------------------- split


def ivf_list_of_ids(ivf: Any, where: str) -> np.ndarray:
    """``[ntotal]``: the inverted list each id 0..ntotal-1 of an IVF index is in (so that a shard can
    put each of its ids into the SAME list, with a copy of the trained quantizer). ConfigError
    unless the index holds every id once. Shared by index and kNN-LM datastore sharding."""
    import faiss

    assign = np.full(int(ivf.ntotal), -1, dtype=np.int64)
    for lst in range(ivf.nlist):
        size = ivf.invlists.list_size(lst)
        if size:
            assign[faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size).copy()] = lst
    if (assign < 0).any():
        raise ConfigError(f"the IVF index in {where} does not hold every id; rebuild it")
    return assign


def _split_dense(src: str, m: dict[str, Any], ranges: tuple[ShardRange, ...], dirs: list[str]) -> None:
    import faiss

    vectors = read_vectors(os.path.join(src, EMBEDDINGS), "rebuild the index")
    kind = m["kind"]
    assign = None
    if kind == "ivf":
        whole = faiss.read_index(os.path.join(src, FAISS_FILE))
        ivf = faiss.extract_index_ivf(whole)
        assign = ivf_list_of_ids(ivf, src)
    for r, d in zip(ranges, dirs):
        part = np.ascontiguousarray(vectors[r.start:r.stop], dtype=np.float32)
        np.save(os.path.join(d, EMBEDDINGS), part)
        if kind == "exact":
            index, _ = build_faiss_index("exact", part, RetrievalConfig(kind="exact"))
        elif kind == "hnsw":
            p = m.get("params") or {}
            cfg = RetrievalConfig(kind="hnsw", hnsw_m=int(p.get("hnsw_m", 32)),
                                  hnsw_ef_construction=int(p.get("hnsw_ef_construction", 200)))
            index, _ = build_faiss_index("hnsw", part, cfg)
        else:  # ivf: the whole index's trained quantizer, the whole index's list of every doc
            quantizer = faiss.clone_index(ivf.quantizer)
            index = faiss.IndexIVFFlat(quantizer, ivf.d, ivf.nlist, ivf.metric_type)
            index.own_fields = True
            quantizer.this.disown()
            local = np.arange(r.size, dtype=np.int64)
            lists = np.ascontiguousarray(assign[r.start:r.stop])
            index.add_core(r.size, faiss.swig_ptr(part), faiss.swig_ptr(local), faiss.swig_ptr(lists))
        faiss.write_index(index, os.path.join(d, FAISS_FILE))


def _split_bm25(src: str, ranges: tuple[ShardRange, ...], dirs: list[str]) -> dict[str, Any]:
    mat = load_bm25_matrix(os.path.join(src, BM25_DIR))
    ncols = mat.indptr.size - 1  # bm25s's vocabulary has "" as an extra id with no column
    vocab = sorted((t for t, c in mat.vocab.items() if c < ncols), key=mat.vocab.__getitem__)  # column order
    if [mat.vocab[t] for t in vocab] != list(range(ncols)):
        raise ConfigError(f"the bm25s index in {src} has an unexpected vocabulary layout; rebuild it")
    col_of_entry = np.repeat(np.arange(len(vocab), dtype=np.int64), np.diff(mat.indptr))
    for r, d in zip(ranges, dirs):
        keep = (mat.indices >= r.start) & (mat.indices < r.stop)
        cols = col_of_entry[keep]  # non-decreasing: entries stay grouped by column, in order
        present = np.unique(cols)
        new_col = np.full(len(vocab), -1, dtype=np.int64)
        new_col[present] = np.arange(present.size)
        counts = np.bincount(new_col[cols], minlength=present.size)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        np.savez(os.path.join(d, BM25_NPZ), data=mat.data[keep], indices=(mat.indices[keep] - r.start),
                 indptr=indptr)
        with open(os.path.join(d, BM25_VOCAB), "w", encoding="utf-8") as f:
            json.dump([vocab[c] for c in present], f, ensure_ascii=False)
    return {"num_docs": mat.n, "vocab": len(vocab), "weights": "bm25s, whole-collection idf and avgdl"}


def shard_index(src_dir: str, out_dir: str, shards: int,
                keep: Callable[[dict[str, Any]], bool] | None = None) -> str:
    """Split the unsharded index at ``src_dir`` into ``shards`` contiguous doc-id shards at
    ``out_dir`` (atomically; an existing sharded index there is replaced unless ``keep`` says
    its manifest is to be kept: ``publish_index``). Returns ``out_dir``."""
    src_dir = os.path.abspath(os.fspath(src_dir))
    out_dir = os.path.abspath(os.fspath(out_dir))
    m = read_manifest(src_dir)
    if is_sharded(m):
        raise ConfigError(f"{src_dir} is already a sharded index; split the unsharded index it came from")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        raise ConfigError(f"--out {out_dir} is a non-empty directory that is not a ralmspec index; "
                          "choose an empty or new directory")
    n = int(m["n"])
    ranges = contiguous_ranges(n, shards)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    t0 = time.perf_counter()
    with staging_folder(parent, f".{os.path.basename(out_dir)}.tmp-") as staged:  # stale ones removed first
        tmp = str(staged)
        link_or_copy(os.path.join(src_dir, PASSAGES), os.path.join(tmp, PASSAGES))
        names = [f"shard-{i:03d}" for i in range(len(ranges))]
        dirs = [os.path.join(tmp, name) for name in names]
        for d in dirs:
            os.makedirs(d)
        kind = m["kind"]
        extra: dict[str, Any] = {}
        if kind == "bm25":
            extra["global_stats"] = _split_bm25(src_dir, ranges, dirs)
            files = [BM25_NPZ, BM25_VOCAB]
        else:
            _split_dense(src_dir, m, ranges, dirs)
            files = [EMBEDDINGS, FAISS_FILE]
        for r, d in zip(ranges, dirs):
            with open(os.path.join(d, SHARD_MANIFEST), "w", encoding="utf-8") as f:
                json.dump({"format": SHARD_FORMAT, "kind": kind, "start": r.start, "stop": r.stop,
                           "dim": m.get("dim"), "params": m.get("params") or {}, "files": files}, f, indent=1)
        manifest = {k: v for k, v in m.items() if k not in ("files", "build_seconds", "embeddings_reused_from")}
        manifest.update({
            "shards": [{"dir": name, "start": r.start, "stop": r.stop} for name, r in zip(names, ranges)],
            "sharded_from": {"dir": src_dir, "created": m.get("created")},
            "shard_seconds": round(time.perf_counter() - t0, 3),
            "files": [PASSAGES, *names],
            **extra,
        })
        publish_index(tmp, out_dir, manifest, keep)
    return out_dir


def build_sharded_index(corpus: Corpus, kind: str, out_dir: str, shards: int, config: RetrievalConfig,
                        encoder: QueryEncoder | None = None, show_progress: bool = True,
                        corpus_source: str | None = None) -> str:
    """Build the whole ``kind`` index of ``corpus`` (in a temporary sibling folder), then split it
    into ``shards`` shards at ``out_dir``. Returns ``out_dir``."""
    contiguous_ranges(len(corpus), shards)  # fail before building
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # the whole index is built INSIDE the locked staging folder: built AS it, the publish would
    # swap in an unlocked folder, which another process's build could take for a killed one's
    with staging_folder(parent, f".{os.path.basename(out_dir)}.whole-") as aside:
        whole = str(aside / "index")
        build_index(corpus, kind, whole, config, encoder, show_progress=show_progress, corpus_source=corpus_source)
        return shard_index(whole, out_dir, shards)


def ensure_sharded_index(corpus: Corpus, kind: str, shards: int, config: RetrievalConfig,
                         encoder: QueryEncoder | None = None, show_progress: bool = True, root: str | None = None,
                         corpus_source: str | None = None) -> str:
    """The cached ``shards``-way split of the cached whole index of ``corpus`` (both built on first use)."""
    root = root or default_index_root()
    whole = ensure_index(corpus, kind, config, encoder, show_progress, root, corpus_source)
    d = os.path.join(root, f"{index_dir_name(kind, config, corpus_sha256(corpus))}-shards{shards}")
    created = read_manifest(whole).get("created")

    def current(m: dict[str, Any]) -> bool:  # a split of this very whole index
        made_from = m.get("sharded_from") or {}
        return len(m.get("shards") or []) == shards and made_from.get("dir") == whole \
            and made_from.get("created") == created

    try:
        if current(read_manifest(d)):
            return d
    except IndexNotFoundError:
        pass
    if show_progress:
        print(f"ralmspec: splitting {whole} into {shards} shards in {d} (first use)", file=sys.stderr)
    return shard_index(whole, d, shards, keep=current)  # a concurrent first use's split is kept


# --------------------------------------------------------------------------- shards


class DenseShard:
    """One dense shard: its FAISS index and vectors, canonical scores, global ids (no text, no model)."""

    def __init__(self, rng: ShardRange, vectors: np.ndarray, index, kind: str, config: RetrievalConfig):
        self.kind = kind
        self.range = rng
        # shards search on the CPU (a shard actor reserves no GPU; GPU shards are future work)
        self._r = DenseRetriever(None, vectors, index, kind, None, replace(config, kind=kind, device="cpu"))
        self.dim = int(vectors.shape[1])
        if vectors.shape[0] != rng.size:
            raise ConfigError(f"shard [{rng.start}, {rng.stop}) holds {vectors.shape[0]} vectors")

    def search(self, payloads: np.ndarray, k: int) -> list[list[Hit]]:
        off = self.range.start
        return [[Hit(h.doc_id + off, h.score) for h in row] for row in self._r.search_vectors(payloads, k)]

    def score(self, payload: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
        return self._r.score_vectors(payload, np.asarray(doc_ids, dtype=np.int64) - self.range.start)


class BM25Shard:
    """One BM25 shard: its rows of the whole index's weight matrix (global statistics), global ids."""

    kind = "bm25"

    def __init__(self, rng: ShardRange, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, vocab: list[str]):
        if indptr.shape != (len(vocab) + 1,) or (indices.size and (indices.min() < 0 or indices.max() >= rng.size)):
            raise ConfigError(f"BM25 shard [{rng.start}, {rng.stop}) is inconsistent; re-shard the index")
        self.range = rng
        self._data = np.asarray(data, dtype=np.float32)
        self._indices = np.asarray(indices, dtype=np.int64)
        self._indptr = np.asarray(indptr, dtype=np.int64)
        self._vocab = {t: i for i, t in enumerate(vocab)}

    def _vector(self, tokens: list[str]) -> np.ndarray:
        cols = [self._vocab[t] for t in tokens if t in self._vocab]
        return accumulate_scores(self.range.size, cols, self._data, self._indices, self._indptr)

    def search(self, payloads: list[list[str]], k: int) -> list[list[Hit]]:
        off = self.range.start
        return [[Hit(h.doc_id + off, h.score) for h in BM25Retriever.top_k(self._vector(toks), int(k))]
                for toks in payloads]

    def score(self, payload: list[str], doc_ids: np.ndarray) -> np.ndarray:
        return self._vector(payload)[np.asarray(doc_ids, dtype=np.int64) - self.range.start]


def load_shard(shard_dir: str, config: RetrievalConfig) -> DenseShard | BM25Shard:
    """Open one shard folder with the search parameters of ``config`` (efSearch, nprobe, margin)."""
    path = os.path.join(shard_dir, SHARD_MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            sm = json.load(f)
        rng = ShardRange(int(sm["start"]), int(sm["stop"]))
        kind, files = str(sm["kind"]), list(sm["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexNotFoundError(f"shard {shard_dir} is missing or unreadable ({e}); re-shard the index") from e
    missing = [f for f in files if not os.path.exists(os.path.join(shard_dir, f))]
    if missing:
        raise IndexNotFoundError(f"shard {shard_dir} is incomplete (missing {', '.join(missing)}); re-shard the index")
    if kind == "bm25":
        try:
            with np.load(os.path.join(shard_dir, BM25_NPZ), allow_pickle=False) as z:
                data, indices, indptr = z["data"], z["indices"], z["indptr"]
            with open(os.path.join(shard_dir, BM25_VOCAB), encoding="utf-8") as f:
                vocab = json.load(f)
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise IndexNotFoundError(f"shard {shard_dir}'s BM25 arrays are unreadable ({e}); re-shard the index") from e
        return BM25Shard(rng, data, indices, indptr, vocab)
    if kind not in DENSE_KINDS:
        raise ConfigError(f"shard {shard_dir} has unknown kind {kind!r}")
    import faiss

    vectors = read_vectors(os.path.join(shard_dir, EMBEDDINGS), "re-shard the index")
    try:
        index = faiss.read_index(os.path.join(shard_dir, FAISS_FILE))
    except RuntimeError as e:
        raise IndexNotFoundError(f"cannot read {os.path.join(shard_dir, FAISS_FILE)} ({e}); re-shard the index") from e
    return DenseShard(rng, vectors, index, kind, config)


# --------------------------------------------------------------------------- opening


def open_sharded_manifest(index_dir: str, config: RetrievalConfig) -> tuple[str, dict[str, Any]]:
    """(absolute dir, manifest) of a sharded ``config.kind`` index, else a ConfigError saying what to do."""
    index_dir = os.path.abspath(os.fspath(index_dir))
    m = read_manifest(index_dir, config.kind)
    if not is_sharded(m):
        raise ConfigError(f"{index_dir} is not a sharded index; make one with: ralmspec index build "
                          f"--retriever {m['kind']} --shards N --from-index {index_dir} --out DIR")
    if m["kind"] != config.kind:
        raise ConfigError(f"the index at {index_dir} is a sharded {m['kind']!r} index but the retriever is "
                          f"{config.kind!r}; use --retriever {m['kind']}")
    check_ranges(shard_ranges(m), int(m["n"]))
    return index_dir, m


def make_codec(m: dict[str, Any], config: RetrievalConfig, encoder: QueryEncoder | None) -> QueryCodec:
    """The caller-side query codec of a sharded index (checks the encoder against the manifest)."""
    if m["kind"] == "bm25":
        return TokenCodec(QueryTokenizer((m.get("params") or {}).get("stemmer")))
    if encoder is None:
        encoder = encoder_for(config)
    enc = m.get("encoder") or {}
    if enc.get("name") != encoder.model_name or enc.get("dim") != encoder.dim:
        raise ConfigError(f"this index was built with encoder {enc.get('name')} (dim {enc.get('dim')}), "
                          f"not {encoder.model_name} (dim {encoder.dim})")
    return DenseCodec(encoder)


def load_corpus_checked(index_dir: str, m: dict[str, Any]) -> Corpus:
    corpus = load_corpus(os.path.join(index_dir, PASSAGES))
    if len(corpus) != int(m["n"]):
        raise IndexNotFoundError(f"index {index_dir} is inconsistent ({len(corpus)} passages, manifest says {m['n']})")
    return corpus


def open_sharded_local(index_dir: str, config: RetrievalConfig, encoder: QueryEncoder | None = None) -> ShardedRetriever:
    """A sharded index served in this process (every shard loaded here, no Ray)."""
    index_dir, m = open_sharded_manifest(index_dir, config)
    codec = make_codec(m, config, encoder)
    shards = [load_shard(os.path.join(index_dir, s["dir"]), config) for s in m["shards"]]
    r = ShardedRetriever(load_corpus_checked(index_dir, m), m["kind"], LocalShards(shards), codec)
    r.index_dir = index_dir
    return r
