#!/usr/bin/env bash
# Are the version floors of pyproject.toml true? Installs the project with EVERY `name>=X`
# dependency of the CI install (`.[cpu,dev]`: scripts/pyproject_deps.py floors)
# pinned to X, in a venv of its own, then runs the README's test command there (the whole suite,
# the SmolLM2 GGUF converted afresh). Run it from the repository root after changing a dependency
# or a floor (~10 minutes on the 2-core machine, network needed: 588 s on 2026-12-07):
#
#   bash scripts/check_floors.sh [VENV_DIR]          (default: /tmp/ralmspec-floors)
#
# On 2026-12-07 nine declared floors were false (pyproject.toml says why): transformers>=4.46,
# sentence-transformers>=3.0, bm25s>=0.2, gguf>=0.10, safetensors>=0.4, accelerate>=1.0,
# aiohttp>=3.9, pytest-asyncio>=0.23 and openai>=1.40; this is how they were found.
set -euo pipefail

VENV="${1:-/tmp/ralmspec-floors}"
if [[ ! -f pyproject.toml || ! -d ralmspec ]]; then
    echo "check_floors.sh: run me from the ralmspec repository root" >&2
    exit 2
fi
start=$(date +%s)
rm -rf "$VENV" && python3 -m venv "$VENV"
CONSTRAINTS="$VENV/floors.txt"
python3 scripts/pyproject_deps.py floors > "$CONSTRAINTS"
echo "floors: $(tr '\n' ' ' < "$CONSTRAINTS")"
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -c "$CONSTRAINTS" -e ".[cpu,dev]"
python - "$CONSTRAINTS" <<'EOF'
import sys
from importlib.metadata import version
from packaging.version import Version

for line in open(sys.argv[1]):
    name, want = line.strip().split("==")
    got = version(name)
    if Version(got) != Version(want):
        sys.exit(f"check_floors.sh: {name} {got} installed, not its floor {want}")
    print(f"  {name} {got}")
EOF
echo "install took $(( $(date +%s) - start ))s"
RALMSPEC_HOME="$(mktemp -d)" RALMSPEC_REQUIRE_SMOLLM2=1 python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider -ra
echo "check_floors.sh: every checked floor holds ($(( $(date +%s) - start ))s)"
