"""`ralmspec info`: versions, devices and the cache, read without loading a model."""

from __future__ import annotations

import importlib.metadata
import json

from ralmspec.cli import main


def _home(tmp_path):
    """A $RALMSPEC_HOME holding what fetches and builds leave: a fetched model (manifest), a
    built-in's folder, an unfinished staging folder, a built index and a folder without manifest."""
    home = tmp_path / "home"
    fetched = home / "models" / "smollm2-abc"
    fetched.mkdir(parents=True)
    (fetched / "ralmspec-model.json").write_text(json.dumps({"source": {"name": "smollm2"}}))
    (fetched / "model.safetensors").write_bytes(b"x" * 3000)
    builtin = home / "models" / "tiny-123"
    builtin.mkdir()
    (builtin / "config.json").write_text("{}")
    (builtin / "model.safetensors").write_bytes(b"x" * 10)
    (home / "models" / ".tiny-tmp9").mkdir()
    index = home / "indexes" / "bm25-feed"
    index.mkdir(parents=True)
    (index / "manifest.json").write_text(json.dumps({"kind": "bm25", "n": 7, "corpus_source": "/data/p.jsonl",
                                                     "files": ["passages.jsonl.gz"]}))
    (index / "passages.jsonl.gz").write_bytes(b"y" * 500)
    (home / "indexes" / "exact-half").mkdir()
    torn = home / "indexes" / "exact-torn"  # a manifest whose files are not all there: the engine rebuilds it
    torn.mkdir()
    (torn / "manifest.json").write_text(json.dumps({"kind": "exact", "n": 7, "files": ["index.faiss"]}))
    return home


def test_info_lists_versions_devices_and_the_cache(tmp_path, monkeypatch, capsys):
    home = _home(tmp_path)
    monkeypatch.setenv("RALMSPEC_HOME", str(home))
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"] == importlib.metadata.version("torch")
    assert info["packages"]["vllm"] is None or isinstance(info["packages"]["vllm"], str)
    dev = info["devices"]
    assert dev["cpu_cores"] >= 1 and dev["torch_threads"] >= 1 and isinstance(dev["cuda_gpus"], list)
    assert info["home"] == {"path": str(home), "from": "RALMSPEC_HOME", "models_dir": str(home / "models")}
    models = {m["folder"].rsplit("/", 1)[1]: m for m in info["cached"]["models"]}
    assert models["smollm2-abc"]["complete"] and models["smollm2-abc"]["model"] == "smollm2"
    assert models["smollm2-abc"]["bytes"] == 3000 + len(json.dumps({"source": {"name": "smollm2"}}))
    assert models["tiny-123"]["complete"] and models["tiny-123"]["model"] == "tiny"
    assert not models[".tiny-tmp9"]["complete"]
    indexes = {i["folder"].rsplit("/", 1)[1]: i for i in info["cached"]["indexes"]}
    assert indexes["bm25-feed"]["complete"] and indexes["bm25-feed"]["passages"] == 7
    assert not indexes["exact-half"]["complete"] and not indexes["exact-torn"]["complete"]

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "bm25, 7 passages, /data/p.jsonl" in text and "$RALMSPEC_HOME" in text
    assert text.count("(unfinished: delete it)") == 3


def test_info_on_an_empty_cache_says_what_first_use_does(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RALMSPEC_HOME", str(tmp_path / "nothing-yet"))
    assert main(["info"]) == 0
    assert "fetched and the default index built on first use" in capsys.readouterr().out


def test_a_containers_cpu_limit_is_read_and_an_oversubscribed_pool_is_pointed_out(tmp_path):
    """torch sizes its pool by the cores it sees, not by a container's CPU limit: info reads the
    limit (cgroup v2 cpu.max, v1 cfs quota / period) and says when the pool exceeds it."""
    from ralmspec.info import collect_info, cpu_quota, format_info

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(str(v2)) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(str(v2)) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(str(tmp_path / "v1")) == 2.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(str(tmp_path / "v1")) is None and cpu_quota(str(tmp_path / "none")) is None

    info = collect_info()
    info["devices"].update(cpu_quota=1.5, torch_threads=16)
    text = format_info(info)
    assert "CPU limit (cgroup)     1.5 CPUs" in text and "torch uses 16 threads under a limit of 1.5 CPUs: pass --threads 1" in text
    info["devices"].update(cpu_quota=None)
    assert "none" in format_info(info) and "oversubscribed" not in format_info(info)
