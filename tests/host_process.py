"""Run library code in a fresh Python process as a host program would (no pytest, no CLI), with
the HF offline variables unset and the network blocked (every ``getaddrinfo`` / inet ``connect``
recorded and refused), and report what it left in the process: ``run_as_host(code)`` returns
the JSON the child prints: ``{"env": {HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE}, "hub_offline":
huggingface_hub's own flag, "network": [attempts]}``. The test session itself cannot tell:
tests/conftest.py sets both variables for every test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

PRELUDE = """
import json, os, socket
attempts = []
def _refuse_lookup(host, *a, **k):
    attempts.append(f"getaddrinfo {host}")
    raise OSError("network blocked by the test")
_connect = socket.socket.connect
def _refuse_connect(self, addr):
    if isinstance(addr, tuple):
        attempts.append(f"connect {addr}")
        raise OSError("network blocked by the test")
    return _connect(self, addr)
socket.getaddrinfo, socket.socket.connect = _refuse_lookup, _refuse_connect
"""

REPORT = """
import huggingface_hub.constants
print(json.dumps({"env": {k: os.environ.get(k) for k in %r}, "network": attempts,
                  "hub_offline": bool(huggingface_hub.constants.HF_HUB_OFFLINE)}))
""" % (OFFLINE_VARS,)


def run_as_host(code: str, timeout_s: float = 300.0) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    script = PRELUDE + textwrap.dedent(code) + REPORT
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=timeout_s, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
