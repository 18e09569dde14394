"""experiments/step_ops.py: it counts a step's ops, and today's SmolLM2 step dispatches fewer
than session 12's with the same logits bit for bit (the CPU: one F.rms_norm per norm, queries
and keys rotated together by a roll; ralmspec/lm/static.py)."""

from __future__ import annotations

import json

from experiments import step_ops


def test_counts_the_ops_of_a_tiny_step(tmp_path):
    out = tmp_path / "ops.json"
    assert step_ops.main(["--model", "tiny", "--dtype", "float32", "--position", "70", "--steps", "2",
                          "--timed", "2", "--warmup", "1", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["cuda_kernels_per_step"] is None and got["cuda_kernels_by_name"] == {}
    assert got["step_ms_uncaptured"] > 0
    assert got["ops_per_step"] == sum(got["ops_by_name"].values()) > 10
    assert "aten::scaled_dot_product_attention" in got["ops_by_name"]


def test_smollm2_step_has_fewer_ops_and_the_same_bits_as_session_12(smollm2_lm, tmp_path):
    out = tmp_path / "ops.json"
    assert step_ops.main(["--model", "smollm2", "--dtype", "bfloat16", "--position", "100", "--steps", "1",
                          "--timed", "2", "--warmup", "1", "--compare", "--rounds", "1",
                          "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    cmp = got["compare"]
    assert cmp["same_logits_bits"] is True
    layers, norms = 30, 61
    # per norm 8 ops -> 2 (rms_norm, the weight); per layer two rotations of 5 ops -> cat + one of 4;
    # the mask made additive once per forward: zeros, gt, masked_fill_ instead of le (and no
    # conversion inside SDPA in every layer, which this count of outermost ops does not see)
    assert cmp["session12_ops_per_step"] - got["ops_per_step"] == 6 * norms + 5 * layers - 2
    assert got["ops_by_name"]["aten::masked_fill_"] == 1
    assert got["ops_by_name"]["aten::rms_norm"] == norms and "aten::neg" not in got["ops_by_name"]


def test_counts_a_batched_step_with_its_live_rows(tmp_path):
    """``--rows N``: the batched runner's 8-row step with N sessions attends once per live row."""
    out = tmp_path / "ops.json"
    assert step_ops.main(["--model", "tiny", "--dtype", "float32", "--position", "70", "--steps", "2",
                          "--timed", "2", "--warmup", "1", "--rows", "3", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["runner"] == "batched" and got["live_rows"] == 3
    assert got["ops_by_name"]["aten::scaled_dot_product_attention"] == 3 * 2  # 3 rows x tiny's 2 layers
