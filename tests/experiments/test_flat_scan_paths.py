"""experiments/flat_scan_paths.py: the per-batch-size timing table of the flat scan's paths."""

from __future__ import annotations

import pytest

from experiments import flat_scan_paths


def test_prints_one_row_per_batch_size(capsys):
    assert flat_scan_paths.main(["--n", "3000", "--dim", "16", "--k", "5", "--batches", "1,3", "--reps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| queries | faiss ms | gemm ms | blocked ms")
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["1", "3"]


def test_refuses_bad_sizes():
    with pytest.raises(SystemExit) as e:
        flat_scan_paths.main(["--batches", "0,2"])
    assert e.value.code == 2
