"""`ralmspec serve --emulate-pad N`: an EMULATED larger exact knowledge base behind the server.

Two real server processes (the embedded knowledge base, tiny LM), one padded with 20,000
synthetic vectors: the padded one answers every completion exactly as the unpadded one (the
pad only adds scan cost), and names its knowledge base EMULATED in /v1/stats and /metrics.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from experiments.load import Server
from ralmspec.data.loaders import default_corpus
from ralmspec.retrieval.emulated import emulated_label, real_label
from tests.serving.support import request

PAD = 20_000
PROMPTS = ["who founded the roman empire", "the history of the alps"]


def test_emulated_server_answers_as_the_real_one_and_says_emulated():
    base = ["--model", "tiny", "--retriever", "exact"]
    with ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(Server, base), pool.submit(Server, [*base, "--emulate-pad", str(PAD)])]
        servers = [f.result() for f in starts if f.exception() is None]
    try:
        assert len(servers) == 2, [str(f.exception()) for f in starts if f.exception() is not None]
        real, padded = servers
        for prompt in PROMPTS:
            for speculate in (True, False):
                body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "ralm": {"speculate": speculate}}
                (s1, want), (s2, got) = request("POST", f"{real.url}/v1/completions", body), \
                    request("POST", f"{padded.url}/v1/completions", body)
                assert s1 == s2 == 200, (want, got)
                assert got["choices"][0]["text"] == want["choices"][0]["text"]
                assert got["ralm"]["passages"] == want["ralm"]["passages"]
                assert got["ralm"]["retriever"] == f"exact+pad{PAD}"
        n = len(default_corpus())
        stats = request("GET", f"{padded.url}/v1/stats")[1]
        assert stats["knowledge_base"] == emulated_label(n, PAD) and stats["knowledge_base"].startswith("EMULATED")
        assert stats["emulated_pad"] == PAD and stats["emulation"]["pad_searches"] > 0
        assert request("GET", f"{real.url}/v1/stats")[1]["knowledge_base"] == real_label(n)
        metrics = request("GET", f"{padded.url}/metrics")[1]
        info = [line for line in metrics.splitlines() if line.startswith("ralmspec_knowledge_base_info{")]
        assert len(info) == 1 and f'label="{emulated_label(n, PAD)}"' in info[0] and info[0].endswith(" 1")
        assert f'emulated_pad="{PAD}"' in info[0]
    finally:
        for s in servers:
            s.stop()
