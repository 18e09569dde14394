"""Build, save and load whole knowledge-base indexes (``retrieval.open`` opens a knowledge base:
whole or sharded, in this process or on Ray, EMULATED or not).

An index directory holds

- ``manifest.json``: kind, n, dim, build params, corpus sha256, build times, library versions
  and the list of files; it is written last, and the whole directory is built under a temporary
  name and renamed into place, so a directory with a manifest is complete;
- ``passages.jsonl.gz``: a copy of the corpus (doc ids = line order);
- dense kinds: ``embeddings.npy`` (float32 (N, 384) unit-norm passage vectors, memory-mapped at
  load; the canonical metric reads them) and ``index.faiss``;
- ``bm25``: ``bm25/`` (the bm25s index).

Passage vectors are computed once per corpus: a dense build first looks for a sibling index
directory (same parent) whose manifest has the same corpus hash and encoder, and hard-links
(or copies) its ``embeddings.npy``. So building all three dense kinds under one root encodes
the corpus once. For the embedded knowledge base the vectors ship with the package
(``ralmspec/data/embedded/passage_embeddings.npy``: float16, made by
``scripts/make_embedded_data.py --embeddings``), so no build encodes it: they are used when the
corpus hash and encoder match their manifest, widened to float32 and re-normalised (float64
norms), which is a deterministic function of the shipped file.

Default locations: :func:`default_index_root` is ``$RALMSPEC_HOME/indexes`` or
``~/.cache/ralmspec/indexes``; cached indexes are named ``{kind}[-{params}]-{corpus hash}``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import replace
from importlib import metadata
from typing import Any, Callable

import numpy as np

from ralmspec.config import RETRIEVER_KINDS, RetrievalConfig
from ralmspec.data.corpus import Corpus
from ralmspec.data.loaders import corpus_sha256, default_corpus, load_corpus, save_corpus
from ralmspec.errors import ConfigError, IndexNotFoundError
from ralmspec.paths import cache_folder, link_or_copy, ralmspec_home, replace_folder, staging_folder
from ralmspec.retrieval.base import Retriever
from ralmspec.retrieval.dense import DenseRetriever, build_faiss_index, empty_ivf_lists
from ralmspec.retrieval.encoder import QueryEncoder, encoder_for
from ralmspec.retrieval.sparse import BM25Retriever, build_bm25

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PASSAGES = "passages.jsonl.gz"
EMBEDDINGS = "embeddings.npy"
FAISS_FILE = "index.faiss"
BM25_DIR = "bm25"
FORMAT_VERSION = 1
EMBEDDED_SOURCE = "embedded"
ENCODE_BATCH_SIZE = 32


def default_index_root() -> str:
    """``$RALMSPEC_HOME/indexes`` if RALMSPEC_HOME is set, else ``~/.cache/ralmspec/indexes``."""
    return str(ralmspec_home() / "indexes")


def index_dir_name(kind: str, config: RetrievalConfig, corpus_hash: str) -> str:
    """Cache directory name: the kind, its build parameters and the corpus hash."""
    tag = {"exact": "exact", "bm25": "bm25",
           "hnsw": f"hnsw-m{config.hnsw_m}-efc{config.hnsw_ef_construction}",
           "ivf": f"ivf-nlist{config.ivf_nlist}"}
    if kind not in tag:
        raise ConfigError(f"unknown retriever {kind!r}; choose one of {', '.join(RETRIEVER_KINDS)}")
    return f"{tag[kind]}-{corpus_hash[:16]}"


def build_command(kind: str, out_dir: str, corpus_source: str | None) -> str:
    """The CLI command that (re)builds an index (no ``--corpus``: the embedded default corpus)."""
    corpus = "" if corpus_source == EMBEDDED_SOURCE else f"--corpus {corpus_source or 'CORPUS.jsonl'} "
    return f"ralmspec index build {corpus}--retriever {kind} --out {out_dir}"


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("ralmspec", "numpy", "faiss-cpu", "faiss-gpu-cu12", "bm25s", "sentence-transformers",
                "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def is_sharded(manifest: dict[str, Any]) -> bool:
    """True for the manifest of a sharded index (``shard_index.py``)."""
    return bool(manifest.get("shards"))


def _files_for(kind: str) -> list[str]:
    return [PASSAGES, BM25_DIR] if kind == "bm25" else [PASSAGES, EMBEDDINGS, FAISS_FILE]


def read_manifest(index_dir: str, kind: str = "KIND") -> dict[str, Any]:
    """The manifest of a complete index, else IndexNotFoundError saying how to build it.

    ``kind`` only fills in the build command of the error message when there is no manifest.
    """
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.exists(index_dir) else "has no manifest.json (not an index, or incomplete)"
        raise IndexNotFoundError(f"index directory {index_dir} {what}; build it with: "
                                 f"{build_command(kind, index_dir, None)}")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        kind, source = m["kind"], m.get("corpus_source")
        files = list(m["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexNotFoundError(f"index manifest {path} is unreadable ({e}); rebuild it with: "
                                 f"{build_command(kind, index_dir, None)}") from e
    missing = [f for f in files if not os.path.exists(os.path.join(index_dir, f))]
    if missing:
        raise IndexNotFoundError(f"index {index_dir} is incomplete (missing {', '.join(missing)}); rebuild it with: "
                                 f"{build_command(kind, index_dir, source)}")
    return m


def _find_reusable_embeddings(parent: str, corpus_hash: str, encoder: QueryEncoder, n: int) -> str | None:
    if not os.path.isdir(parent):
        return None
    for name in sorted(os.listdir(parent)):
        d = os.path.join(parent, name)
        if name.startswith(".") or not os.path.isfile(os.path.join(d, MANIFEST)):
            continue
        try:
            m = read_manifest(d)
        except IndexNotFoundError:
            continue
        enc = m.get("encoder") or {}
        emb = os.path.join(d, EMBEDDINGS)
        if (m.get("corpus_sha256") == corpus_hash and enc.get("name") == encoder.model_name
                and enc.get("dim") == encoder.dim and os.path.isfile(emb)):
            try:
                arr = read_vectors(emb, "")
            except IndexNotFoundError:
                continue  # a damaged index is not reused
            if arr.shape == (n, encoder.dim) and arr.dtype == np.float32:
                return emb
    return None


SHIPPED_EMBEDDINGS = "embedded/passage_embeddings.npy"
SHIPPED_MANIFEST = "embedded/passage_embeddings.json"


def write_shipped_embeddings(corpus: Corpus, encoder: QueryEncoder, out_dir: str) -> str:
    """Encode ``corpus`` and write the float16 vectors + manifest shipped with the package."""
    vectors = encoder.encode_corpus(corpus.contents(), batch_size=ENCODE_BATCH_SIZE, show_progress=True)
    path = os.path.join(out_dir, os.path.basename(SHIPPED_EMBEDDINGS))
    np.save(path, vectors.astype(np.float16))
    manifest = {"corpus_sha256": corpus_sha256(corpus), "n": len(corpus), "dtype": "float16",
                "encoder": {"name": encoder.model_name, "dim": encoder.dim, "batch_size": ENCODE_BATCH_SIZE,
                            "normalized": True},
                "versions": _versions()}
    with open(os.path.join(out_dir, os.path.basename(SHIPPED_MANIFEST)), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return path


def _shipped_embeddings(corpus_hash: str, encoder: QueryEncoder, n: int) -> np.ndarray | None:
    """The shipped vectors of the embedded corpus as unit-norm float32, if they fit this build."""
    from importlib import resources

    base = resources.files("ralmspec.data")
    vec_path, man_path = base.joinpath(SHIPPED_EMBEDDINGS), base.joinpath(SHIPPED_MANIFEST)
    if not (vec_path.is_file() and man_path.is_file()):
        return None
    m = json.loads(man_path.read_text(encoding="utf-8"))
    enc = m.get("encoder") or {}
    if (m.get("corpus_sha256") != corpus_hash or m.get("n") != n or enc.get("name") != encoder.model_name
            or enc.get("dim") != encoder.dim):
        return None
    with vec_path.open("rb") as f:
        half = np.load(f)
    if half.shape != (n, encoder.dim):
        return None
    wide = half.astype(np.float64)
    wide /= np.maximum(np.linalg.norm(wide, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(wide.astype(np.float32))


def build_index(corpus: Corpus, kind: str, out_dir: str, config: RetrievalConfig,
                encoder: QueryEncoder | None = None, show_progress: bool = True,
                corpus_source: str | None = None, keep: Callable[[dict[str, Any]], bool] | None = None) -> str:
    """Build a ``kind`` index of ``corpus`` into ``out_dir`` (atomically) and return ``out_dir``.

    ``config`` supplies the build parameters (HNSW M / efConstruction, IVF nlist). An existing
    index at ``out_dir`` is replaced, unless ``keep`` says its manifest is to be kept
    (``publish_index``: a cache a concurrent builder filled meanwhile, and this build dropped, so no
    reader of it ever sees the folder swapped away); a non-empty directory that is not an index is
    refused.
    ``encoder`` is needed for dense kinds (created on the CPU when None).
    """
    if kind not in RETRIEVER_KINDS:
        raise ConfigError(f"unknown retriever {kind!r}; choose one of {', '.join(RETRIEVER_KINDS)}")
    if len(corpus) == 0:
        raise ConfigError("cannot index an empty corpus")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        raise ConfigError(f"--out {out_dir} is a non-empty directory that is not a ralmspec index; "
                          "choose an empty or new directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    t0 = time.perf_counter()
    corpus_hash = corpus_sha256(corpus)
    with staging_folder(parent, f".{os.path.basename(out_dir)}.tmp-") as staged:  # stale ones removed first
        tmp = str(staged)
        save_corpus(corpus, os.path.join(tmp, PASSAGES))
        manifest: dict[str, Any] = {
            "format": FORMAT_VERSION, "kind": kind, "n": len(corpus), "dim": None,
            "corpus_sha256": corpus_hash, "corpus_source": corpus_source,
        }
        t_encode = 0.0
        if kind == "bm25":
            params = build_bm25(corpus, os.path.join(tmp, BM25_DIR), show_progress=show_progress)
        else:
            encoder = encoder if encoder is not None else QueryEncoder()
            emb_path = os.path.join(tmp, EMBEDDINGS)
            reuse = _find_reusable_embeddings(parent, corpus_hash, encoder, len(corpus))
            shipped = None if reuse is not None else _shipped_embeddings(corpus_hash, encoder, len(corpus))
            if reuse is not None:
                link_or_copy(reuse, emb_path)
            elif shipped is not None:
                np.save(emb_path, shipped)
                reuse = "shipped with ralmspec (float16)"
            else:
                te = time.perf_counter()
                vectors = encoder.encode_corpus(corpus.contents(), batch_size=ENCODE_BATCH_SIZE,
                                                show_progress=show_progress)
                t_encode = time.perf_counter() - te
                np.save(emb_path, vectors)
            vectors = np.load(emb_path, mmap_mode="r")
            index, params = build_faiss_index(kind, vectors, config)
            import faiss
            faiss.write_index(index, os.path.join(tmp, FAISS_FILE))
            manifest["dim"] = int(vectors.shape[1])
            manifest["encoder"] = {"name": encoder.model_name, "dim": encoder.dim,
                                   "batch_size": ENCODE_BATCH_SIZE, "normalized": True}
            manifest["embeddings_reused_from"] = reuse
        total = time.perf_counter() - t0
        manifest.update({
            "params": params,
            "build_seconds": {"encode": round(t_encode, 3), "index": round(total - t_encode, 3),
                              "total": round(total, 3)},
            "files": _files_for(kind),
        })
        publish_index(tmp, out_dir, manifest, keep)
    return out_dir


def publish_index(tmp: str, out_dir: str, manifest: dict[str, Any],
                  keep: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Stamp ``manifest`` (creation time, library versions), write it LAST into the finished
    temporary directory ``tmp`` and rename ``tmp`` to ``out_dir``: a directory with a manifest is
    a complete index. ``keep``: given the manifest of a complete index already at ``out_dir``,
    True leaves that one in place (a cache a concurrent builder filled meanwhile; ``tmp`` is then
    the caller's to remove), so no reader of it sees its folder swapped away."""
    manifest.update({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions()})
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    if keep is not None:
        try:
            if keep(read_manifest(out_dir)):
                return
        except IndexNotFoundError:
            pass
    replace_folder(tmp, out_dir)


def load_retriever(index_dir: str, config: RetrievalConfig, encoder: QueryEncoder | None = None) -> Retriever:
    """Open the whole (unsharded) index at ``index_dir`` with the search parameters of ``config``.

    Raises IndexNotFoundError (with the build command) if it is missing or incomplete, and
    ConfigError if it is not a ``config.kind`` index, the encoder does not match it, or it is a
    sharded index (``retrieval.open.open_index`` opens either kind of folder).
    Build parameters come from the manifest; efSearch / nprobe / device / rescore_margin from
    ``config``; ``encoder`` None: ``encoder_for(config)``. The returned retriever has
    ``index_dir`` (absolute) set.
    """
    index_dir = os.path.abspath(os.fspath(index_dir))
    m = read_manifest(index_dir, config.kind)
    if is_sharded(m):
        raise ConfigError(f"{index_dir} is a sharded index; open it with ralmspec.retrieval.open.open_index "
                          "(in this process) or serve it with --shards N (Ray)")
    if m["kind"] != config.kind:
        raise ConfigError(f"the index at {index_dir} is a {m['kind']!r} index but the retriever is "
                          f"{config.kind!r}; use --retriever {m['kind']} or build a {config.kind} index "
                          f"({build_command(config.kind, 'DIR', m.get('corpus_source'))})")
    corpus = load_corpus(os.path.join(index_dir, PASSAGES))
    if len(corpus) != m.get("n"):
        raise IndexNotFoundError(f"index {index_dir} is inconsistent ({len(corpus)} passages, manifest says "
                                 f"{m.get('n')!r}); rebuild it with: "
                                 f"{build_command(m['kind'], index_dir, m.get('corpus_source'))}")
    r: DenseRetriever | BM25Retriever
    if m["kind"] == "bm25":
        r = BM25Retriever(corpus, os.path.join(index_dir, BM25_DIR), stemmer=(m.get("params") or {}).get("stemmer"))
    else:
        encoder = encoder if encoder is not None else encoder_for(config)
        enc = m.get("encoder") or {}
        if enc.get("name") != encoder.model_name or enc.get("dim") != encoder.dim:
            raise ConfigError(f"index {index_dir} was built with encoder {enc.get('name')} (dim {enc.get('dim')}), "
                              f"not {encoder.model_name} (dim {encoder.dim})")
        import faiss
        vectors = read_vectors(os.path.join(index_dir, EMBEDDINGS),
                               f"rebuild it with: {build_command(m['kind'], index_dir, m.get('corpus_source'))}")
        try:
            index = faiss.read_index(os.path.join(index_dir, FAISS_FILE))
        except RuntimeError as e:
            raise IndexNotFoundError(f"cannot read {os.path.join(index_dir, FAISS_FILE)} ({e}); rebuild it with: "
                                     f"{build_command(m['kind'], index_dir, m.get('corpus_source'))}") from e
        if m["kind"] == "ivf":
            empty = empty_ivf_lists(index)
            if empty:  # built before 2026-12-07 (ivf_without_empty_lists): outputs are right, some probes wasted
                log.warning("the ivf index at %s has %d empty lists of %d: a query probing them gets fewer hits "
                            "(an empty top-1 with nprobe 1); rebuild it with: %s", index_dir, empty,
                            faiss.extract_index_ivf(index).nlist,
                            build_command(m["kind"], index_dir, m.get("corpus_source")))
        r = DenseRetriever(corpus, vectors, index, m["kind"], encoder, config)
    r.index_dir = index_dir
    return r


def read_vectors(path: str, fix: str) -> np.ndarray:
    """An index's passage vectors (memory-mapped); ``IndexNotFoundError`` naming the file and
    ``fix`` (how to rebuild) when it is truncated or not an array (no pickles are loaded)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise IndexNotFoundError(f"cannot read {path} ({e}); {fix}") from e


def _is_complete(index_dir: str) -> bool:
    try:
        read_manifest(index_dir)
    except IndexNotFoundError:
        return False
    return True


def ensure_index(corpus: Corpus, kind: str, config: RetrievalConfig, encoder: QueryEncoder | None = None,
                 show_progress: bool = True, root: str | None = None, corpus_source: str | None = None) -> str:
    """The cached index of ``corpus`` under ``root`` (default root), built on first use."""
    root = root or default_index_root()
    d = os.path.join(root, index_dir_name(kind, config, corpus_sha256(corpus)))
    if not _is_complete(d):
        cache_folder(root, "index", ", or build the index elsewhere (`ralmspec index build --out DIR`) and "
                     "open it with --index DIR")
        if show_progress:
            print(f"ralmspec: building the {kind} index of {len(corpus)} passages in {d} (first use)",
                  file=sys.stderr)
        try:
            build_index(corpus, kind, d, config, encoder, show_progress=show_progress, corpus_source=corpus_source,
                        keep=lambda _m: True)  # a concurrent first use may publish it first (same name, same index)
        except OSError:
            if not _is_complete(d):  # a concurrent builder may have won the rename race
                raise
    return d


def ensure_default_index(kind: str, config: RetrievalConfig, encoder: QueryEncoder | None = None,
                         show_progress: bool = True) -> str:
    """Directory of the embedded default knowledge base's ``kind`` index, built on first use."""
    return ensure_index(default_corpus(), kind, config, encoder, show_progress, corpus_source=EMBEDDED_SOURCE)


def index_build_main(corpus_path: str | None, kind: str, out_dir: str, config: RetrievalConfig | None = None,
                     encoder: QueryEncoder | None = None, show_progress: bool = True) -> str:
    """CLI body of ``ralmspec index build``: build, print timings, return the directory.

    ``corpus_path`` None means the embedded default corpus.
    """
    config = replace(config, kind=kind) if config is not None else RetrievalConfig(kind=kind)
    t0 = time.perf_counter()
    if corpus_path:
        corpus, source = load_corpus(corpus_path), os.path.abspath(corpus_path)
    else:
        corpus, source = default_corpus(), EMBEDDED_SOURCE
    t_load = time.perf_counter() - t0
    d = build_index(corpus, kind, out_dir, config, encoder, show_progress=show_progress, corpus_source=source)
    with open(os.path.join(d, MANIFEST), encoding="utf-8") as f:
        secs = json.load(f)["build_seconds"]
    print(f"built {kind} index of {len(corpus)} passages in {d}: load {t_load:.1f}s, "
          f"encode {secs['encode']:.1f}s, index {secs['index']:.1f}s, total {time.perf_counter() - t0:.1f}s")
    return d
