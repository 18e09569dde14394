"""GPU-only tests: every test here is marked ``gpu`` and skips cleanly without CUDA.

Run them on a machine with a CUDA GPU (see docs/vllm.md):

    pip install -e '.[gpu,dev]'      # not with [cpu]: its faiss-cpu would shadow faiss-gpu-cu12
    python -m pytest -m gpu tests/gpu -v -s
"""

from __future__ import annotations

import pytest


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    """Mark every test under tests/gpu as ``gpu`` and skip it when CUDA is not available."""
    here = __file__.rsplit("/", 1)[0]
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    has_cuda = None
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if has_cuda is None:
                has_cuda = cuda_available()
            if not has_cuda:
                item.add_marker(skip)
