"""When do a streamed answer's logprobs arrive? (session 12: each chunk's logprobs now go with its
text; before, all of them came with the finish chunk, i.e. at the end of the answer by construction.)

Starts `ralmspec serve --model smollm2 --threads 2` on a free port, then streams chat questions with
the official `openai` client, logprobs on (top 3) and off, speculation on and off, and records per
request: the first content chunk (TTFT), the first chunk carrying logprob entries, the finish chunk,
and how many chunks carried entries (each question warmed up once first, then every mode twice,
in one order and the reverse). Also checks the concatenated streamed entries == the
non-streamed answer's. Run on a quiet machine:

    python experiments/results/2026-12-05-streamed-logprobs/arrival.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai

QUESTIONS = ["Which city is the American rock band Hed PE from?", "Who wrote the poem Little Gidding?",
             "When was the Battle of Hastings fought?", "What is the capital of Australia?"]
MAX_TOKENS = 32


def start_server() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "ralmspec.cli", "serve", "--model", "smollm2", "--threads", "2",
                             "--port", "0", "--max-new-tokens", str(MAX_TOKENS)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("ralmspec: serving on http://"):  # serving/cli.py's one line once listening
            print(line.rstrip(), file=sys.stderr)
            return proc, int(line.rsplit(":", 1)[1])
        if time.time() - t0 > 600:
            break
    proc.kill()
    raise SystemExit("server did not start")


def one(client: openai.OpenAI, q: str, logprobs: bool, speculate: bool) -> dict:
    kw = {"logprobs": True, "top_logprobs": 3} if logprobs else {}
    t0 = time.perf_counter()
    first_text = first_lp = finish = None
    with_entries, entries = 0, []
    for c in client.chat.completions.create(model="smollm2", max_tokens=MAX_TOKENS, stream=True,
                                            messages=[{"role": "user", "content": q}],
                                            extra_body={"ralm": {"speculate": speculate}}, **kw):
        now = time.perf_counter() - t0
        if not c.choices:
            continue
        ch = c.choices[0]
        if ch.delta.content and first_text is None:
            first_text = now
        if ch.logprobs is not None and ch.logprobs.content:
            entries += [e.model_dump() for e in ch.logprobs.content]
            if ch.finish_reason is None:
                with_entries += 1
            if first_lp is None:
                first_lp = now
        if ch.finish_reason is not None:
            finish = now
    out = {"question": q, "logprobs": logprobs, "speculate": speculate, "ttft_s": first_text,
           "first_logprobs_s": first_lp, "finish_s": finish, "content_chunks_with_logprobs": with_entries}
    if logprobs:
        whole = client.chat.completions.create(model="smollm2", max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=3,
                                               messages=[{"role": "user", "content": q}],
                                               extra_body={"ralm": {"speculate": speculate}})
        out["same_as_non_streamed"] = entries == [e.model_dump() for e in whole.choices[0].logprobs.content]
    return out


def main() -> None:
    proc, port = start_server()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300)
        rows = []
        modes = [(logprobs, speculate) for speculate in (False, True) for logprobs in (False, True)]
        for q in QUESTIONS:
            one(client, q, True, False)  # warm-up: the question's encodings and passages cached for every mode
            for order in (modes, modes[::-1]):  # alternated both ways, same process
                for logprobs, speculate in order:
                    rows.append(one(client, q, logprobs, speculate))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    summary = {}
    for speculate in (False, True):
        for logprobs in (False, True):
            sel = [r for r in rows if r["speculate"] == speculate and r["logprobs"] == logprobs]
            key = f"{'speculative' if speculate else 'naive'}/{'logprobs' if logprobs else 'plain'}"
            summary[key] = {"ttft_s": statistics.median(r["ttft_s"] for r in sel),
                            "finish_s": statistics.median(r["finish_s"] for r in sel)}
            if logprobs:
                summary[key]["first_logprobs_s"] = statistics.median(r["first_logprobs_s"] for r in sel)
                summary[key]["content_chunks_with_logprobs"] = statistics.median(
                    r["content_chunks_with_logprobs"] for r in sel)
                summary[key]["all_same_as_non_streamed"] = all(r["same_as_non_streamed"] for r in sel)
    print(json.dumps(summary, indent=1))
    Path(__file__).with_name("arrival.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
