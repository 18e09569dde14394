"""`ralmspec serve` argument handling: bad settings end with `error: ...` and status 2, before any
model or index is loaded. (The serving path itself runs as a real process in test_remote.py.)"""

from __future__ import annotations

import socket

import pytest

from ralmspec.cli import build_parser, main
from ralmspec.errors import ConfigError


def test_serve_is_registered_with_engine_and_server_flags():
    a = build_parser().parse_args(["serve", "--model", "tiny", "--port", "0", "--max-concurrent", "4",
                                   "--retriever-url", "http://127.0.0.1:1", "--stride", "2"])
    assert a.command == "serve" and a.max_concurrent == 4 and a.stride == 2
    assert a.retriever_url == "http://127.0.0.1:1" and a.max_queue == 64 and not a.retrieval_only


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv,msg", [
    (["--max-concurrent", "0"], "max_concurrent"),
    (["--max-queue", "-1"], "max_queue"),
    (["--port", "70000"], "--port"),
    (["--retrieval-timeout", "0"], "retrieval_timeout_s"),
    (["--retrieval-timeout", "nan"], "retrieval_timeout_s"),  # was accepted: NaN <= 0 is False
    (["--retrieval-timeout", "inf"], "retrieval_timeout_s must be a finite"),  # was accepted
    (["--retrieval-timeout", "inf", "--retriever-url", "http://127.0.0.1:9"], "timeout_s must be a finite"),
    (["--request-timeout", "-1"], "--request-timeout must be a finite number of seconds >= 0 (0: no limit)"),
    (["--request-timeout", "nan"], "--request-timeout must be a finite"),
    (["--request-timeout", "inf"], "--request-timeout must be a finite"),  # was accepted: 0 is "no limit"
    (["--retrieval-only", "--retriever-url", "http://127.0.0.1:9"], "cannot be combined"),
    (["--retriever", "faiss-magic"], "unknown retriever"),
    (["--retriever-url", "ftp://nowhere"], "http://host:port"),
    (["--retriever-url", "DEAD"], "unreachable"),
    (["--emulate-pad", "-1"], "(--emulate-pad) must be an integer >= 0"),
    (["--retriever", "bm25", "--emulate-pad", "100"], "--retriever exact"),
    (["--emulate-pad", "100", "--retriever-url", "http://127.0.0.1:9"], "cannot be combined"),
    (["--retriever-url", "http://127.0.0.1:9", "--index", "/tmp/ix"], "--index choose a local knowledge base"),
    (["--retriever-url", "http://127.0.0.1:9", "--corpus", "c.jsonl", "--retriever-device", "cuda"],
     "--corpus, --retriever-device choose a local"),
    (["--lm-prefix-cache-mib", "-1"], "(--lm-prefix-cache-mib) must be"),
    (["--malloc-trim-s", "-1"], "--malloc-trim-s must be >= 0"),
    (["--malloc-trim-s", "nan"], "--malloc-trim-s must be >= 0"),
    (["--body-timeout", "-1"], "--body-timeout must be a finite number of seconds >= 0"),
    (["--body-timeout", "nan"], "--body-timeout must be"),
    (["--body-timeout", "inf"], "--body-timeout must be"),
    (["--idle-timeout", "0"], "--idle-timeout must be a finite number of seconds > 0"),
    (["--idle-timeout", "nan"], "--idle-timeout must be"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout must be a finite number of seconds >= 0"),
    (["--shutdown-timeout", "inf"], "--shutdown-timeout must be"),
])
def test_bad_serve_settings_exit_2(capsys, argv, msg):
    argv = [x.replace("DEAD", f"http://127.0.0.1:{_dead_port()}") for x in argv]
    assert main(["serve", "--model", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err, err


def test_serve_passes_the_lm_flags_to_the_model_it_loads():
    from ralmspec.cli_options import engine_config_from_args
    from ralmspec.serving.cli import _load_lm

    a = build_parser().parse_args(["serve", "--model", "tiny", "--lm-runner", "static", "--lm-prefix-cache-mib", "3"])
    lm, where = _load_lm(a, engine_config_from_args(a))
    try:
        assert lm.runner.name == "static" and lm.prefix_blocks.capacity_bytes == 3 << 20
        assert where == f" ({str(lm.dtype).removeprefix('torch.')}, static runner)"  # the start-up line says it
    finally:
        lm.close()


@pytest.mark.parametrize("concurrent, runner", [("16", "batched"), ("1", "eager")])
def test_serve_auto_runner_on_the_cpu_batches_concurrent_requests(concurrent, runner):
    """``--lm-runner auto`` on the CPU: a server of concurrent requests steps them together
    (batched runner); one request at a time, the eager runner (docs/lm-runner.md, "Measured")."""
    from ralmspec.cli_options import engine_config_from_args
    from ralmspec.serving.cli import _load_lm

    a = build_parser().parse_args(["serve", "--model", "tiny", "--max-concurrent", concurrent])
    assert a.lm_runner == "auto"
    lm, _ = _load_lm(a, engine_config_from_args(a))
    try:
        assert lm.runner.name == runner
    finally:
        lm.close()


@pytest.mark.parametrize("shutdown_timeout,signals,sig,status", [
    (None, 1, "SIGTERM", 0), ("0.5", 1, "SIGTERM", 143), ("0", 1, "SIGTERM", 143), (None, 2, "SIGTERM", 143),
    (None, 2, "SIGINT", 130)])
def test_sigterm_lets_requests_in_flight_finish_within_the_shutdown_timeout(shutdown_timeout, signals, sig, status):
    """SIGTERM closes the listening socket at once; a request in flight (here ~4+ s of decoding)
    is answered in full within ``--shutdown-timeout`` (default 60 s), else cancelled: its
    connection closes without an answer. ``--shutdown-timeout 0`` cancels it at once (aiohttp read
    0 as no limit: it was answered in full), and so does a second signal during the wait (a
    second Ctrl-C did nothing: up to 60 s of waiting). The server exits 0 once every request was
    answered; a stop that cancelled one exits as a command stopped by the signal, 143 (SIGTERM) or
    130 (SIGINT), with one line saying so (it exited 0: a supervisor could not tell a lost request)."""
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time
    import urllib.error
    import urllib.request

    extra = [] if shutdown_timeout is None else ["--shutdown-timeout", shutdown_timeout]
    proc = subprocess.Popen([sys.executable, "-m", "ralmspec.cli", "serve", "--model", "tiny", "--port", "0",
                             "--threads", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    got: dict = {}
    try:
        line = proc.stdout.readline()
        m = re.search(r"serving on (http://\S+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = m.group(1)

        def long_request() -> None:  # greedy, no EOS on the tiny model: all 600 tokens
            body = json.dumps({"model": "tiny", "prompt": "the history of rome", "max_tokens": 600}).encode()
            req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    got["answer"] = (r.status, json.loads(r.read())["usage"]["completion_tokens"])
            except (urllib.error.URLError, ConnectionError, OSError) as exc:  # cancelled: closed unanswered
                got["answer"] = ("closed", type(exc).__name__)

        client = threading.Thread(target=long_request)
        client.start()
        while json.loads(urllib.request.urlopen(f"{url}/health").read())["active"] == 0:
            time.sleep(0.05)
        t = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        if signals == 2:
            time.sleep(0.5)
            proc.send_signal(getattr(signal, sig))
        rc = proc.wait(90)
        waited = time.monotonic() - t
        err = proc.stderr.read()
        client.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == status and "Traceback" not in err, (rc, err)
    if status == 0:
        assert got["answer"] == (200, 600), got  # drained: the whole answer
        assert "stopped by" not in err, err
    else:
        assert got["answer"][0] == "closed" and waited < 10, (got, waited)
        assert f"ralmspec serve: stopped by {sig}; 1 request(s) in flight cancelled\n" in err, err


def test_a_stop_with_no_request_in_flight_exits_0():
    """Nothing to cancel: a SIGTERM (even with ``--shutdown-timeout 0``) or a Ctrl-C of an idle
    server is a clean stop, exit 0 and no message."""
    import os
    import signal
    import subprocess
    import sys

    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-m", "ralmspec.cli", "serve", "--model", "tiny", "--port", "0",
                                 "--threads", "1", "--shutdown-timeout", "0"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert "serving on" in proc.stdout.readline()
            proc.send_signal(sig)
            rc, err = proc.wait(60), proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert rc == 0 and "stopped by" not in err and "Traceback" not in err, (sig, rc, err)


def test_serve_closes_what_it_opened_when_the_engine_refuses_the_config(small_indexes, monkeypatch):
    """``--prompt-format chat`` for a model without a chat template is refused when the engine is
    made, after the LM and the knowledge base opened: they were left to process exit (a vLLM
    engine's or Ray's processes with them); both are closed before the error now."""
    from ralmspec.lm.hf import HFLanguageModel
    from ralmspec.serving import cli as serve_cli

    closed: list[str] = []
    kb = small_indexes["bm25"]
    monkeypatch.setattr(serve_cli, "_open_local_knowledge_base", lambda *args: (kb, "local"))
    monkeypatch.setattr(kb, "close", lambda: closed.append("knowledge base"))
    monkeypatch.setattr(HFLanguageModel, "close", lambda self: closed.append("lm"))
    a = build_parser().parse_args(["serve", "--model", "tiny", "--prompt-format", "chat"])
    with pytest.raises(ConfigError, match="chat template"):
        serve_cli._build_app(a)
    assert sorted(closed) == ["knowledge base", "lm"]
