#!/usr/bin/env python3
"""pyproject.toml's dependency sets, read in one place (scripts/check_floors.sh and
scripts/install_vllm_cpu.sh call it; tests/test_packaging.py runs it).

A set is ``[project] dependencies`` plus the named extras, an extra's ``ralmspec[other]`` entries
followed (``cpu`` and ``gpu`` are each ``ralmspec[ml]`` plus a FAISS build).

    python3 scripts/pyproject_deps.py requirements cpu dev [--without torch,ray]   # one per line
    python3 scripts/pyproject_deps.py floors                  # name==X for each name>=X of cpu + dev
    python3 scripts/pyproject_deps.py floors numpy torch      # these only; exit 1 naming any unfloored

``floors`` are the constraints of ``scripts/check_floors.sh``: the CI install (``.[cpu,dev]``)
with every dependency written ``name>=X`` pinned to X.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
CI_EXTRAS = ("cpu", "dev")  # .ci/run installs .[cpu,dev]
NAME = r"\s*([A-Za-z0-9_.\-]+)"  # a requirement's distribution name


def _name(req: str) -> str:
    return re.match(NAME, req).group(1).lower()


def requirements(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    """The requirement strings of ``dependencies`` + ``extras``, self-references followed, each once."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    own, table = project["name"].lower(), project["optional-dependencies"]
    out: list[str] = []

    def add(reqs: list[str]) -> None:
        for req in reqs:
            m = re.fullmatch(NAME + r"\[([^\]]+)\]\s*", req)
            if m and m.group(1).lower() == own:
                for extra in m.group(2).split(","):
                    add(table[extra.strip()])
            elif req not in out:
                out.append(req)

    add(project["dependencies"])
    for extra in extras:
        if extra not in table:
            raise SystemExit(f"pyproject_deps.py: no extra {extra!r} (extras: {', '.join(table)})")
        add(table[extra])
    return out


def floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """Lower-cased name -> X for every requirement of the CI install written ``name>=X``."""
    out = {}
    for req in requirements(list(CI_EXTRAS), pyproject):
        m = re.fullmatch(NAME + r"\s*>=\s*([0-9][^,;\s]*)\s*", req)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("requirements", help="the requirements of dependencies + these extras")
    r.add_argument("extras", nargs="*")
    r.add_argument("--without", default="", help="comma-separated names to leave out")
    f = sub.add_parser("floors", help="name==X for the name>=X requirements of the CI install")
    f.add_argument("names", nargs="*", help="only these (default: every one)")
    a = ap.parse_args(argv)
    if a.cmd == "requirements":
        drop = {n.strip().lower() for n in a.without.split(",") if n.strip()}
        print("\n".join(req for req in requirements(a.extras) if _name(req) not in drop))
        return 0
    found = floors()
    names = a.names or list(found)
    missing = [n for n in names if n.lower() not in found]
    if missing:
        print(f"pyproject_deps.py: no `name>=X` floor in pyproject.toml for {missing}", file=sys.stderr)
        return 1
    for name in names:
        print(f"{name}=={found[name.lower()]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
