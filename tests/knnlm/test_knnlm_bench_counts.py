"""`ralmspec knnlm bench` says what its identity check covered: speculated steps (tokens decided
from the cache and verified), steps retrieved for real, accepted and rollbacks, in the JSON and
the printed summary, and says plainly when nothing was speculated."""

from __future__ import annotations

import json

from ralmspec.knnlm.cli import main


def _bench(datastore: str, out, *flags: str) -> dict:
    assert main(["bench", "--datastore", datastore, "--n", "3", "--prompts", "passages", "--warmup", "0",
                 "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())["summary"]


def test_knnlm_bench_counts_speculated_steps(knn_datastores, tmp_path, capsys):
    ds = str(knn_datastores["flat"].path)
    s = _bench(ds, tmp_path / "forced.json", "--max-new-tokens", "12", "--stride", "3")  # fixed stride: speculates
    printed = capsys.readouterr().out
    k, v, acc, rb = s["speculated_steps"], s["verified_steps"], s["accepted"], s["rollbacks"]
    assert s["all_identical"] and k > 0 and v >= s["prompts"]  # the first token of every prompt is searched for real
    assert acc + rb <= k and s["acceptance_rate"] == acc / k
    want = f"3/3 prompts identical to the naive loop over {k} speculated tokens (accepted {acc}, rollbacks {rb};"
    assert want in printed

    s = _bench(ds, tmp_path / "one.json", "--max-new-tokens", "1", "--stride", "3")  # one token: never speculates
    assert (s["speculated_steps"], s["verified_steps"], s["accepted"], s["rollbacks"]) == (0, 3, 0, 0)
    assert "over 0 speculated tokens: speculation never ran" in capsys.readouterr().out
