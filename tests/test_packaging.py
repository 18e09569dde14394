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

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

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


# --- the distributions themselves, built (not just the configuration above) -----------------------

def _source_files() -> list[str] | None:
    """The checkout's files as a user's copy has them (tracked, plus untracked ones git does not
    ignore: a file not yet committed counts), or None outside a git checkout."""
    try:
        done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                              cwd=REPO, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [f for f in done.stdout.decode("utf-8").split("\0") if f and (REPO / f).is_file()]


_BUILD = r"""
import json, os, sys, tarfile
from setuptools import build_meta as hooks
src, out = sys.argv[1], sys.argv[2]
os.chdir(src)
sdist = hooks.build_sdist(os.path.join(out, "sdist"))
wheel = hooks.build_wheel(os.path.join(out, "wheel"))
# the wheel that `pip install ralmspec-*.tar.gz` builds: from the unpacked sdist
with tarfile.open(os.path.join(out, "sdist", sdist)) as tar:
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
    tar.extractall(os.path.join(out, "unpacked"), **safe)
os.chdir(os.path.join(out, "unpacked", sdist[: -len(".tar.gz")]))
from_sdist = hooks.build_wheel(os.path.join(out, "wheel-from-sdist"))
print(json.dumps([sdist, wheel, from_sdist]))
"""


def test_the_wheel_and_the_sdist_hold_the_whole_package_and_no_stray_files(tmp_path):
    """Builds the sdist and the wheel from a copy of the checkout (so no ``build/`` or
    ``*.egg-info`` is written into it, and none left there can leak into the wheel), and the wheel
    again from the unpacked sdist, as ``pip install ralmspec-*.tar.gz`` does; offline, with the
    setuptools this environment has (``--no-build-isolation``'s way). Every file of ``ralmspec/``,
    the embedded data and its licence README included, must be in all three: a data file the
    package-data patterns miss is absent only from a non-editable install (an editable one reads
    the checkout). The sdist must hold the package and its build files only (no partial tests/)."""
    setuptools = pytest.importorskip("setuptools", reason="the build backend (setuptools) is not installed")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build this project (pyproject.toml)")
    files = _source_files()
    if files is None:
        pytest.skip("not a git checkout: the list of the checkout's files is unknown")

    src = tmp_path / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _BUILD, str(src), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    sdist, wheel, from_sdist = json.loads(done.stdout.strip().splitlines()[-1])

    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    dist_info = f"ralmspec-{version}.dist-info"
    package = {f for f in files if f.startswith("ralmspec/")}
    data = {f for f in package if f.startswith("ralmspec/data/embedded/")}
    assert "ralmspec/data/embedded/README.md" in data and "ralmspec/data/embedded/passages.jsonl.gz" in data

    for name, folder in ((wheel, "wheel"), (from_sdist, "wheel-from-sdist")):
        with zipfile.ZipFile(out / folder / name) as z:
            names = {n for n in z.namelist() if not n.endswith("/")}
        in_package = {n for n in names if n.startswith("ralmspec/")}
        assert not package - in_package, f"{folder}: missing {sorted(package - in_package)}"
        assert not in_package - package, f"{folder}: files the checkout does not have {sorted(in_package - package)}"
        others = {n.split("/")[0] for n in names - in_package}
        assert others == {dist_info}, f"{folder}: other top-level entries {sorted(others)}"
        assert f"{dist_info}/licenses/LICENSE" in names

    with tarfile.open(out / "sdist" / sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    in_package = {m for m in members if m.startswith("ralmspec/")}
    assert not package - in_package, f"sdist: missing {sorted(package - in_package)}"
    assert not in_package - package, f"sdist: files the checkout does not have {sorted(in_package - package)}"
    build_files = {"PKG-INFO", "setup.cfg", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"}
    stray = {m for m in members - in_package if m not in build_files and not m.startswith("ralmspec.egg-info/")}
    assert not stray, f"sdist: files beyond the package and its build files {sorted(stray)}"


def test_python_m_ralmspec_is_the_ralmspec_command():
    """``python -m ralmspec`` (no scripts folder on the PATH, a venv's python called directly) runs
    the console script's ``ralmspec.cli:main``, its exit status passed through: it was "No module
    named ralmspec.__main__", status 1."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts == {"ralmspec": "ralmspec.cli:main"}
    import ralmspec

    run = subprocess.run([sys.executable, "-m", "ralmspec", "--version"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout == f"ralmspec {ralmspec.__version__}\n", run
    run = subprocess.run([sys.executable, "-m", "ralmspec", "bench", "--n", "0"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stderr == "error: --n must be >= 1\n", run
