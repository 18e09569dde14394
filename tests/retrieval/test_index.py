"""Index build / save / load, the error paths, and the default-index factory."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ralmspec.config import RetrievalConfig
from ralmspec.data.corpus import Corpus, Passage
from ralmspec.data.loaders import corpus_sha256, default_corpus, save_corpus
from ralmspec.errors import ConfigError, IndexNotFoundError
from ralmspec.retrieval.dense import faiss_gpu_available
from ralmspec.retrieval.index import (build_index, default_index_root, ensure_default_index, ensure_index,
                                      index_build_main, load_retriever)
from ralmspec.retrieval.open import open_knowledge_base

from .conftest import KINDS, N_PASSAGES, kb_config


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_identical_results(kind, kb_index_dirs, kb_retrievers, kb_corpus, kb_queries,
                                                      encoder, tmp_path):
    moved = str(tmp_path / "copy")
    shutil.copytree(kb_index_dirs[kind], moved)
    r2 = load_retriever(moved, kb_config(kind), encoder)
    assert list(r2.corpus) == list(kb_corpus)
    assert r2.search_sync(kb_queries, 10) == kb_retrievers[kind].search_sync(kb_queries, 10)
    m = json.load(open(os.path.join(moved, "manifest.json")))
    assert m["kind"] == kind and m["n"] == N_PASSAGES
    assert m["corpus_sha256"] == corpus_sha256(kb_corpus)
    assert m["dim"] == (None if kind == "bm25" else 384)
    assert "faiss-cpu" in m["versions"] or "faiss-gpu-cu12" in m["versions"]


def test_dense_kinds_encode_the_corpus_once(kb_index_dirs):
    manifests = {k: json.load(open(os.path.join(kb_index_dirs[k], "manifest.json"))) for k in ("exact", "hnsw", "ivf")}
    assert manifests["exact"]["embeddings_reused_from"] is None
    assert manifests["exact"]["build_seconds"]["encode"] > 0
    for k in ("hnsw", "ivf"):
        assert manifests[k]["embeddings_reused_from"] is not None
        assert manifests[k]["build_seconds"]["encode"] == 0
        assert os.path.samefile(os.path.join(kb_index_dirs[k], "embeddings.npy"),
                                os.path.join(kb_index_dirs["exact"], "embeddings.npy")) or \
            open(os.path.join(kb_index_dirs[k], "embeddings.npy"), "rb").read() == \
            open(os.path.join(kb_index_dirs["exact"], "embeddings.npy"), "rb").read()


def test_missing_index_names_the_build_command(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(IndexNotFoundError) as ei:
        load_retriever(missing, RetrievalConfig(kind="hnsw"))
    msg = str(ei.value)
    assert f"ralmspec index build --corpus CORPUS.jsonl --retriever hnsw --out {missing}" in msg
    os.makedirs(missing)
    with pytest.raises(IndexNotFoundError, match="no manifest.json"):
        load_retriever(missing, RetrievalConfig(kind="bm25"))


def test_incomplete_index_names_the_rebuild_command(kb_index_dirs, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(kb_index_dirs["ivf"], broken)
    os.remove(os.path.join(broken, "index.faiss"))
    with pytest.raises(IndexNotFoundError) as ei:
        load_retriever(broken, kb_config("ivf"))
    assert "missing index.faiss" in str(ei.value)
    assert f"ralmspec index build --corpus kb-test-corpus.jsonl --retriever ivf --out {broken}" in str(ei.value)


def test_truncated_vectors_name_the_file_and_the_rebuild_command(kb_index_dirs, tmp_path, encoder):
    broken = str(tmp_path / "truncated")
    shutil.copytree(kb_index_dirs["exact"], broken)
    emb = os.path.join(broken, "embeddings.npy")
    with open(emb, "r+b") as f:
        f.truncate(3000)
    with pytest.raises(IndexNotFoundError) as ei:  # was numpy's bare "mmap length is greater than file size"
        load_retriever(broken, kb_config("exact"), encoder)
    assert f"cannot read {emb}" in str(ei.value) and "ralmspec index build" in str(ei.value)


def test_kind_mismatch_is_a_config_error(kb_index_dirs, encoder):
    with pytest.raises(ConfigError, match="'hnsw' index but the retriever is 'exact'"):
        load_retriever(kb_index_dirs["hnsw"], kb_config("exact"), encoder)


def test_refuses_to_overwrite_a_directory_that_is_not_an_index(tmp_path, kb_corpus):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a ralmspec index"):
        build_index(kb_corpus, "bm25", str(d), kb_config("bm25"), None, show_progress=False)
    assert (d / "notes.txt").read_text() == "keep me"


def test_rebuild_replaces_an_existing_index_and_cli_helper_reports_timing(tmp_path, capsys):
    corpus = Corpus([Passage(i, "T", t, str(i)) for i, t in enumerate(["alpha beta", "gamma delta", "beta gamma"])])
    path = str(tmp_path / "c.jsonl.gz")
    save_corpus(corpus, path)
    out = str(tmp_path / "idx")
    assert index_build_main(path, "bm25", out, None, show_progress=False) == out
    assert "built bm25 index of 3 passages" in capsys.readouterr().out
    bigger = Corpus(list(corpus) + [Passage(3, "T", "delta epsilon", "3")])
    build_index(bigger, "bm25", out, kb_config("bm25"), None, show_progress=False)
    r = load_retriever(out, kb_config("bm25"))
    assert len(r.corpus) == 4 and r.search_sync(["epsilon"], 1)[0][0].doc_id == 3
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp dirs left


def test_open_knowledge_base_paths(tmp_path, monkeypatch, kb_index_dirs, encoder):
    monkeypatch.setenv("RALMSPEC_HOME", str(tmp_path / "home"))
    assert default_index_root() == str(tmp_path / "home" / "indexes")
    # 1. an explicit index_dir
    r = open_knowledge_base(RetrievalConfig(kind="exact", index_dir=kb_index_dirs["exact"]), encoder=encoder)
    assert r.index_dir == kb_index_dirs["exact"]
    # 2. a corpus file: built once, cached by corpus hash under the default root
    corpus = Corpus([Passage(i, "", t) for i, t in enumerate(["red apples", "green pears", "yellow bananas"])])
    path = str(tmp_path / "fruit.jsonl.gz")
    save_corpus(corpus, path)
    r1 = open_knowledge_base(RetrievalConfig(kind="bm25"), corpus_path=path, show_progress=False)
    assert r1.index_dir.startswith(default_index_root())
    mtime = os.path.getmtime(os.path.join(r1.index_dir, "manifest.json"))
    r2 = open_knowledge_base(RetrievalConfig(kind="bm25"), corpus_path=path, show_progress=False)
    assert r2.index_dir == r1.index_dir and os.path.getmtime(os.path.join(r2.index_dir, "manifest.json")) == mtime
    assert r2.search_sync(["pears"], 1)[0][0].doc_id == 1


def test_embedded_default_bm25_index_is_built_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("RALMSPEC_HOME", str(tmp_path))
    d = ensure_default_index("bm25", RetrievalConfig(kind="bm25"), show_progress=False)
    assert d.startswith(str(tmp_path))
    r = open_knowledge_base(RetrievalConfig(kind="bm25"), show_progress=False)
    assert r.index_dir == d and len(r.corpus) == len(default_corpus())
    top = r.search_sync(["Du Fu Tang dynasty poet Chinese poetry"], 3)[0]
    assert r.corpus[top[0].doc_id].title == "Du Fu"


@pytest.mark.skipif(faiss_gpu_available(), reason="this machine has faiss-gpu and a GPU")
def test_cuda_without_faiss_gpu_is_a_clear_config_error(kb_index_dirs, encoder):
    with pytest.raises(ConfigError, match="faiss-gpu|no GPU"):
        load_retriever(kb_index_dirs["exact"], kb_config("exact", device="cuda"), encoder)
    r = load_retriever(kb_index_dirs["hnsw"], kb_config("hnsw", device="cuda"), encoder)  # HNSW: CPU only
    assert r.faiss_device == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not faiss_gpu_available(), reason="needs faiss-gpu and a CUDA GPU")
@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_gpu_search_equals_cpu_search(kind, kb_index_dirs, kb_retrievers, kb_queries, encoder):
    r = load_retriever(kb_index_dirs[kind], kb_config(kind, device="cuda"), encoder)
    assert r.faiss_device == "cuda"
    cpu = kb_retrievers[kind].search_sync(kb_queries, 10)
    for size in (1, 8, 48):
        got = [h for i in range(0, len(kb_queries), size) for h in r.search_sync(kb_queries[i:i + size], 10)]
        if kind == "exact":
            assert got == cpu
        for q, hits in zip(kb_queries, got):
            assert r.score(q, [h.doc_id for h in hits]) == [h.score for h in hits]


def test_a_first_use_that_loses_the_race_keeps_the_published_index(tmp_path, monkeypatch):
    """Two processes' first use of a cached index both build it; the one that publishes second
    used to swap the first one's folder away (renamed aside, then deleted) under any process
    already reading it: a server starting beside it could find the folder gone. Now the second
    build is dropped and the published folder stays, untouched."""
    from ralmspec.retrieval import index as index_module

    corpus = Corpus([Passage(i, "T", t, str(i)) for i, t in enumerate(["alpha beta", "gamma delta", "beta gamma"])])
    cfg = RetrievalConfig(kind="bm25")
    root = str(tmp_path / "cache")
    d = ensure_index(corpus, "bm25", cfg, show_progress=False, root=root)  # the winner's build
    before = (os.stat(d).st_ino, open(os.path.join(d, "manifest.json")).read())
    monkeypatch.setattr(index_module, "_is_complete", lambda _d: False)  # checked before the winner published
    assert ensure_index(corpus, "bm25", cfg, show_progress=False, root=root) == d
    assert (os.stat(d).st_ino, open(os.path.join(d, "manifest.json")).read()) == before
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(d)]  # the loser's build is gone
    build_index(corpus, "bm25", d, cfg, show_progress=False)  # `ralmspec index build --out` still replaces
    assert os.stat(d).st_ino != before[0]


def test_a_first_split_that_loses_the_race_keeps_the_published_split(tmp_path, monkeypatch):
    """The same for the cached shard split (``ensure_sharded_index``); a stale split (of an
    older whole index) is still replaced."""
    from ralmspec.retrieval import shard_index as shard_module

    corpus = Corpus([Passage(i, "T", t, str(i)) for i, t in enumerate(["alpha beta", "gamma delta", "beta gamma",
                                                                        "delta alpha"])])
    cfg = RetrievalConfig(kind="bm25")
    root = str(tmp_path / "cache")
    d = shard_module.ensure_sharded_index(corpus, "bm25", 2, cfg, show_progress=False, root=root)
    before = os.stat(d).st_ino
    real, missed = shard_module.read_manifest, []

    def read_before_the_winner_published(index_dir, *a):
        if index_dir == d and not missed:
            missed.append(index_dir)
            raise IndexNotFoundError("not there yet")
        return real(index_dir, *a)

    monkeypatch.setattr(shard_module, "read_manifest", read_before_the_winner_published)
    assert shard_module.ensure_sharded_index(corpus, "bm25", 2, cfg, show_progress=False, root=root) == d
    assert missed and os.stat(d).st_ino == before
    monkeypatch.undo()
    m = json.load(open(os.path.join(d, "manifest.json")))
    m["sharded_from"]["created"] = "an older whole index"
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    assert shard_module.ensure_sharded_index(corpus, "bm25", 2, cfg, show_progress=False, root=root) == d
    assert os.stat(d).st_ino != before  # the stale split was replaced
