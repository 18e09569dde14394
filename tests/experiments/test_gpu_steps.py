"""docs/lm-runner.md "The next GPU session": every step written there parses with today's flags.

A GPU session has 15 minutes of device time; a step that dies on a renamed flag wastes its slot.
Each ``python3 experiments/X.py ...`` and ``rs ...`` (ralmspec) step, and the server flags that
``load.py`` passes after ``--``, goes through its own entry point with ``parse_args`` stopped
right after parsing: an unknown flag or bad value is argparse's exit 2, a good line reaches the
stop. Nothing runs here; ``python experiments/gpu_steps.py`` runs them all on the CPU with small
sizes (minutes: not a CI test)."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess

import pytest

from experiments.gpu_steps import cpu_rehearsal, documented_steps
from tests.shell import shell_commands

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the kit's workload flags (../shared/device/gpu/run.sh) and results folder
KIT_VARS = {"$W": "--questions /q.jsonl --corpus /c.jsonl --retriever exact", "$RES": "/res"}


class Parsed(Exception):
    """Raised by the patched ``parse_args`` once the arguments parsed."""


def commands(step: str) -> list[tuple[str, list[str]]]:
    """(entry point, argv) of each command of a step (``tests.shell.shell_commands``: ``a && b``,
    redirections such as ``2>&1`` cut; a pipe's reader is a command too, and
    ``test_no_step_pipes_its_status_away`` forbids pipes)."""
    for name, value in KIT_VARS.items():
        step = step.replace(name, value)
    out = []
    for words in shell_commands(step):
        if words[:1] == ["rs"]:
            out.append(("ralmspec.cli", words[1:]))
        elif words[:1] == ["python3"] and words[1].startswith("experiments/"):
            args = words[2:]
            module = "experiments." + os.path.basename(words[1])[:-3]
            if "--" in args:  # load.py / knnlm_serve.py: the flags after -- go to every server they start
                cut = args.index("--")
                server = ["serve"]
                if module.endswith("knnlm_serve"):
                    server = ["knnlm", "serve", "--datastore", args[args.index("--datastore") + 1]]
                out.append(("ralmspec.cli", [*server, *args[cut + 1:]]))
                args = args[:cut + 1]
            out.append((module, args))
        elif words[:3] != ["python3", "-m", "pytest"]:
            raise AssertionError(f"a GPU step this test does not know how to check: {shlex.join(words)!r}")
    return out


STEPS = documented_steps()


@pytest.mark.parametrize("step", STEPS, ids=[f"step{i}" for i in range(len(STEPS))])
def test_a_documented_gpu_step_parses(step, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for module, argv in commands(step):
        with pytest.raises(Parsed):
            importlib.import_module(module).main(argv)


def test_no_step_pipes_its_status_away():
    """The kit runs a step as ``bash -c`` without ``pipefail``: ``cmd | tail`` exits with tail's
    0 whatever ``cmd`` did, and a failing pytest would read as a pass."""
    for step in STEPS:
        assert not re.search(r"\|(?!\|)", step.replace("||", "")), step


def test_the_cpu_rehearsal_of_every_step_is_small_and_off_the_gpu():
    for step in STEPS:
        cmd = cpu_rehearsal(step)
        if cmd is None:
            assert "pytest" in step
            continue
        assert not re.search(r"device cuda", cmd) and "--threads 16" not in cmd and not re.search(r"(^|&& )rs ", cmd), cmd
        for flag, most in (("--n", 1), ("--max-new-tokens", 4), ("--repeats", 1), ("--new", 4), ("--duration", 3),
                           ("--emulate-pad", 2000), ("--max-tokens", 3000), ("--concurrency", 2), ("--rounds", 2)):
            assert all(int(v) <= most for v in re.findall(rf"{flag} (\d+)", cmd)), (flag, cmd)
    assert cpu_rehearsal("rs bench --guessers exact && rs knnlm bench --n 30").endswith(
        "ralmspec bench --guessers exact && ralmspec knnlm bench --n 1")  # "rs" only as the command


def test_a_bad_flag_fails_the_check(monkeypatch):
    """The check can fail: a renamed flag is argparse's exit 2, not the stop."""
    step = next(s for s in STEPS if s.startswith("python3 experiments/step_ops.py"))
    with pytest.raises(SystemExit, match="2"):
        test_a_documented_gpu_step_parses(step.replace("--top", "--topmost"), monkeypatch)


# The kit's first two device calls each carry half of the SmolLM2 GGUF (50 MiB,
# ../shared/device/prepare.sh) plus every tracked file of the repo, and a call carries at most
# 64 MiB: tracked files past ~13 MiB would make the GPU session's first call fail.
TRACKED_LIMIT_BYTES = 13 << 20


def tracked_bytes(root: str) -> int | None:
    """The bytes of the files git tracks under ``root`` (None outside a git checkout)."""
    try:
        names = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = [os.path.join(root, p) for p in names.decode().split("\0") if p]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def test_the_repo_fits_beside_half_of_the_model_in_one_device_call():
    total = tracked_bytes(ROOT)
    if total is None:
        pytest.skip("not a git checkout")
    assert total > 1 << 20  # it did count the repo
    assert total < TRACKED_LIMIT_BYTES, (
        f"the tracked files take {total / 2**20:.1f} MiB: with half of the GGUF (50 MiB) the GPU kit's "
        f"first call would pass its 64 MiB carry limit; keep large results gzipped or out of git")
