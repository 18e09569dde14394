"""RalmEngine.close() from another thread while requests run (a web app shutting down on one of
its threads): each request it overtook finishes or raises ``ClosedError``, never what the parts
taken from under it raised."""

from __future__ import annotations

import threading
import time

import pytest

from ralmspec import ClosedError, GenerationConfig
from ralmspec.config import EngineConfig, RetrievalConfig, SpeculationConfig
from ralmspec.engine.core import RalmEngine
from ralmspec.retrieval.index import build_index, load_retriever
from tests.concurrent import run_together

QUESTION = "Who is Robert Boulter?"
GEN = GenerationConfig(max_new_tokens=16)
CONFIGS = {"hnsw": RetrievalConfig(kind="hnsw", hnsw_ef_search=32), "exact": RetrievalConfig(kind="exact")}


@pytest.fixture(scope="module")
def index_dirs(tmp_path_factory, small_corpus, encoder) -> dict[str, str]:
    """kind -> an index of the small corpus: each test opens its own retriever (close() ends it)."""
    root = tmp_path_factory.mktemp("close")
    return {kind: build_index(small_corpus, kind, str(root / kind), cfg, encoder, show_progress=False)
            for kind, cfg in CONFIGS.items()}


def own_engine(tiny_lm, index_dirs: dict[str, str], encoder, kind: str) -> RalmEngine:
    """An engine on its own LM view and retriever: closing it leaves the session's fixtures open."""
    return RalmEngine(tiny_lm.view(), load_retriever(index_dirs[kind], CONFIGS[kind], encoder=encoder), EngineConfig())


def close_at_first_chunk(engine: RalmEngine, **kwargs) -> object:
    """Run one request in this thread while another closes the engine as soon as the request's
    first chunk is verified (the request waits in ``on_tokens`` until it has); what the request
    returned or raised."""
    verified, closed = threading.Event(), threading.Event()

    def on_tokens(_chunk) -> None:
        if not verified.is_set():
            verified.set()
            assert closed.wait(30)

    def body(i: int) -> object:
        if i == 1:
            assert verified.wait(30)
            engine.close()
            closed.set()
            return None
        return engine.generate_sync(QUESTION, gen=GEN, on_tokens=on_tokens, **kwargs)

    return run_together(2, body, timeout_s=60)[0]


@pytest.mark.parametrize("speculate", [False, True])
def test_a_request_that_close_overtakes_raises_closed_error(tiny_lm, index_dirs, encoder, speculate):
    """The next search of a request on a closed HNSW index was an AttributeError on the index
    close() dropped, retried, then a ``RetrievalError`` ("knowledge base unavailable")."""
    engine = own_engine(tiny_lm, index_dirs, encoder, "hnsw")
    lm = engine.lm  # close() lets go of it (a closed engine's ``lm`` is a ``Released``)
    forced = SpeculationConfig(os3=False, fixed_stride=3)
    out = close_at_first_chunk(engine, speculate=speculate, spec=forced)
    assert isinstance(out, ClosedError), repr(out)
    assert lm.cached_sessions == 0


def test_close_lets_the_workers_queued_encodings_run(tiny_lm, index_dirs, encoder):
    """close() cancelled the encodings queued on the verification worker, and a request awaiting
    one ended with a bare ``CancelledError`` in its caller's thread."""
    engine = own_engine(tiny_lm, index_dirs, encoder, "exact")
    lm = engine.lm  # close() lets go of it
    gate = threading.Event()
    engine.worker.submit(gate.wait)  # the worker is busy (another request's encodings)
    encodes_beside = SpeculationConfig(os3=False, fixed_stride=3, guesser="last")

    def body(i: int) -> object:
        if i == 1:
            while engine.worker._work_queue.qsize() < 4:  # its steps' encodings and its round's, behind it
                time.sleep(0.01)
            engine.close()
            gate.set()
            return None
        return engine.generate_sync(QUESTION, gen=GEN, spec=encodes_beside)

    out = run_together(2, body, timeout_s=60)[0]
    assert isinstance(out, ClosedError) or hasattr(out, "token_ids"), repr(out)  # raised, or finished
    assert lm.cached_sessions == 0
