"""kNN-LM datastore: (key = LM context representation, value = next token) for every corpus position.

What an entry is
----------------
For a document with token ids ``t[0..n)``, entry ``j`` (``0 <= j < n-1``) has
``key = h(t[0..j])`` and ``value = t[j+1]``, where ``h`` is the LM's **final hidden state at
position j, i.e. the input of the LM head** (for GPT-2: the output of the final layer norm
``ln_f``). Khandelwal et al. (2020) compared several layers and found the last layer's
representations best (their best was the input of the final layer's feed-forward block, after
its layer norm); the input of the LM head is the choice most kNN-LM re-implementations make
and the one the query side can read without hooks. The manifest records it as
``key_layer = "lm_head_input"``.

Entries are stored **in corpus order**: entry ``i+1`` follows entry ``i`` in the same document
unless ``i`` is the last entry of its document (``doc_offsets`` records the boundaries). This is
what speculative kNN-LM exploits (the successors of a retrieved entry are likely the next
neighbours).

Keys are computed offline in sliding windows of ``window`` tokens that advance by ``stride``
positions, so every key except the first ``window - stride`` of a document sees at least
``window - stride`` tokens of left context; windows of equal length are batched (no padding).
The datastore keys need not be bit-equal to the decoding-time hidden states (they are just
data); what must be deterministic is the search, see below.

On disk (``out_dir``)
---------------------
``keys.npy`` (``float16`` or ``float32``, ``[N, d]``, opened with ``mmap_mode="r"``),
``values.npy`` (``int32 [N]``), ``doc_offsets.npy`` (``int64 [D+1]``: entries of document
``i`` are ``doc_offsets[i] .. doc_offsets[i+1]-1``), ``manifest.json`` (model, key layer, dims,
count, build times, index parameters) and, for approximate indexes, ``index.faiss``. A flat
index is rebuilt from ``keys.npy`` at load (it would be an exact copy of the keys).

Canonical search (the contract both decoders rely on)
----------------------------------------------------
``search(queries, k)`` returns, per query, ``k`` entry ids with their **squared L2 distances
recomputed exactly in float64** from the stored keys by :func:`squared_l2`, ranked by
``(distance asc, entry id asc)``. FAISS only proposes ``k + rescore_margin`` candidates.

- Batch invariance: queries are sent to FAISS in chunks of at most ``FAISS_CHUNK`` (= 16) rows,
  below FAISS's BLAS threshold (20), so every query runs through the same per-query code path
  whatever batch it is in; the float64 rescoring is per row. Hence the answer for a query vector
  is the same alone or in any batch, and the same every time (tested).
- Exactness (flat index): the candidate list is *certified* to contain the true float64 top-k:
  every entry FAISS did not return has a float32 distance >= the largest returned one, so if the
  k-th exact distance is below that bound minus FAISS's float32 error bound, nothing outside can
  rank in; otherwise the search is repeated with 4x more candidates (up to all entries).
- Approximate indexes (IVF, IVF-PQ, HNSW) return the exact float64 ranking *of the index's
  candidates*: deterministic and batch-invariant, but not the global top-k (that is what
  "approximate" means; naive and speculative decoding use the same index).

:func:`squared_l2` is a pure per-row function of ``(query, key)``: the distance of one entry is
bit-identical whether computed inside a FAISS rescoring or inside a speculation cache. Both the
speculative cache and the real search use it, which makes cache rankings comparable.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ralmspec.config import check_hnsw_m, check_type, is_int
from ralmspec.errors import ConfigError, IndexNotFoundError, RetrievalError
from ralmspec.paths import folder_bytes, link_or_copy, staged_folder

FORMAT_VERSION = 1
KEY_LAYER = "lm_head_input"
INDEX_KINDS = ("flat", "ivf", "hnsw")
KEY_DTYPES = ("float16", "float32")
FAISS_CHUNK = 16  # < faiss.cvar.distance_compute_blas_threshold (20): per-query code path
_F32_REL_ERR = 1e-4  # generous bound on FAISS's float32 relative error of one squared distance


def squared_l2(query: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Exact-ish squared L2 distances ``||key_i - query||^2`` in float64, one per row of ``keys``.

    Canonical: each output element is a deterministic function of ``(query, keys[i])`` only
    (the same inner loop over one row whatever the number of rows), so the distance of an entry
    is bit-identical across batches, subsets and orders of the rows.
    """
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    kk = np.asarray(keys, dtype=np.float64)
    if kk.ndim != 2 or kk.shape[1] != q.shape[0]:
        raise ConfigError(f"keys of shape {kk.shape} do not match a query of dimension {q.shape[0]}")
    diff = kk - q[None, :]
    return np.einsum("ij,ij->i", diff, diff)


def check_queries(queries: np.ndarray, k: int, dim: int, n: int) -> tuple[np.ndarray, int]:
    """The queries of a search as float32 C-contiguous ``[b, dim]`` (one vector: ``[1, dim]``) and
    ``k`` clamped to the ``n`` entries; ConfigError for a bad shape, ``k`` or non-finite value."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ConfigError(f"queries must have shape [n, {dim}], got {tuple(np.shape(queries))}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if not np.all(np.isfinite(q)):
        raise ConfigError("queries contain NaN or infinite values")
    return np.ascontiguousarray(q), min(int(k), n)


def rank_order(ids: np.ndarray, dists: np.ndarray, k: int) -> np.ndarray:
    """Positions of the top-``k`` of ``(id, distance)`` pairs by (distance asc, id asc), best
    first: :func:`rank_entries` is ``ids[order], dists[order]``. Ids must be unique."""
    return np.lexsort((np.asarray(ids, dtype=np.int64), np.asarray(dists, dtype=np.float64)))[:k]


def rank_entries(ids: np.ndarray, dists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``(id, distance)`` pairs by (distance asc, id asc). Ids must be unique."""
    ids = np.asarray(ids, dtype=np.int64)
    dists = np.asarray(dists, dtype=np.float64)
    order = rank_order(ids, dists, k)
    return ids[order], dists[order]


@dataclass(frozen=True)
class DatastoreBuildConfig:
    """How a datastore is built (and the default search parameters stored in its manifest)."""

    index: str = "flat"  # flat (exact) | ivf (IVF-Flat, or IVF-PQ when pq_m > 0) | hnsw
    key_dtype: str = "float16"
    max_tokens: int | None = None  # bound on the number of entries (None: the whole corpus)
    window: int = 256  # LM context window used to compute keys
    stride: int = 192  # new positions keyed per window (each key sees >= window-stride context)
    batch_size: int = 8  # windows per forward
    ivf_nlist: int | None = None  # None: about sqrt(N), at least 1
    ivf_nprobe: int = 16
    pq_m: int = 0  # > 0: IVF-PQ with pq_m sub-quantizers of 8 bits (d % pq_m == 0)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 64
    rescore_margin: int = 32  # extra FAISS candidates re-scored exactly
    train_points_per_list: int = 64  # IVF k-means training sample per list
    seed: int = 0

    def __post_init__(self) -> None:
        if self.index not in INDEX_KINDS:
            raise ConfigError(f"unknown datastore index {self.index!r}; choose one of {', '.join(INDEX_KINDS)}")
        if self.key_dtype not in KEY_DTYPES:
            raise ConfigError(f"key_dtype must be one of {', '.join(KEY_DTYPES)}, got {self.key_dtype!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ConfigError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        if not 2 <= self.window <= 8192:
            raise ConfigError(f"window must be in [2, 8192], got {self.window!r}")
        if not 1 <= self.stride <= self.window:
            raise ConfigError(f"stride must be in [1, window={self.window}], got {self.stride!r}")
        for name in ("batch_size", "ivf_nprobe", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search",
                     "train_points_per_list"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        check_hnsw_m(self.hnsw_m)
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise ConfigError(f"ivf_nlist must be >= 1, got {self.ivf_nlist!r}")
        if self.pq_m < 0 or self.rescore_margin < 0:
            raise ConfigError("pq_m and rescore_margin must be >= 0")


@dataclass
class SearchParams:
    """Search-time knobs (defaults come from the manifest; overridable at load)."""

    rescore_margin: int = 32
    nprobe: int = 16
    ef_search: int = 64
    # Flat only: batches of at least this many queries get their candidates from one float32
    # GEMM (torch, one streaming pass over the keys) instead of FAISS's per-query scans (which
    # cost b x one query: no amortisation); 0 = never. The exact float64 top-k is certified
    # either way, so the answer does not change. Single queries stay on FAISS.
    gemm_min_batch: int = 2


def corpus_documents(corpus: Sequence[Any]) -> list[str]:
    """Documents of a passage corpus: consecutive passages with the same title form one article.

    Text of a document = ``title + "\\n" + " ".join(passage texts)``, in corpus order. Accepts a
    ``Corpus`` (or any sequence of objects with ``title`` and ``text``) or a sequence of str
    (each string one document).
    """
    docs: list[str] = []
    cur_title: str | None = None
    cur: list[str] = []
    for item in corpus:
        if isinstance(item, str):
            if cur:
                docs.append(f"{cur_title}\n{' '.join(cur)}")
                cur, cur_title = [], None
            docs.append(item)
            continue
        title, text = getattr(item, "title", None), getattr(item, "text", None)
        if title is None or text is None:
            raise ConfigError(f"corpus items must be str or have .title/.text, got {type(item).__name__}")
        if cur and title != cur_title:
            docs.append(f"{cur_title}\n{' '.join(cur)}")
            cur = []
        cur_title = title
        cur.append(text)
    if cur:
        docs.append(f"{cur_title}\n{' '.join(cur)}")
    return docs


def window_plan(entries: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """The sliding windows over one document's ``entries`` positions (entry ``j`` = the state at
    token ``j``, predicting token ``j+1``): ``(w0, b0, b1)`` = one forward over tokens
    ``[w0, b1)`` gives the states of entries ``[b0, b1)``, in blocks of ``stride`` with
    ``w0 = max(0, b1 - window)``; so every state sees ``>= window - stride`` earlier tokens, or
    all of them near the document's start. Shared by the datastore build (keys) and
    ``ralmspec.knnlm.perplexity`` (queries): the same text gets the same windows."""
    for b0 in range(0, entries, stride):
        b1 = min(b0 + stride, entries)
        yield max(0, b1 - window), b0, b1


def lm_trunk(model: Any) -> Any:
    """The transformer without its LM head (``GPT2LMHeadModel.transformer``)."""
    trunk = getattr(model, "base_model", None)
    if trunk is None or trunk is model:
        raise ConfigError(f"model {type(model).__name__} exposes no base_model (transformer trunk)")
    return trunk


def hidden_size(model: Any) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[1])


class DatastoreLayout:
    """What a datastore knows besides its keys and index, whole or sharded
    (``ralmspec.knnlm.sharded``): manifest, values (entry -> next token), document boundaries,
    search parameters, and the lookups that follow from them (``doc_end``, ``successors``)."""

    def __init__(self, path: Path, manifest: dict, values: np.ndarray, doc_offsets: np.ndarray,
                 params: SearchParams):
        self.path = path
        self.manifest = manifest
        self.values = values
        self.doc_offsets = doc_offsets
        self.params = params
        self.n = int(values.shape[0])
        self.dim = int(manifest["dim"])
        self.index_kind: str = manifest["index"]["kind"]
        self.model_name: str = manifest["model"]

    def doc_end(self, ids: np.ndarray) -> np.ndarray:
        """Exclusive end entry id of each entry's document."""
        d = np.searchsorted(self.doc_offsets, ids, side="right")
        return self.doc_offsets[d]

    def successors(self, ids: np.ndarray | Sequence[int], m: int) -> np.ndarray:
        """Entries ``i+1 .. i+m`` of every ``i`` in ``ids``, within its document (unordered-unique
        preserving first appearance)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0 or m <= 0:
            return np.zeros(0, dtype=np.int64)
        cand = ids[:, None] + np.arange(1, m + 1, dtype=np.int64)[None, :]
        ok = cand < self.doc_end(ids)[:, None]
        flat = cand[ok]
        _, first = np.unique(flat, return_index=True)
        return flat[np.sort(first)]

    def disk_bytes(self) -> int:
        return folder_bytes(self.path)

    def describe(self) -> dict:
        return {"path": str(self.path), "entries": self.n, "dim": self.dim, "index": self.index_kind,
                "model": self.model_name, "documents": int(self.doc_offsets.size - 1),
                "search": asdict(self.params), "disk_bytes": self.disk_bytes()}


class Datastore(DatastoreLayout):
    """A loaded datastore: memory-mapped keys, values, document boundaries and a FAISS index.

    Thread safety: ``search`` may run concurrently with any read-only method and with other
    searches (FAISS searches are re-entrant; keys are a read-only memmap; what a search builds
    on first use is published whole: the kNN-LM server's decoding threads search at once).
    """

    def __init__(self, path: Path, manifest: dict, keys: np.ndarray, values: np.ndarray,
                 doc_offsets: np.ndarray, index: Any, params: SearchParams):
        super().__init__(path, manifest, values, doc_offsets, params)
        self.keys = keys
        self.index = index
        self.dim = int(keys.shape[1])
        self.widened_searches = 0  # flat searches whose candidate list had to be enlarged
        self._max_norm2: float | None = None
        # flat: (torch view of the index's float32 vectors, their squared norms) for the GEMM path;
        # built on first use and published as ONE tuple, so a concurrent search sees both or none
        self._gemm_keys: tuple[Any, Any] | None = None

    # ---------------------------------------------------------------- entries

    def key_vectors(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Stored keys of ``ids`` as float64 ``[len(ids), d]`` (exact conversion)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return np.zeros((0, self.dim), dtype=np.float64)
        order = np.argsort(ids, kind="stable")
        out = np.empty((ids.size, self.dim), dtype=np.float64)
        out[order] = self.keys[ids[order]]
        return out

    def distances(self, query: np.ndarray, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Canonical float64 squared L2 distances of ``ids`` to ``query`` (same as ``search``)."""
        return squared_l2(query, self.key_vectors(ids))

    # ---------------------------------------------------------------- search

    def _faiss_search(self, q32: np.ndarray, kc: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(q32, kc)

    def _max_key_norm2(self) -> float:
        if self._max_norm2 is None:
            m = 0.0
            for s in range(0, self.n, 65536):
                blk = np.asarray(self.keys[s:s + 65536], dtype=np.float32)
                m = max(m, float(np.einsum("ij,ij->i", blk, blk).max()))
            self._max_norm2 = m
        return self._max_norm2

    def _gemm_candidates(self, q32: np.ndarray, kc: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat only: candidates from ONE float32 GEMM over the index's vectors (torch / BLAS,
        all threads): ``||k||^2 + ||q||^2 - 2 q.k``, the ``kc`` smallest per query.

        ``||k||^2 - 2 q.k`` comes out of the GEMM itself (``addmm`` adds the key norms), the
        ``kc`` smallest are taken per column, and ``||q||^2`` (one constant per query: it cannot
        change a ranking) is added to those only. No [n, b] temporaries or transposed copies:
        measured 100k x 128, 7 queries, one thread: 9.8 -> 7.7 ms."""
        import faiss
        import torch

        if self._gemm_keys is None:
            xb = faiss.rev_swig_ptr(self.index.get_xb(), self.n * self.dim)
            xb = torch.from_numpy(np.asarray(xb).reshape(self.n, self.dim))  # no copy
            self._gemm_keys = (xb, (xb * xb).sum(1, keepdim=True))  # [n, d], [n, 1]
        xb, xb_norm2 = self._gemm_keys
        with torch.inference_mode():
            q = torch.from_numpy(q32)
            dist = torch.addmm(xb_norm2, xb, q.T, beta=1.0, alpha=-2.0)  # [n, b], one pass
            vals, idx = torch.topk(dist, kc, dim=0, largest=False, sorted=True)  # [kc, b]
            vals = vals.T + (q * q).sum(1, keepdim=True)
        return vals.numpy(), np.ascontiguousarray(idx.T.numpy(), dtype=np.int64)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Canonical k-NN: ``(ids int64 [n, k], squared distances float64 [n, k])`` (module doc).

        ``k`` is clamped to the number of entries. Deterministic and batch-invariant.
        """
        q, k = check_queries(queries, k, self.dim, self.n)
        out_ids = np.empty((q.shape[0], k), dtype=np.int64)
        out_d = np.empty((q.shape[0], k), dtype=np.float64)
        kc = min(self.n, k + self.params.rescore_margin)
        gemm = self.index_kind == "flat" and self.params.gemm_min_batch > 0 and q.shape[0] >= self.params.gemm_min_batch
        chunk_size = q.shape[0] if gemm else FAISS_CHUNK
        for s in range(0, q.shape[0], chunk_size):
            chunk = q[s:s + chunk_size]
            if gemm:
                cand_d, cand_i = self._gemm_candidates(chunk, kc)
            else:
                cand_d, cand_i = self._faiss_search(chunk, kc)
            for r in range(chunk.shape[0]):
                ids, d = self._rescore(chunk[r], cand_i[r], cand_d[r], k, kc, gemm)
                out_ids[s + r], out_d[s + r] = ids, d
        return out_ids, out_d

    def _certified(self, q: np.ndarray, top_d: np.ndarray, k: int, cand_d32: np.ndarray, gemm: bool) -> bool:
        """True when no entry outside the candidates can be in the exact top-k (module doc).

        Every non-candidate has a computed float32 distance >= the largest candidate's. FAISS's
        per-query path computes ``Σ (q_i - k_i)^2`` (relative error <= ``_F32_REL_ERR``); the GEMM
        path computes ``||k||^2 + ||q||^2 - 2 q.k`` (absolute error <= ``2 γ_d (||q||^2 +
        max ||k||^2)`` with ``γ_d = (d+2) u``).
        """
        if top_d.size < k:
            return False
        bound = float(cand_d32.max())
        if gemm:
            qn = float(np.dot(q.astype(np.float64), q.astype(np.float64)))
            tol = 2.2 * (self.dim + 2) * 2.0 ** -24 * (qn + self._max_key_norm2()) + 1e-6
            return top_d[-1] < bound - tol
        return top_d[-1] < bound * (1.0 - _F32_REL_ERR) - 1e-9

    def _rescore(self, q: np.ndarray, cand_i: np.ndarray, cand_d32: np.ndarray, k: int,
                 kc: int, gemm: bool = False) -> tuple[np.ndarray, np.ndarray]:
        while True:
            valid = cand_i >= 0
            ids = cand_i[valid]
            exact = self.distances(q, ids)
            top_i, top_d = rank_entries(ids, exact, k)
            if self.index_kind != "flat" or kc >= self.n or self._certified(q, top_d, k, cand_d32[valid], gemm):
                break
            # Not certified: ask FAISS's per-query path for 4x more candidates (up to all entries).
            self.widened_searches += 1
            kc = min(self.n, kc * 4)
            gemm = False
            dd, ii = self._faiss_search(q[None, :], kc)
            cand_i, cand_d32 = ii[0], dd[0]
        if top_i.size < k and self.index_kind in ("hnsw", "ivf"):
            top_i, top_d = self._widened(q, k, kc)
        if top_i.size < k:
            raise RetrievalError(f"the {self.index_kind} index returned only {top_i.size} candidates for "
                                 f"k={k} even searched at its widest; raise nprobe / ef_search")
        return top_i, top_d

    def _widened(self, q: np.ndarray, k: int, kc: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-k of the candidates of an approximate index that came up short of ``k``
        for ``q`` (HNSW at a large k, IVF lists too small), searched again, ``q`` alone, with
        ``efSearch`` / ``nprobe`` doubled until ``k`` are found or it cannot widen further.
        Asked only on a shortfall of ``q``'s own first search, so still a function of ``q``
        alone: naive and speculative decoding see the same neighbours (they failed mid-answer)."""
        import faiss

        if self.index_kind == "hnsw":
            width, widest = int(self.index.hnsw.efSearch), self.n
            params = lambda w: faiss.SearchParametersHNSW(efSearch=w)  # noqa: E731
        else:
            ivf = faiss.extract_index_ivf(self.index)
            width, widest = int(ivf.nprobe), int(ivf.nlist)
            params = lambda w: faiss.SearchParametersIVF(nprobe=w)  # noqa: E731
        top_i, top_d = np.empty(0, dtype=np.int64), np.empty(0)
        while width < widest:
            width = min(widest, width * 2)
            self.widened_searches += 1
            _, ii = self.index.search(q[None, :], kc, params=params(width))
            ids = ii[0][ii[0] >= 0]
            top_i, top_d = rank_entries(ids, self.distances(q, ids), k)
            if top_i.size >= k:
                break
        return top_i, top_d



# -------------------------------------------------------------------- build


def make_faiss_index(kind: str, keys32: np.ndarray, cfg: DatastoreBuildConfig) -> tuple[Any, dict]:
    """A ``kind`` (flat / ivf / hnsw) FAISS L2 index over the float32 keys, with its manifest
    ``index`` info. Shared by the build and the sharding of a datastore (an HNSW shard's graph)."""
    import faiss

    n, d = keys32.shape
    info: dict[str, Any] = {"kind": kind}
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
        index.add(keys32)
        return index, info
    if kind == "ivf":
        from ralmspec.retrieval.dense import ivf_without_empty_lists

        if cfg.pq_m > 0:
            if d % cfg.pq_m:
                raise ConfigError(f"pq_m={cfg.pq_m} must divide the key dimension {d}")
            if n < 256:  # each sub-quantizer trains 256 centroids (8 bits)
                raise ConfigError(f"an IVF-PQ index needs at least 256 entries to train its codebooks, got {n}; "
                                  "use pq_m 0 (IVF-flat) or a larger datastore")

        asked = min(cfg.ivf_nlist or max(1, int(round(np.sqrt(n)))), n)
        n_train = min(n, max(asked * cfg.train_points_per_list, 256 if cfg.pq_m else 1))
        quantizer = faiss.IndexFlatL2(d)
        if cfg.pq_m > 0:
            index = faiss.IndexIVFPQ(quantizer, d, asked, cfg.pq_m, 8)
        else:
            index = faiss.IndexIVFFlat(quantizer, d, asked, faiss.METRIC_L2)
        index.own_fields = True
        quantizer.this.disown()  # the IVF index owns (and frees) its quantizer
        index.cp.seed = cfg.seed
        rng = np.random.default_rng(cfg.seed)
        sample = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
        index.train(np.ascontiguousarray(keys32[sample]))
        index.add(keys32)
        # Lists k-means leaves empty (more lists than distinct keys: repeated contexts) would
        # cost a probe each and widened searches (``Datastore._widened``): they are dropped,
        # without training again (each key stays in its list, with the same PQ code).
        index, nlist = ivf_without_empty_lists(index, keys32)
        index.nprobe = cfg.ivf_nprobe
        info.update(nlist=nlist, nprobe=cfg.ivf_nprobe, pq_m=cfg.pq_m, train_points=int(n_train))
        return index, info
    index = faiss.IndexHNSWFlat(d, cfg.hnsw_m)
    index.hnsw.efConstruction = cfg.hnsw_ef_construction
    index.add(keys32)
    index.hnsw.efSearch = cfg.hnsw_ef_search
    info.update(m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction, ef_search=cfg.hnsw_ef_search)
    return index, info


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """ConfigError unless ``out_dir`` may receive a datastore: absent, empty, or (``overwrite``) a
    datastore already."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigError(f"datastore output {str(out_dir)!r} exists and is not a folder")
        contents = list(out_dir.iterdir())
        if contents:
            if not overwrite:
                raise ConfigError(f"datastore folder {str(out_dir)!r} is not empty; pass overwrite=True "
                                  "(--overwrite) to replace it")
            if not (out_dir / "manifest.json").is_file():
                raise ConfigError(f"refusing to overwrite {str(out_dir)!r}: it is not a datastore "
                                  "(no manifest.json)")


def build_datastore(lm: Any, documents: Sequence[str] | Sequence[Any], out_dir: str | os.PathLike,
                    config: DatastoreBuildConfig | None = None, *, model_name: str | None = None,
                    overwrite: bool = False, progress: bool = True) -> Datastore:
    """Build a datastore over ``documents`` with ``lm`` and write it to ``out_dir``; return it loaded.

    ``lm``: an ``HFLanguageModel``-like object (``.model`` a transformers causal LM with a
    ``base_model`` trunk, ``.tokenizer.encode``). ``documents``: strings, or a passage corpus
    (grouped into articles by :func:`corpus_documents`). At most ``config.max_tokens`` entries
    are kept (corpus order). The build is written to a temporary folder and moved into place,
    so a failed build never leaves a half datastore behind.
    """
    import torch
    from tqdm.auto import tqdm

    if isinstance(documents, (str, bytes)):  # its characters would be the documents
        raise ConfigError("documents must be a sequence of strings (or a passage corpus), got one string: "
                          "pass [text]")
    check_type(config, DatastoreBuildConfig, "config", optional=True)
    cfg = config or DatastoreBuildConfig()
    out = Path(out_dir)
    prepare_out_dir(out, overwrite)
    model = lm.model
    trunk = lm_trunk(model)
    d = hidden_size(model)
    max_ctx = int(getattr(lm, "max_context", cfg.window))
    if cfg.window > max_ctx:
        raise ConfigError(f"window {cfg.window} exceeds the model's context length {max_ctx}")
    texts = corpus_documents(documents) if documents and not isinstance(documents[0], str) else list(documents)

    t_start = time.perf_counter()
    toks: list[list[int]] = []
    n_entries: list[int] = []
    budget = cfg.max_tokens if cfg.max_tokens is not None else np.iinfo(np.int64).max
    total = 0
    for text in texts:
        if total >= budget:
            break
        ids = lm.tokenizer.encode(text)
        e = min(max(len(ids) - 1, 0), budget - total)
        if e <= 0:
            continue
        toks.append(ids)
        n_entries.append(e)
        total += e
    t_tok = time.perf_counter() - t_start
    if total == 0:
        raise ConfigError("the corpus yields no datastore entries (every document has < 2 tokens)")
    doc_offsets = np.zeros(len(toks) + 1, dtype=np.int64)
    doc_offsets[1:] = np.cumsum(n_entries)

    # Work items: (doc, window start, first keyed position, end) grouped by window length.
    items: dict[int, list[tuple[int, int, int, int]]] = {}
    for di, e in enumerate(n_entries):
        for w0, b0, b1 in window_plan(e, cfg.window, cfg.stride):
            items.setdefault(b1 - w0, []).append((di, w0, b0, b1))

    with staged_folder(out, ".knnlm-build-") as tmp:
        keys = np.lib.format.open_memmap(tmp / "keys.npy", mode="w+", dtype=np.dtype(cfg.key_dtype),
                                         shape=(total, d))
        values = np.empty(total, dtype=np.int32)
        for di, ids in enumerate(toks):
            o, e = doc_offsets[di], n_entries[di]
            values[o:o + e] = np.asarray(ids[1:e + 1], dtype=np.int32)

        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        bar = tqdm(total=total, desc="knnlm datastore", unit="tok", disable=not progress)
        with torch.inference_mode():
            for length in sorted(items):
                group = items[length]
                for s in range(0, len(group), cfg.batch_size):
                    batch = group[s:s + cfg.batch_size]
                    x = torch.tensor([toks[di][w0:w0 + length] for di, w0, _, _ in batch], dtype=torch.long,
                                     device=next(model.parameters()).device)
                    hidden = trunk(input_ids=x, use_cache=False).last_hidden_state.float().cpu().numpy()
                    for row, (di, w0, b0, b1) in enumerate(batch):
                        o = doc_offsets[di]
                        keys[o + b0:o + b1] = hidden[row, b0 - w0:b1 - w0]
                        bar.update(b1 - b0)
        bar.close()
        model.train(was_training)
        keys.flush()
        t_enc = time.perf_counter() - t0

        t0 = time.perf_counter()
        keys32 = np.ascontiguousarray(np.asarray(keys, dtype=np.float32))
        index, index_info = make_faiss_index(cfg.index, keys32, cfg)
        if cfg.index != "flat":
            import faiss

            faiss.write_index(index, str(tmp / "index.faiss"))
        del keys32
        t_idx = time.perf_counter() - t0

        np.save(tmp / "values.npy", values)
        np.save(tmp / "doc_offsets.npy", doc_offsets)
        del keys
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": model_name or getattr(lm, "name", "unknown"),
            "key_layer": KEY_LAYER,
            "distance": "squared_l2",
            "dim": d,
            "count": int(total),
            "documents": len(toks),
            "key_dtype": cfg.key_dtype,
            "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
            "index": index_info,
            "search": asdict(SearchParams(rescore_margin=cfg.rescore_margin, nprobe=cfg.ivf_nprobe,
                                          ef_search=cfg.hnsw_ef_search)),
            "build": {"config": asdict(cfg), "tokenize_s": round(t_tok, 3), "encode_s": round(t_enc, 3),
                      "index_s": round(t_idx, 3), "total_s": round(time.perf_counter() - t_start, 3),
                      "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return load_datastore(out)


def reindex_datastore(src: str | os.PathLike, out_dir: str | os.PathLike, config: DatastoreBuildConfig,
                      *, overwrite: bool = False) -> Datastore:
    """A new datastore folder with the entries of ``src`` and a new index (``config.index`` and
    its parameters; the key-computation fields of ``config`` are ignored).

    With ``config.max_tokens`` below the source's count, the new datastore holds the first
    ``max_tokens`` entries (a corpus-order prefix: the datastore a build with that bound makes,
    up to float rounding of the last window). Otherwise arrays are hard-linked when possible
    (copied otherwise), so exact and approximate indexes over identical keys cost one LM pass.
    """
    s = load_datastore(src)
    out = Path(out_dir)
    prepare_out_dir(out, overwrite)
    n = s.n if config.max_tokens is None else min(s.n, config.max_tokens)
    with staged_folder(out, ".knnlm-reindex-") as tmp:
        if n == s.n:
            for name in ("keys.npy", "values.npy", "doc_offsets.npy"):
                link_or_copy(s.path / name, tmp / name)
        else:
            keys = np.lib.format.open_memmap(tmp / "keys.npy", mode="w+", dtype=s.keys.dtype, shape=(n, s.dim))
            for st in range(0, n, 65536):
                keys[st:min(n, st + 65536)] = s.keys[st:min(n, st + 65536)]
            keys.flush()
            del keys
            np.save(tmp / "values.npy", s.values[:n])
            offs = s.doc_offsets[s.doc_offsets < n]
            np.save(tmp / "doc_offsets.npy", np.append(offs, n).astype(np.int64))
        t0 = time.perf_counter()
        keys32 = np.ascontiguousarray(np.asarray(s.keys[:n], dtype=np.float32))
        index, info = make_faiss_index(config.index, keys32, config)
        del keys32
        if config.index != "flat":
            import faiss

            faiss.write_index(index, str(tmp / "index.faiss"))
        manifest = dict(s.manifest)
        manifest["index"] = info
        manifest["count"] = int(n)
        manifest["documents"] = int(np.load(tmp / "doc_offsets.npy").size - 1)
        manifest["search"] = asdict(SearchParams(rescore_margin=config.rescore_margin, nprobe=config.ivf_nprobe,
                                                 ef_search=config.hnsw_ef_search))
        manifest["reindexed_from"] = {"path": str(s.path), "count": s.n, "index_s": round(time.perf_counter() - t0, 3)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return load_datastore(out)


# -------------------------------------------------------------------- load

MANIFEST = "manifest.json"
_REQUIRED = (MANIFEST, "keys.npy", "values.npy", "doc_offsets.npy")


def read_datastore_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the datastore folder ``path`` (whole or sharded), else ConfigError."""
    where = str(Path(path) / MANIFEST)
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {where!r}: {exc}") from exc
    if not isinstance(m, dict):
        raise ConfigError(f"{where!r} is not a datastore manifest")
    return m


def is_sharded_datastore(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a sharded datastore (a manifest with ``"shards"``,
    ``ralmspec.knnlm.sharded``)."""
    p = Path(path)
    if not (p / MANIFEST).is_file():
        return False
    try:
        return bool(read_datastore_manifest(p).get("shards"))
    except ConfigError:
        return False


def search_params(manifest: dict, *, nprobe: int | None = None, ef_search: int | None = None,
                  rescore_margin: int | None = None, gemm_min_batch: int | None = None) -> SearchParams:
    """The manifest's search parameters with the given overrides (ConfigError if invalid)."""
    s = manifest.get("search", {})
    params = SearchParams(rescore_margin=int(s.get("rescore_margin", 32) if rescore_margin is None else rescore_margin),
                          nprobe=int(s.get("nprobe", 16) if nprobe is None else nprobe),
                          ef_search=int(s.get("ef_search", 64) if ef_search is None else ef_search),
                          gemm_min_batch=int(s.get("gemm_min_batch", 2) if gemm_min_batch is None else gemm_min_batch))
    if params.rescore_margin < 0 or params.nprobe < 1 or params.ef_search < 1 or params.gemm_min_batch < 0:
        raise ConfigError(f"invalid search parameters {params}")
    return params


def _flat_index(keys: np.ndarray) -> Any:
    """A FAISS flat (exact) L2 index over ``keys`` (any float dtype, memory-mapped is fine)."""
    import faiss

    index = faiss.IndexFlatL2(keys.shape[1])
    for st in range(0, keys.shape[0], 65536):
        index.add(np.ascontiguousarray(keys[st:st + 65536], dtype=np.float32))
    return index


def exact_twin(datastore: Datastore) -> Datastore:
    """The entries of ``datastore`` searched exactly: a flat index over its stored keys (built in
    memory; nothing is written). The reference the search recall of an approximate index is
    measured against on the same queries. A flat datastore is its own twin."""
    if datastore.index_kind == "flat":
        return datastore
    manifest = dict(datastore.manifest, index={"kind": "flat", "twin_of": datastore.manifest["index"]})
    return Datastore(datastore.path, manifest, datastore.keys, datastore.values, datastore.doc_offsets,
                     _flat_index(datastore.keys), datastore.params)


def load_entries_array(path: Path, kinds: str, mmap: bool = False) -> np.ndarray:
    """One ``.npy`` array of a datastore whose dtype kind is one of ``kinds`` (``"f"`` float keys,
    ``"iu"`` integer values and offsets); ``ConfigError`` naming the file when it is truncated,
    not an array (no pickles are loaded) or of another dtype."""
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"cannot read {str(path)!r} ({exc}); rebuild the datastore") from exc
    if not isinstance(a, np.ndarray) or a.dtype.kind not in kinds:
        raise ConfigError(f"{str(path)!r} holds {getattr(a, 'dtype', type(a).__name__)} entries, expected "
                          f"{'floats' if kinds == 'f' else 'integers'}; rebuild the datastore")
    return a


def load_datastore(path: str | os.PathLike, *, nprobe: int | None = None, ef_search: int | None = None,
                   rescore_margin: int | None = None, gemm_min_batch: int | None = None,
                   with_index: bool = True) -> Datastore:
    """Open a datastore folder written by :func:`build_datastore`.

    Raises ``IndexNotFoundError`` when the folder or one of its files is missing, and
    ``ConfigError`` when the manifest is unreadable, of another format version, or inconsistent
    with the arrays, or when the folder is a sharded datastore (``ralmspec.knnlm.sharded``).
    ``with_index=False`` opens the entries only (no FAISS index: ``search`` is unavailable).
    """
    p = Path(path)
    if not p.is_dir():
        raise IndexNotFoundError(f"kNN-LM datastore {str(p)!r} not found; build one with "
                                 "`ralmspec knnlm build --out DIR`")
    if not (p / "keys.npy").exists() and is_sharded_datastore(p):
        raise ConfigError(f"{str(p)!r} is a sharded kNN-LM datastore; open it with "
                          "ralmspec.knnlm.open.open_datastore (CLI: --shards N for Ray shards)")
    missing = [f for f in _REQUIRED if not (p / f).is_file()]
    if missing:
        raise IndexNotFoundError(f"kNN-LM datastore {str(p)!r} is incomplete (missing {', '.join(missing)}); "
                                 "rebuild it with `ralmspec knnlm build`")
    try:
        manifest = json.loads((p / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {str(p / 'manifest.json')!r}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"datastore {str(p)!r} has format version "
                          f"{manifest.get('format_version') if isinstance(manifest, dict) else None!r}, "
                          f"expected {FORMAT_VERSION}; rebuild it")
    index_info = manifest.get("index")
    kind = index_info.get("kind") if isinstance(index_info, dict) else None
    if kind not in INDEX_KINDS:
        raise ConfigError(f"datastore {str(p)!r} has unknown index kind {kind!r}")
    keys = load_entries_array(p / "keys.npy", "f", mmap=True)
    values = load_entries_array(p / "values.npy", "iu")
    doc_offsets = load_entries_array(p / "doc_offsets.npy", "iu")
    n = manifest.get("count")
    if not is_int(n, 0) or keys.ndim != 2 or keys.shape != (n, manifest.get("dim")) or values.shape != (n,) \
            or doc_offsets.ndim != 1 or doc_offsets.size < 1 or doc_offsets[0] != 0 or doc_offsets[-1] != n:
        raise ConfigError(f"datastore {str(p)!r} is inconsistent: keys {keys.shape}, values {values.shape}, "
                          f"doc offsets {doc_offsets.shape}, manifest count {n!r}, dim {manifest.get('dim')!r}; "
                          "rebuild it")
    params = search_params(manifest, nprobe=nprobe, ef_search=ef_search, rescore_margin=rescore_margin,
                           gemm_min_batch=gemm_min_batch)
    if not with_index:
        return Datastore(p, manifest, keys, values, doc_offsets, None, params)
    import faiss

    if kind == "flat":
        index = _flat_index(keys)
    else:
        if not (p / "index.faiss").is_file():
            raise IndexNotFoundError(f"datastore {str(p)!r} lacks index.faiss for its {kind} index; rebuild it")
        index = faiss.read_index(str(p / "index.faiss"))
        if index.ntotal != n:
            raise ConfigError(f"index.faiss of {str(p)!r} holds {index.ntotal} vectors, manifest says {n}")
        if kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = params.nprobe
        else:
            index.hnsw.efSearch = params.ef_search
    return Datastore(p, manifest, keys, values, doc_offsets, index, params)


__all__ = ["Datastore", "DatastoreLayout", "DatastoreBuildConfig", "SearchParams", "build_datastore", "load_datastore",
           "load_entries_array",
           "read_datastore_manifest", "is_sharded_datastore", "make_faiss_index", "prepare_out_dir", "lm_trunk",
           "reindex_datastore", "check_queries", "search_params", "window_plan", "exact_twin",
           "corpus_documents", "squared_l2", "rank_entries", "hidden_size", "KEY_LAYER", "INDEX_KINDS",
           "FAISS_CHUNK"]
