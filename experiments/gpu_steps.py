"""The steps of docs/lm-runner.md "The next GPU session", read from the doc, and a CPU rehearsal:

    python experiments/gpu_steps.py --list             # the steps, numbered
    python experiments/gpu_steps.py                    # run each on the CPU, small sizes, exit codes
    python experiments/gpu_steps.py 1 4                # only steps 1 and 4

A GPU session has 15 minutes of device time: a step that dies on a renamed flag or a broken code
path wastes its slot. The rehearsal runs every step as written but with ``cuda`` -> ``cpu``, 2
threads and small sizes (``cpu_rehearsal``: 1 question, 4 new tokens, 3 s load windows, a 2,000-
vector pad, ...), ``rs`` = ``ralmspec``, ``$W`` empty (the embedded workload), ``$RES`` a
temporary folder; the pytest step is left out (its GPU tests skip on the CPU). It prints one line
per step and the last lines of any that fail; exit status 1 if one did. Minutes, not seconds:
not a CI test (tests/experiments/test_gpu_steps.py checks in CI that every step parses).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (pattern, replacement), applied in order: the device, then the sizes of every documented step
CPU_REHEARSAL = (
    (r"--(lm-)?device cuda", r"--\1device cpu"), (r"--threads 16", "--threads 2"),
    (r"--n \d+", "--n 1"), (r"--max-new-tokens \d+", "--max-new-tokens 4"), (r"--repeats \d+", "--repeats 1"),
    (r"--duration \d+", "--duration 3"), (r"--warmup \d+", "--warmup 1"), (r"--new \d+", "--new 4"),
    (r"--prompt \d+", "--prompt 40"), (r"--max-tokens 100000", "--max-tokens 3000"),
    (r"--max-tokens \d\d\b", "--max-tokens 4"), (r"--rounds 20", "--rounds 2"),
    (r"--emulate-pad \d+", "--emulate-pad 2000"), (r"--concurrency \d+( \d+)*", "--concurrency 2"),
    (r"/tmp/ds\b", "$RES/ds"),  # the device machine's scratch folder, here under the temporary $RES
)


def documented_steps(doc_path: str | None = None) -> list[str]:
    """The quoted steps of the ```bash block under "## The next GPU session", in order."""
    doc = open(doc_path or os.path.join(ROOT, "docs", "lm-runner.md"), encoding="utf-8").read()
    block = doc.split("## The next GPU session", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    steps = re.findall(r"^\s*'(.*)'\s*\\?$", block, re.M)
    if len(steps) < 10:
        raise ValueError("the GPU steps block lost its shape (one quoted step per line)")
    return steps


def cpu_rehearsal(step: str) -> str | None:
    """``step`` as the CPU rehearsal runs it (module doc), or None for the pytest step."""
    if "pytest" in step:
        return None
    for pattern, repl in CPU_REHEARSAL:
        step = re.sub(pattern, repl, step)
    return re.sub(r"(^|&& )rs ", r"\1ralmspec ", step).replace("python3 ", f"{sys.executable} ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("only", nargs="*", type=int, help="step numbers to run (default: all)")
    ap.add_argument("--list", action="store_true", help="print the numbered steps and exit")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per step")
    a = ap.parse_args(argv)
    steps = documented_steps()
    if a.list:
        for i, s in enumerate(steps):
            print(f"step{i}: {s}")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu-steps-") as res:
        env = dict(os.environ, RES=res, W="")
        for i, step in enumerate(steps):
            cmd = cpu_rehearsal(step)
            if (a.only and i not in a.only) or cmd is None:
                continue
            t = time.perf_counter()
            try:
                r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=a.timeout)
                rc, out = r.returncode, r.stdout + r.stderr
            except subprocess.TimeoutExpired as e:
                rc, out = "timeout", str(e)
            print(f"step{i} rc={rc} {time.perf_counter() - t:.0f}s :: {cmd}", flush=True)
            if rc != 0:
                failed += 1
                print("    " + "\n    ".join(out.strip().splitlines()[-4:]), flush=True)
    print(f"{failed} step(s) failed" if failed else "every step exited 0")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
