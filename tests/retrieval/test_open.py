"""``retrieval.open``: the one place a knowledge base is opened (manifest dispatch, shards, the
EMULATED pad, the query encoder), on real indexes of every kind, and its typed errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ralmspec.cluster import RayShardConfig, ray_available
from ralmspec.config import RetrievalConfig
from ralmspec.errors import ConfigError, IndexNotFoundError
from ralmspec.retrieval.emulated import PaddedCostRetriever, emulated_label
from ralmspec.retrieval.encoder import encoder_device
from ralmspec.retrieval.index import load_retriever
from ralmspec.retrieval.open import open_index, open_knowledge_base
from ralmspec.retrieval.shard_index import shard_index
from ralmspec.retrieval.sharded import ShardedRetriever
from tests.retrieval.conftest import KINDS, kb_config

PAD = 700  # synthetic vectors of the EMULATED tests (any size > k works; small keeps them fast)


@pytest.fixture(scope="module")
def split2(kb_index_dirs, tmp_path_factory):
    """kind -> a 2-shard copy of the session's small index of that kind."""
    root = tmp_path_factory.mktemp("open-sharded")
    return {kind: shard_index(kb_index_dirs[kind], str(root / kind), 2) for kind in KINDS}


def _copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


def _edit_manifest(index_dir: str, **changes) -> None:
    path = os.path.join(index_dir, "manifest.json")
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    m.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(m, f)


@pytest.mark.parametrize("kind", KINDS)
def test_the_manifest_decides_whole_or_sharded(kind, kb_index_dirs, split2, kb_retrievers, kb_queries, encoder):
    whole = open_index(kb_index_dirs[kind], kb_config(kind), encoder)
    sharded = open_index(split2[kind], kb_config(kind), encoder)
    assert not isinstance(whole, ShardedRetriever) and type(whole) is type(kb_retrievers[kind])
    assert isinstance(sharded, ShardedRetriever) and sharded.n_shards == 2
    assert whole.index_dir == kb_index_dirs[kind] and sharded.index_dir == split2[kind]
    want = kb_retrievers[kind].search_sync(kb_queries, 5)
    assert whole.search_sync(kb_queries, 5) == want
    if kind != "hnsw":  # exact, ivf and bm25 shards answer as the whole index (hnsw: one graph per shard)
        assert sharded.search_sync(kb_queries, 5) == want
    # the same folders through the knowledge-base opener (config.index_dir), shards counted
    kb = open_knowledge_base(kb_config(kind, index_dir=split2[kind]), encoder=encoder, shards=2)
    assert isinstance(kb, ShardedRetriever) and kb.search_sync(kb_queries[:4], 3) == sharded.search_sync(kb_queries[:4], 3)
    if kind != "bm25":
        assert kb.encoder is encoder  # the encoder given (or decided) once reaches the caller-side codec


def test_the_emulated_pad_is_applied_before_anyone_uses_the_retriever(kb_index_dirs, kb_retrievers, kb_queries,
                                                                      encoder):
    kb = open_knowledge_base(kb_config("exact", index_dir=kb_index_dirs["exact"], emulate_pad=PAD), encoder=encoder,
                             show_progress=False)
    assert isinstance(kb, PaddedCostRetriever) and kb.pad == PAD
    assert kb.label == emulated_label(len(kb.corpus), PAD) and kb.label.startswith("EMULATED")
    assert kb.search_sync(kb_queries, 5) == kb_retrievers["exact"].search_sync(kb_queries, 5)  # real answers
    assert kb.pad_searches == 1 and kb.pad_queries == len(kb_queries)  # and the padded scan really ran
    plain = open_knowledge_base(kb_config("exact", index_dir=kb_index_dirs["exact"]), encoder=encoder)
    assert not isinstance(plain, PaddedCostRetriever)


def test_the_encoder_device_is_decided_from_the_config():
    assert encoder_device(RetrievalConfig()) == "cpu"
    assert encoder_device(RetrievalConfig(encoder_device="cuda")) == "cuda"  # explicit: as given
    assert encoder_device(RetrievalConfig(encoder_device="cpu", device="cuda")) == "cpu"


def test_bad_folders_and_manifests_are_typed_errors(kb_index_dirs, split2, tmp_path, encoder):
    cfg = kb_config("exact")
    with pytest.raises(IndexNotFoundError, match="does not exist; build it with: ralmspec index build"):
        open_index(str(tmp_path / "nowhere"), cfg, encoder)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(IndexNotFoundError, match="has no manifest.json"):
        open_index(str(tmp_path / "empty"), cfg, encoder)
    garbled = _copy(kb_index_dirs["exact"], tmp_path / "garbled")
    with open(os.path.join(garbled, "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(IndexNotFoundError, match="unreadable"):
        open_index(garbled, cfg, encoder)
    no_kind = _copy(kb_index_dirs["exact"], tmp_path / "no-kind")
    with open(os.path.join(no_kind, "manifest.json"), "w") as f:
        json.dump({"files": []}, f)
    with pytest.raises(IndexNotFoundError, match="unreadable"):
        open_index(no_kind, cfg, encoder)
    missing = _copy(kb_index_dirs["exact"], tmp_path / "missing")
    os.remove(os.path.join(missing, "index.faiss"))
    with pytest.raises(IndexNotFoundError, match="incomplete \\(missing index.faiss\\)"):
        open_index(missing, cfg, encoder)
    with pytest.raises(ConfigError, match="is a 'bm25' index but the retriever is 'exact'"):
        open_index(kb_index_dirs["bm25"], cfg, encoder)
    with pytest.raises(ConfigError, match="sharded 'bm25' index but the retriever is 'exact'"):
        open_index(split2["bm25"], cfg, encoder)
    bad_ranges = _copy(split2["exact"], tmp_path / "bad-ranges")
    _edit_manifest(bad_ranges, shards=[{"dir": "shard-000", "start": 0, "stop": 5},
                                       {"dir": "shard-001", "start": 7, "stop": 160}])
    with pytest.raises(ConfigError):
        open_index(bad_ranges, cfg, encoder)
    broken_shard = _copy(split2["exact"], tmp_path / "broken-shard")
    os.remove(os.path.join(broken_shard, "shard-001", "shard.json"))
    with pytest.raises(IndexNotFoundError, match="re-shard the index"):
        open_index(broken_shard, cfg, encoder)
    with pytest.raises(ConfigError, match="open it with ralmspec.retrieval.open.open_index"):
        load_retriever(split2["exact"], cfg, encoder)  # the whole-index loader refuses a sharded folder


def test_bad_requests_are_typed_errors_and_nothing_is_left_open(kb_index_dirs, split2, encoder):
    with pytest.raises(ConfigError, match="--shards 3 but the index"):
        open_knowledge_base(kb_config("exact", index_dir=split2["exact"]), encoder=encoder, shards=3)
    with pytest.raises(ConfigError, match="has no shards"):
        open_knowledge_base(kb_config("exact", index_dir=kb_index_dirs["exact"]), encoder=encoder, shards=2)
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=r"\(--shards\) must be an integer >= 1"):
            open_knowledge_base(kb_config("exact", index_dir=split2["exact"]), encoder=encoder, shards=bad)
    with pytest.raises(ConfigError, match="not a sharded index searched in this process"):
        open_knowledge_base(kb_config("exact", index_dir=split2["exact"], emulate_pad=PAD), encoder=encoder)
    with pytest.raises(ConfigError, match="--retriever exact"):
        kb_config("hnsw", emulate_pad=PAD)  # the config itself refuses a pad of an approximate index
    with pytest.raises(ConfigError, match=r"\(--emulate-pad\) must be an integer >= 0"):
        kb_config("exact", emulate_pad=-1)


@pytest.mark.skipif(not ray_available(), reason='ray is not installed (pip install -e ".[ray]")')
def test_ray_shards_split_the_emulated_pad(ray_cluster, split2, kb_retrievers, kb_queries, encoder):
    cfg = kb_config("exact", index_dir=split2["exact"], emulate_pad=PAD + 1)
    kb = open_knowledge_base(cfg, encoder=encoder, ray=RayShardConfig(), shards=2)
    try:
        assert kb.n_shards == 2 and kb.encoder is encoder
        assert kb.search_sync(kb_queries, 5) == kb_retrievers["exact"].search_sync(kb_queries, 5)
        assert [info["pad"] for info in kb.backend.infos] == [PAD // 2 + 1, PAD // 2]  # built in the actors
    finally:
        kb.close()
    with pytest.raises(ConfigError, match=r"\(--shards N\) is needed"):
        open_knowledge_base(kb_config("exact"), encoder=encoder, ray=RayShardConfig())
