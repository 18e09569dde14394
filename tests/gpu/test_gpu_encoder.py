"""The query encoder on CUDA runs on a stream of its own (``ralmspec/retrieval/encoder.py``).

Skipped without CUDA (conftest). The static runner enqueues a whole chunk of decode steps on the
default stream before it reads the GPU once; an encoding on that stream (a verification's,
beside decoding) queued behind the chunk in flight. Here a backlog of matrix products stands for
the chunk: an encoding made while it runs returns before the default stream is done, with the
same vectors as an encoding made on an idle GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ralmspec.retrieval.encoder import QueryEncoder

TEXTS = ["who wrote hamlet", "the river flows into the sea", "which city is hed pe from"]


@pytest.mark.parametrize("batching", ["single", "pinned"])
def test_an_encoding_does_not_wait_for_the_default_streams_work(batching):
    enc = QueryEncoder(device="cuda", batching=batching, cache_size=0)
    expected = enc.encode_queries(TEXTS)  # on an idle GPU (and the first-use costs paid)
    a = torch.randn(4096, 4096, device="cuda")
    out = torch.empty_like(a)
    torch.cuda.synchronize()
    for _ in range(300):  # hundreds of ms of work queued on the default stream, not waited for
        torch.mm(a, a, out=out)
    got = enc.encode_queries(TEXTS)
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_busy, "the encoding waited for the default stream's backlog"
    assert np.array_equal(got, expected)
