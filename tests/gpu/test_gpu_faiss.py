"""faiss-gpu flat / IVF retrievers give the same answers as the CPU ones.

Skipped without CUDA (conftest) or without a GPU build of FAISS. Two comparisons per kind:

1. Same (CPU) query encoder for both: FAISS on the GPU only proposes candidates, which are
   re-scored canonically on the CPU (dense.py), so ids AND scores must be identical, for single
   queries and for batches.
2. The full GPU path (``open_knowledge_base(RetrievalConfig(kind, device="cuda"))``: MiniLM on CUDA
   too): query vectors differ from the CPU ones in the last bits, so a top-1 may flip only where
   the two passages' CPU scores are tied within ``NEAR_TIE``; the agreement rate is printed.
"""

from __future__ import annotations

import pytest

NEAR_TIE = 1e-4
K = 20


@pytest.fixture(scope="module")
def queries():
    from ralmspec.data.loaders import default_questions

    return [q.question for q in default_questions()[:64]]


@pytest.fixture(scope="module")
def built(small_corpus, encoder, tmp_path_factory):
    """kind -> index folder over the session's small corpus (built on the CPU)."""
    from ralmspec.config import RetrievalConfig
    from ralmspec.retrieval.index import build_index

    root = tmp_path_factory.mktemp("gpu-indexes")
    out = {}
    for kind in ("exact", "ivf"):
        cfg = RetrievalConfig(kind=kind, ivf_nlist=16, ivf_nprobe=4)
        out[kind] = build_index(small_corpus, kind, str(root / kind), cfg, encoder, show_progress=False)
    return out


@pytest.fixture(scope="module", autouse=True)
def faiss_gpu():
    """Skip the module without a GPU build of FAISS, before ``built`` asks FAISS for indexes (the
    device image has no FAISS at all: that is a skip, not an error)."""
    pytest.importorskip("faiss", reason="no FAISS here")
    from ralmspec.retrieval.dense import faiss_gpu_available

    if not faiss_gpu_available():
        pytest.skip("faiss has no GPU support here (pip install -e '.[gpu]', without [cpu])")


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_gpu_index_same_results_as_cpu(kind, built, encoder, queries):
    from ralmspec.config import RetrievalConfig
    from ralmspec.retrieval.index import load_retriever

    cpu = load_retriever(built[kind], RetrievalConfig(kind=kind, ivf_nprobe=4), encoder=encoder)
    gpu = load_retriever(built[kind], RetrievalConfig(kind=kind, ivf_nprobe=4, device="cuda"), encoder=encoder)
    assert gpu.faiss_device == "cuda" and cpu.faiss_device == "cpu"
    assert gpu.search_sync(queries, K) == cpu.search_sync(queries, K)
    assert [gpu.search_sync([q], K)[0] for q in queries[:16]] == cpu.search_sync(queries[:16], K)
    gpu.close()
    cpu.close()


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_full_gpu_path_top1_agrees_up_to_ties(kind, built, encoder, queries):
    from ralmspec.config import RetrievalConfig
    from ralmspec.retrieval.index import load_retriever
    from ralmspec.retrieval.open import open_knowledge_base

    cpu = load_retriever(built[kind], RetrievalConfig(kind=kind, ivf_nprobe=4), encoder=encoder)
    gpu = open_knowledge_base(RetrievalConfig(kind=kind, ivf_nprobe=4, device="cuda", index_dir=built[kind]))
    assert gpu.faiss_device == "cuda"
    same = 0
    for q, a, b in zip(queries, cpu.search_sync(queries, 1), gpu.search_sync(queries, 1)):
        if a[0].doc_id == b[0].doc_id:
            same += 1
            continue
        sa, sb = cpu.score(q, [a[0].doc_id, b[0].doc_id])
        assert abs(sa - sb) < NEAR_TIE, f"{kind}: top-1 {a[0]} (cpu) vs {b[0]} (gpu) for {q!r} is not a tie"
    print(f"\n[gpu] {kind}: full GPU path top-1 == CPU on {same}/{len(queries)} queries")
    gpu.close()
    cpu.close()
