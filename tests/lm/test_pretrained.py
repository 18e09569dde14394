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
