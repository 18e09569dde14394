"""`ralmspec generate` end to end on the small real index: the answer, the passages, the timing
with the LM's ms per token (naive and speculative), `--threads`, and clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ralmspec.cli import main


def run(small_indexes, *extra: str) -> list[str]:
    index = small_indexes["exact"].index_dir
    return ["generate", "who wrote hamlet", "--model", "tiny", "--retriever", "exact", "--index", index,
            "--max-new-tokens", "8", "--stride", "2", *extra]


@pytest.mark.parametrize("mode", ["--no-speculate", "--speculate"])
def test_generate_prints_the_lm_ms_per_token_and_takes_threads(small_indexes, capsys, mode):
    before = torch.get_num_threads()
    try:
        assert main(run(small_indexes, mode, "--threads", "1", "--no-os3")) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert ("naive ·" if mode == "--no-speculate" else "speculative ·") in out
    m = re.search(r"LM (\d+\.\d+) ms/token \(prefills included\) · end to end (\d+\.\d+) ms/token", out)
    assert m, out
    lm, total = float(m.group(1)), float(m.group(2))
    assert 0 < lm and 0 < total


@pytest.mark.parametrize("bad, message", [(["--threads", "-1"], "--threads must be >= 0"),
                                          (["--lm-prefix-cache-mib", "-1"], "(--lm-prefix-cache-mib) must be"),
                                          (["--lm-device", "mps"], "(--lm-device) must be 'cpu', 'cuda' or 'cuda:N'")])
def test_generate_bad_flags_are_clear_errors(small_indexes, capsys, bad, message):
    assert main(run(small_indexes, *bad)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
@pytest.mark.parametrize("flags, message", [
    (["--lm-device", "cuda"], "query encoder device 'cuda' requested but CUDA is not available here"),
    (["--lm-device", "cuda", "--encoder-device", "cpu"], "device 'cuda' requested but CUDA is not available"),
    (["--encoder-device", "cuda:1"], "query encoder device 'cuda:1' requested but CUDA is not available here"),
])
def test_a_cuda_device_without_cuda_is_named_in_the_error(small_indexes, capsys, flags, message):
    """Until 2026-12-07 ``--lm-device cuda`` on a CPU-only torch ended in "cannot load the
    sentence-transformer at ...: Torch not compiled with CUDA enabled" (the encoder follows the LM)."""
    assert main(run(small_indexes, *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "sentence-transformer at" not in err


def test_generate_refuses_index_and_corpus_together(small_indexes, tmp_path, capsys):
    """With --index, --corpus was ignored in silence: the answer came from the index's passages."""
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text('{"text": "my own passage"}\n')
    assert main(run(small_indexes, "--corpus", str(corpus))) == 2
    assert "--corpus), not both" in capsys.readouterr().err


def test_version(capsys):
    import ralmspec

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"ralmspec {ralmspec.__version__}\n"


def test_generate_empty_question_is_an_error(capsys):
    assert main(["generate", "  ", "--model", "tiny"]) == 2
    assert "the question is empty" in capsys.readouterr().err


def test_generate_question_that_is_not_utf8_is_an_error(capsys):
    # argv's byte 0xff arrives as U+DCFF (surrogateescape); refused before the model loads
    assert main(["generate", "who \udcff wrote hamlet", "--model", "tiny"]) == 2
    assert "the question is not valid Unicode: a lone surrogate U+DCFF at character 4" in capsys.readouterr().err


def test_generate_prints_token_logprobs(small_indexes, capsys):
    """``--logprobs K``: one line per answer token with its log-probability and K alternatives;
    in JSON the ``logprobs`` of every token, the same numbers with speculation on and off."""
    assert main(run(small_indexes, "--no-os3", "--logprobs", "2")) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if re.match(r"\s+\d+\s+'", ln)]
    assert "token logprobs" in out and len(lines) == 8, out
    assert all(len(re.findall(r"-?\d+\.\d{3}", ln.split("|")[1])) == 2 for ln in lines), lines
    runs = []
    for mode in ("--no-speculate", "--speculate"):
        assert main(run(small_indexes, mode, "--no-os3", "--logprobs", "2", "--json")) == 0
        d = json.loads(capsys.readouterr().out)
        assert len(d["logprobs"]) == len(d["token_ids"]) == 8
        assert [lp["token"] for lp in d["logprobs"]] == d["token_ids"]
        runs.append(d)
    assert runs[1]["stats"]["speculated"] > 0
    assert runs[0]["logprobs"] == runs[1]["logprobs"]


def test_generate_logprobs_out_of_range_is_a_clear_error(small_indexes, capsys):
    assert main(run(small_indexes, "--logprobs", "21")) == 2
    assert "logprobs must be" in capsys.readouterr().err


def test_generate_streams_the_verified_answer(small_indexes, capsys):
    """``--stream`` prints the answer chunk by chunk as it is verified: the same answer line as
    without it, with speculation on (and run) and off, and with ``--stop``; ``--json`` with it is a
    clear error."""
    answers = {}
    for mode in ("--no-speculate", "--speculate"):
        for stream in ((), ("--stream",)):
            assert main(run(small_indexes, mode, "--no-os3", "--max-new-tokens", "12", *stream)) == 0
            out = capsys.readouterr().out
            answers[mode, bool(stream)] = next(ln for ln in out.splitlines() if ln.startswith("answer:"))
            if mode == "--speculate":
                assert re.search(r"speculated [1-9]", out), out
    assert len(set(answers.values())) == 1, answers
    full = answers["--no-speculate", False].removeprefix("answer:").strip()
    stop = full.split()[2]
    for stream in ((), ("--stream",)):
        assert main(run(small_indexes, "--speculate", "--no-os3", "--max-new-tokens", "12", "--stop", stop,
                        "--stop", "\u2603never", *stream)) == 0
        out = capsys.readouterr().out
        line = next(ln for ln in out.splitlines() if ln.startswith("answer:"))
        assert line.removeprefix("answer:").strip() == full[:full.index(stop)].strip() and "finish=stop" in out
    assert main(run(small_indexes, "--stream", "--json")) == 2
    assert "--stream" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["serve", "--model", "tiny", "--port", "0"],
                                  ["knnlm", "build", "--model", "tiny", "--max-tokens", "100", "--out", "OUT"]])
def test_a_command_without_the_ml_stack_says_how_to_install_it(tmp_path, argv):
    """A plain ``pip install ralmspec`` (no ``[cpu]`` / ``[gpu]``) has no torch: ``serve`` and
    ``knnlm build`` died with a ModuleNotFoundError traceback (found by a wheel-install audit)."""
    import subprocess
    import sys

    argv = [x.replace("OUT", str(tmp_path / "ds")) for x in argv]
    code = ("import sys; sys.modules['torch'] = None  # `import torch` fails as if it were not installed\n"
            f"from ralmspec.cli import main; sys.exit(main({argv!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"`ralmspec {argv[0]}` needs the ML stack" in proc.stderr and "pip install 'ralmspec[cpu]'" in proc.stderr


def test_a_missing_module_outside_the_ml_stack_is_not_called_an_install_to_complete(monkeypatch):
    import ralmspec.cli as cli

    def broken(_a):
        import ralmspec_no_such_module  # noqa: F401

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["generate"].set_defaults(func=broken)
    with pytest.raises(ModuleNotFoundError, match="ralmspec_no_such_module"):
        cli.main(["generate", "a question"])
