"""What `pip install .` puts in site-packages: the `ralmspec` package, all of it, and nothing else.

Until 2026-12-07 the wheel also installed two top-level packages named `serving` (the HTTP server)
and `experiments` (the study scripts): generic names that shadow, or are overwritten by, any other
distribution's package of the same name. The server now lives in `ralmspec/serving/`; `experiments/`
and `tests/` run from a checkout. setuptools finds a subpackage only by its `__init__.py`, so a
folder of modules without one would be left out of the wheel (an editable install still imports
it, which is how such a slip goes unseen).

Also the dependency sets (read by ``scripts/pyproject_deps.py``): every floor is the floor check's,
and ``cpu`` / ``gpu`` never put two FAISS builds in one install.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _setuptools_config() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_only_the_ralmspec_package_is_installed():
    assert _setuptools_config()["packages"]["find"]["include"] == ["ralmspec*"]
    # the code that `ralmspec` runs, the server included, is inside the package
    assert (REPO / "ralmspec" / "serving" / "app.py").is_file()
    assert not (REPO / "serving").exists()


def test_every_folder_of_modules_in_the_package_is_a_package():
    folders = {p.parent for p in (REPO / "ralmspec").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(d.relative_to(REPO)) for d in folders if not (d / "__init__.py").is_file())
    assert not missing, f"left out of the wheel (no __init__.py): {missing}"


def test_the_embedded_data_ships_as_package_data():
    patterns = _setuptools_config()["package-data"]["ralmspec.data"]
    embedded = REPO / "ralmspec" / "data" / "embedded"
    files = sorted(p.name for p in embedded.iterdir() if p.is_file())
    assert files and patterns == ["embedded/*"]  # every file of the folder, whatever its name
    assert not [p for p in embedded.iterdir() if p.is_dir()], "embedded/* does not take subfolders"


def deps(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "pyproject_deps.py"), *args],
                          capture_output=True, text=True)


def test_the_floor_check_pins_every_declared_floor():
    """``scripts/check_floors.sh`` pins every ``name>=X`` dependency the CI install takes
    (``[project] dependencies`` and the ``cpu`` and ``dev`` extras, ``cpu``'s ``ralmspec[ml]``
    followed) at X (``pyproject_deps.py floors``); a name without a floor is refused."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    reqs = project["dependencies"] + extras["ml"] + extras["cpu"] + extras["dev"]
    floored = {m.group(1): m.group(2) for m in (re.fullmatch(r"([\w.\-]+)>=(\S+)", r.replace(" ", "")) for r in reqs) if m}
    done = deps("floors")
    assert done.returncode == 0, done.stderr
    assert dict(line.split("==") for line in done.stdout.splitlines()) == floored and len(floored) >= 10
    assert "faiss-cpu" in floored and "transformers" in floored and "pytest" in floored
    assert deps("floors", "numpy", "transformers").stdout.splitlines() == [
        f"numpy=={floored['numpy']}", f"transformers=={floored['transformers']}"]
    refused = deps("floors", "numpy", "torch")  # torch is pinned with ==, not floored
    assert refused.returncode == 1 and "['torch']" in refused.stderr
    assert "pyproject_deps.py floors > " in (REPO / "scripts" / "check_floors.sh").read_text(encoding="utf-8")


def test_cpu_and_gpu_each_take_the_ml_stack_and_one_faiss_build():
    """``cpu`` and ``gpu`` are the same ``ml`` stack with different FAISS builds: faiss-cpu and
    faiss-gpu-cu12 install the same ``faiss`` package, so no install set may hold both."""
    def names(*extras: str) -> list[str]:
        done = deps("requirements", *extras)
        assert done.returncode == 0, done.stderr
        return [re.match(r"[\w.\-]+", line).group(0) for line in done.stdout.splitlines()]

    cpu, gpu, ml = names("cpu"), names("gpu"), names("ml")
    assert "torch" in ml and "transformers" in ml and not [n for n in ml if n.startswith("faiss")]
    assert set(cpu) - set(ml) == {"faiss-cpu"} and set(gpu) - set(ml) == {"faiss-gpu-cu12", "vllm"}
    assert not [n for n in names("cpu", "dev") if n.startswith("ralmspec")]  # self-references followed
    left_out = deps("requirements", "cpu", "dev", "--without", "torch,transformers,ray")
    assert not {"torch", "transformers", "ray"} & {re.match(r"[\w.\-]+", x).group(0)
                                                  for x in left_out.stdout.splitlines()}
    assert "pyproject_deps.py requirements cpu dev --without torch,transformers" in (
        REPO / "scripts" / "install_vllm_cpu.sh").read_text(encoding="utf-8")