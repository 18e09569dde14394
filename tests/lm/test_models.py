"""Offline model resolution: built-in random GPT-2s, the BERT tokenizer, HF folders, errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ralmspec.errors import ConfigError, ModelLoadError
from ralmspec.lm.models import BUILTIN_MODELS, build_builtin, builtin_names, load_lm, save_builtin
from tests.lm.conftest import random_tokens


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    return save_builtin("tiny", tmp_path_factory.mktemp("models") / "tiny")


def test_builtin_shapes():
    assert set(builtin_names()) == {"tiny", "random-small", "random-medium"}
    assert (BUILTIN_MODELS["random-small"].n_layer, BUILTIN_MODELS["random-small"].n_embd, BUILTIN_MODELS["random-small"].n_head) == (12, 768, 12)
    assert (BUILTIN_MODELS["random-medium"].n_layer, BUILTIN_MODELS["random-medium"].n_embd, BUILTIN_MODELS["random-medium"].n_head) == (24, 1024, 16)


def test_tiny_model_config_and_tokenizer(tiny):
    cfg = tiny.model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (2, 128, 4, 1024, 30522)
    assert not tiny.model.training
    assert tiny.model.lm_head.weight.data_ptr() == tiny.model.transformer.wte.weight.data_ptr()  # tied
    ids = tiny.tokenizer.encode("Hello world, this is Paris")
    assert ids and 101 not in ids and 102 not in ids  # no [CLS]/[SEP]
    assert tiny.tokenizer.decode(ids) == "hello world, this is paris"
    assert tiny.tokenizer.decode([101] + ids[:2] + [102, 0]) == "hello world"  # specials skipped
    long_ids = tiny.tokenizer.encode("word " * 2000)
    assert len(long_ids) == 2000  # never truncated
    with pytest.raises(ConfigError):
        tiny.tokenizer.encode(None)


def test_builtin_init_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    m1, _ = build_builtin("tiny")
    m2, _ = build_builtin("tiny")
    assert torch.equal(torch.get_rng_state(), state)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_random_model_greedy_text_is_not_one_repeated_token(tiny):
    for text in ("who wrote the origin of species?", "paris is the capital of france"):
        out = tiny.greedy([tiny.tokenizer.encode(text)], 48)[0]
        assert len(out) == 48
        assert len(set(out)) >= 10, tiny.tokenizer.decode(out)


def test_save_builtin_round_trip(saved_tiny, tiny):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (saved_tiny / name).is_file(), name
    cfg = json.loads((saved_tiny / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["eos_token_id"] == 102 and cfg["vocab_size"] == 30522
    lm = load_lm(str(saved_tiny))
    assert (lm.eos_token_id, lm.max_context, lm.vocab_size) == (102, 1024, 30522)
    a, b = lm.model.state_dict(), tiny.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    rng = random.Random(21)
    prompts = [random_tokens(rng, n) for n in (9, 40, 200)]
    assert lm.greedy(prompts, 10) == tiny.greedy(prompts, 10)
    text = "the origin of species was written by charles darwin"
    assert lm.tokenizer.encode(text) == tiny.tokenizer.encode(text)
    assert lm.tokenizer.decode(lm.tokenizer.encode(text)) == text


def test_load_options(saved_tiny):
    lm = load_lm(str(saved_tiny), block_size=4, max_context=128, max_sessions=3)
    assert (lm.block_size, lm.max_context, lm.max_sessions) == (4, 128, 3)
    with pytest.raises(ConfigError, match="max_context"):
        load_lm(str(saved_tiny), max_context=5000)
    with pytest.raises(ConfigError, match="block_size"):
        load_lm(str(saved_tiny), block_size=0)


@pytest.mark.parametrize("device, dtype, match", [
    ("cpu", "float64", "dtype"),
    ("cpu", "float16", "only supported on cuda"),
    ("tpu", "float32", "device"),
])
def test_bad_device_or_dtype(device, dtype, match):
    with pytest.raises(ConfigError, match=match):
        load_lm("tiny", device=device, dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_lm("tiny", device="cuda")


def test_model_load_errors(tmp_path, saved_tiny):
    with pytest.raises(ModelLoadError, match=r"neither a model name \(smollm2, tiny"):
        load_lm(str(tmp_path / "nope"))
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_lm(str(f))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_lm(str(empty))
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config"):
        load_lm(str(garbage))
    vision = tmp_path / "vision"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(ModelLoadError, match="not a causal LM"):
        load_lm(str(vision))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((saved_tiny / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="weights"):
        load_lm(str(no_weights))
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((saved_tiny / name).read_bytes())
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_lm(str(no_tok))
    with pytest.raises(ModelLoadError):
        load_lm("")


FLAGS = "processor\t: 0\nflags\t\t: fpu sse sse2 avx2 avx512f {}\n"


@pytest.mark.parametrize("extra, native", [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512vl", False)])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(tmp_path, monkeypatch, extra, native):
    """``--lm-dtype auto``: bfloat16 on CUDA; on the CPU only with bfloat16 instructions and
    the hf backend (vLLM keeps float32); an explicit dtype is never changed."""
    from ralmspec.lm import loader

    info = tmp_path / "cpuinfo"
    info.write_text(FLAGS.format(extra))
    assert loader.cpu_has_native_bf16(str(info)) is native
    assert loader.cpu_has_native_bf16(str(tmp_path / "missing")) is False
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native)
    assert loader.resolve_lm_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert loader.resolve_lm_dtype("auto", "cpu", backend="vllm") == "float32"
    assert loader.resolve_lm_dtype("auto", "cuda:0") == "bfloat16"
    assert loader.resolve_lm_dtype("float32", "cpu") == "float32"
    with pytest.raises(ConfigError, match="LM dtype"):
        loader.resolve_lm_dtype("int8", "cpu")
    lm = loader.load_language_model("tiny", dtype="auto")
    assert lm.dtype == (torch.bfloat16 if native else torch.float32)


def test_loading_a_model_leaves_the_host_hub_settings_alone():
    """A host program that loads a model through ralmspec keeps its own Hugging Face hub access:
    ralmspec set HF_HUB_OFFLINE=1 in os.environ when ralmspec.lm.models was imported, which
    turned the hub off for the rest of the process (a later hf_hub_download / from_pretrained
    of the host's own model failed) and for every child it started. Every load reads a local
    folder (local_files_only), so the hub is never contacted: checked with the network blocked."""
    from tests.host_process import run_as_host

    out = run_as_host("""
        from ralmspec.lm.loader import load_language_model
        load_language_model("tiny")
    """)
    assert out == {"env": {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None}, "network": [],
                   "hub_offline": False}
