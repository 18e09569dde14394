"""Thread counts of the numeric libraries (torch, FAISS, numpy's BLAS) for this process.

One place for what ``--threads N`` means (``ralmspec bench / serve``, ``ralmspec knnlm ...``,
the experiment harness) and for what a shard actor does with its ``threads``.
"""

from __future__ import annotations

from ralmspec.errors import ConfigError


def set_threads(n: int | None, *, blas: bool = True) -> None:
    """torch (process-wide) and FAISS (OpenMP: the calling thread) threads, and with ``blas``
    numpy's BLAS too (the blocked flat scan of small verification batches).

    ``None`` leaves the libraries' defaults; ``n < 1`` is a ``ConfigError``. Shard actors pass
    ``blas=False``: they bound only FAISS and torch (their searches' own threads).
    """
    if n is None:
        return
    if n < 1:
        raise ConfigError("--threads must be >= 1")
    import faiss

    faiss.omp_set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - torch is part of the [cpu] stack
        pass
    if not blas:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of the [cpu] stack
        return
    threadpool_limits(limits=n, user_api="blas")
