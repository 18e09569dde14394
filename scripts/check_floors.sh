#!/usr/bin/env bash
# Are the version floors of pyproject.toml true? Installs the project with each CHECKED dependency
# at the lowest version pyproject.toml allows (`name>=X` pinned to X) in a venv of its own, then
# runs the suites that exercise them, the SmolLM2 GGUF converted afresh. Run it from the repository
# root after changing a dependency or a floor (~4.5 minutes on the 2-core machine, network needed):
#
#   bash scripts/check_floors.sh [VENV_DIR]          (default: /tmp/ralmspec-floors)
#
# On 2026-12-07 the declared floors transformers>=4.46, bm25s>=0.2, gguf>=0.10 and
# sentence-transformers>=3.0 were all false (docs in pyproject.toml); this is how they were found.
# The others (tqdm, accelerate, safetensors, threadpoolctl, matplotlib) are not pinned here:
# transformers and accelerate already require more than some of their floors.
set -euo pipefail

CHECKED="numpy aiohttp transformers sentence-transformers gguf faiss-cpu bm25s"
VENV="${1:-/tmp/ralmspec-floors}"
if [[ ! -f pyproject.toml || ! -d ralmspec ]]; then
    echo "check_floors.sh: run me from the ralmspec repository root" >&2
    exit 2
fi
start=$(date +%s)
rm -rf "$VENV" && python3 -m venv "$VENV"
CONSTRAINTS="$VENV/floors.txt"
# shellcheck disable=SC2086 - one argument per name
python3 scripts/floor_constraints.py $CHECKED > "$CONSTRAINTS"
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
RALMSPEC_HOME="$(mktemp -d)" RALMSPEC_REQUIRE_SMOLLM2=1 python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider \
    tests/lm/test_pretrained.py tests/lm/test_static_runner.py tests/lm/test_hf_contract.py \
    tests/retrieval tests/speculation tests/engine/test_equivalence.py \
    tests/serving/test_completions.py tests/serving/test_remote.py tests/knnlm/test_knnlm_datastore.py
echo "check_floors.sh: every checked floor holds ($(( $(date +%s) - start ))s)"
