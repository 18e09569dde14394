#!/usr/bin/env python3
"""Print ``name==X`` for each dependency whose pyproject.toml requirement is ``name>=X``
(``[project] dependencies`` and the ``cpu`` and ``dev`` extras, the set `.ci/run` installs): the
constraints of ``scripts/check_floors.sh``.

    python3 scripts/floor_constraints.py > floors.txt                   # every floor
    python3 scripts/floor_constraints.py numpy transformers > floors.txt  # these only

Exit status 1, naming them, when a named dependency declares no such floor.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """Lower-cased dependency name -> X, for every requirement written ``name>=X``."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    out = {}
    extras = project["optional-dependencies"]
    for req in project["dependencies"] + extras["cpu"] + extras["dev"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*", req)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def main(names: list[str]) -> int:
    found = floors()
    names = names or list(found)
    missing = [n for n in names if n.lower() not in found]
    if missing:
        print(f"floor_constraints.py: no `name>=X` floor in pyproject.toml for {missing}", file=sys.stderr)
        return 1
    for name in names:
        print(f"{name}=={found[name.lower()]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
