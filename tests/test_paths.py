"""ralmspec/paths.py: the output-path check every command runs before its work."""

from __future__ import annotations

import pytest

from ralmspec.errors import ConfigError
from ralmspec.paths import check_output_path


def test_output_paths_that_cannot_be_written_are_refused_by_flag(tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    check_output_path(tmp_path / "new" / "deeper" / "out.json", "--json")  # folders are made later
    check_output_path(a_file, "--json")  # an existing file is replaced
    check_output_path(tmp_path, "--out", folder=True)
    check_output_path(tmp_path / "new" / "dir", "--out", folder=True)
    for path, folder, says in ((tmp_path, False, "--json .*is a folder"),
                               (a_file, True, "--out .*exists and is not a folder"),
                               (a_file / "out.json", False, "is a file, not a folder"),
                               (a_file / "sub" / "dir", True, "is a file, not a folder"),
                               ("", False, "the path is empty")):
        with pytest.raises(ConfigError, match=says):
            check_output_path(path, "--out" if folder else "--json", folder=folder)
