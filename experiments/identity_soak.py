"""Identity soak: random requests under concurrent load, each answered speculatively AND naively
by one server, every pair compared.

The tests check speculative == naive over seeded sweeps of a few dozen requests; ``soak.py``
checks a server under load for hours, but with the server's own settings (and with the load
governor on, a loaded server pauses speculation, so its re-check compares the naive loop with
itself). This script is the product of the two: N closed-loop clients, for many minutes, each
drawing a request at random (endpoint, question, ``ralm`` settings, greedy or seeded sampling,
logprobs, stop strings, streaming) and sending it twice to ONE server, once with
``ralm.speculate`` true and once false, in a random order or at the same time; beside some
pairs (``--abandon``) a third, speculative request whose client leaves it mid-answer (a stream
closed after its first event, a plain request given up after 0.05-2 s), so the server cancels
requests whose rows share batched steps with the pair's. The server runs
without its load governor (so loaded requests speculate), with the batched LM runner where it
batches (its rows share forwards with whatever else is in flight), and with whatever ``--``
flags shrink its caches (``--lm-prefix-cache-mib 4`` evicts prefix blocks all the time).

A pair must agree on the text, the finish reason, the logprobs (a stream's, concatenated, equal
the non-streamed answer's), the completion tokens and the passages that produced each span of
tokens. A disagreement is written out whole (both bodies and both answers: send the body again
to reproduce it) and the script exits 1. The speculative answers' counters (speculated steps,
accepted, rollbacks) say what was checked: a soak that never speculated proves nothing, so it
also exits 1 when the sum of speculated steps is 0.

    python experiments/identity_soak.py --model tiny --clients 6 --minutes 30 --json tiny.json \\
        -- --lm-prefix-cache-mib 4
    python experiments/identity_soak.py --model smollm2 --clients 4 --minutes 30 --json smol.json
    python experiments/identity_soak.py --model tiny --knnlm /tmp/ds --clients 4 --minutes 10 \
        -- --speculate-max-active 8

Flags after ``--`` go to the spawned ``ralmspec serve`` (``--no-load-governor`` is added) or, with
``--knnlm DATASTORE``, ``ralmspec knnlm serve`` (whose requests draw the ``knnlm`` extension's
settings; it pauses speculation while requests share its forwards unless
``--speculate-max-active`` lets them). A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.load import (  # noqa: E402
    ENDPOINTS, Server, api_headers, load_workload, loadavg, split_server_args, sse_chunks,
)

# Per-request ``ralm`` settings drawn from (each field sent with probability 1/2). Small caches,
# fixed strides and several rounds in flight make speculation roll back and evict.
RALM_CHOICES: dict[str, list[Any]] = {
    "stride": [1, 2, 3, 4, 5], "query_len": [1, 4, 16, 32], "passage_tokens": [8, 64, 128],
    "prefetch": [1, 2, 20, 256], "fixed_stride": [1, 2, 3, 5, 16], "async_verify": [True, False],
    "max_inflight": [1, 2, 4], "eager_verify": [True, False], "cache_capacity": [1, 2, 8, 1024],
    "s_max": [1, 4, 16], "window": [1, 5, 50], "gamma_max": [0.1, 0.5, 0.98],
    "guesser": ["exact", "last", "refine", "static", "bm25"],
}
DENSE_ONLY_GUESSERS = {"static"}
# The kNN-LM server's ``knnlm`` extension (greedy only, no logprobs); ``strict`` accepts a token
# only when its speculated neighbours are the true ones.
KNNLM_CHOICES: dict[str, list[Any]] = {
    "k": [1, 4, 16, 64], "lam": [0.0, 0.25, 0.75, 1.0], "knn_temperature": [0.5, 1.0, 10.0],
    "fixed_stride": [1, 2, 4, 8], "s_max": [1, 4, 16], "gamma_max": [0.1, 0.5, 0.98],
    "cache_capacity": [1, 16, 1024], "successors": [0, 1, 8], "async_verify": [True, False], "strict": [True, False],
}
STOPS = [".", ",", " the", "\n", "a", " is"]


def draw_request(rng: random.Random, questions: list[str], model: str, *, chat: bool, dense: bool,
                 knnlm: bool = False) -> tuple[str, dict[str, Any], bool]:
    """One random request: ``(endpoint, body without ralm.speculate, stream the speculative one)``.

    Half of the ``ralm`` fields are drawn; ``os3`` is on or off with even odds (off: a fixed
    stride, which speculates whatever the measured costs). A third of the requests sample
    (seeded, so the answer is a function of the body), a third ask for logprobs, a quarter stop
    at a string. ``chat``: whether the server's model has a chat template (else every request
    goes to /v1/completions); ``dense``: whether its knowledge base encodes queries (the
    ``static`` guesser needs that). ``knnlm``: a kNN-LM server's request (its ``knnlm``
    extension, greedy, no logprobs)."""
    name, choices = ("knnlm", KNNLM_CHOICES) if knnlm else ("ralm", RALM_CHOICES)
    ext = {k: rng.choice(v) for k, v in choices.items() if rng.random() < 0.5}
    if not dense and ext.get("guesser") in DENSE_ONLY_GUESSERS:
        ext["guesser"] = "exact"
    ext["os3"] = rng.random() < 0.5
    endpoint = "chat" if chat and rng.random() < 0.5 else "completions"
    question = rng.choice(questions)
    body: dict[str, Any] = {"model": model, "max_tokens": rng.choice([1, 4, 8, 16, 32]), name: ext}
    if endpoint == "chat":
        if rng.random() < 0.25:  # a second turn: the retrieval query is the last question
            first = rng.choice(questions)
            body["messages"] = [{"role": "user", "content": first}, {"role": "assistant", "content": "I am not sure."},
                                {"role": "user", "content": question}]
        else:
            body["messages"] = [{"role": "user", "content": question}]
    else:
        body["prompt"] = [question] if rng.random() < 0.1 else question
    if rng.random() < 1 / 3 and not knnlm:
        body.update(temperature=rng.choice([0.5, 0.9, 1.3]), top_p=rng.choice([0.8, 0.95, 1.0]),
                    seed=rng.randrange(1 << 31))
    if rng.random() < 1 / 3 and not knnlm:
        k = rng.choice([0, 1, 3])
        if endpoint == "chat":
            body.update(logprobs=True, top_logprobs=k)
        else:
            body["logprobs"] = k
    if rng.random() < 0.25:
        body["stop"] = rng.sample(STOPS, rng.choice([1, 2]))
    return endpoint, body, rng.random() < 0.5


def extension(body: dict[str, Any]) -> str:
    """The server's own field of a request or answer: ``ralm`` or ``knnlm``."""
    return "knnlm" if "knnlm" in body else "ralm"


def with_speculate(body: dict[str, Any], speculate: bool) -> dict[str, Any]:
    name = extension(body)
    return {**body, name: {**body[name], "speculate": speculate}}


def merge_logprobs(endpoint: str, parts: list[Any]) -> Any:
    """A stream's logprobs, its chunks' entries concatenated (None when no chunk had any)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    if endpoint == "chat":
        return {"content": [e for p in parts for e in p["content"]], "refusal": None}
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: [e for p in parts for e in (p.get(k) or [])] for k in keys}


def comparable(answer: dict[str, Any]) -> dict[str, Any]:
    """What a speculative answer and its naive twin must share."""
    ralm = answer.get(extension(answer)) or {}
    return {"text": answer["text"], "finish_reason": answer["finish_reason"], "logprobs": answer["logprobs"],
            "completion_tokens": (answer.get("usage") or {}).get("completion_tokens"),
            "passages": [(p["doc_id"], p["start"], p["end"]) for p in ralm.get("passages", [])]}


def differences(spec: dict[str, Any], naive: dict[str, Any]) -> list[str]:
    """The fields where the two answers differ ([] when they agree)."""
    a, b = comparable(spec), comparable(naive)
    return [k for k in a if a[k] != b[k]]


async def post(session: Any, url: str, endpoint: str, body: dict[str, Any], stream: bool) -> dict[str, Any]:
    """Send one request; the answer as ``{text, finish_reason, logprobs, usage, ralm, streamed}``.
    Raises RuntimeError on a non-200 status or an error event in the stream."""
    path = ENDPOINTS[endpoint]
    if stream:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(url + path, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
        if not stream:
            d = await r.json(content_type=None)
            c = d["choices"][0]
            text = c["message"]["content"] if endpoint == "chat" else c["text"]
            name = extension(d)
            return {"text": text, "finish_reason": c["finish_reason"], "logprobs": c.get("logprobs"),
                    "usage": d.get("usage"), name: d.get(name), "streamed": False}
        name = extension(body)
        texts, lps, out = [], [], {"finish_reason": None, "usage": None, name: None}
        async for chunk in sse_chunks(r):
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content") if endpoint == "chat" else c.get("text")
                texts.append(piece or "")
                lps.append(c.get("logprobs"))
                out["finish_reason"] = c.get("finish_reason") or out["finish_reason"]
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
            if chunk.get(name):
                out[name] = chunk[name]
        return {**out, "text": "".join(texts), "logprobs": merge_logprobs(endpoint, lps), "streamed": True}


class Tally:
    """What the soak compared and what the speculative answers did."""

    def __init__(self) -> None:
        self.pairs = 0
        self.counts: Counter[str] = Counter()  # requests by kind (endpoint, stream, sampled, ...)
        self.spec: Counter[str] = Counter()  # speculated / accepted / rollbacks / naive_steps summed
        self.mismatches: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []

    def add(self, endpoint: str, body: dict[str, Any], stream: bool, spec: dict[str, Any]) -> None:
        self.pairs += 1
        self.counts[endpoint] += 1
        self.counts["streamed"] += stream
        self.counts["sampled"] += "temperature" in body
        self.counts["logprobs"] += "logprobs" in body
        self.counts["stop"] += "stop" in body
        self.counts["os3_off"] += not body[extension(body)]["os3"]
        stats = (spec.get(extension(spec)) or {}).get("stats") or {}
        self.spec["answers_speculated"] += int(stats.get("speculated", 0) > 0)
        for k in ("speculated", "accepted", "rollbacks", "naive_steps", "paused_steps", "cache_evictions"):
            self.spec[k] += int(stats.get(k) or 0)

    def summary(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "mismatches": len(self.mismatches), "errors": len(self.errors),
                **dict(self.counts), **dict(self.spec)}


async def run_pair(s: Any, url: str, endpoint: str, body: dict[str, Any], stream: bool, order: str
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The speculative answer (streamed if ``stream``) and its naive twin: one after the other
    (``spec_first`` / ``naive_first``) or both at once (``together``)."""
    def spec() -> Any:
        return post(s, url, endpoint, with_speculate(body, True), stream)

    def naive() -> Any:
        return post(s, url, endpoint, with_speculate(body, False), False)

    if order == "together":
        tasks = [asyncio.ensure_future(spec()), asyncio.ensure_future(naive())]
        try:
            a, b = await asyncio.gather(*tasks)
            return a, b
        finally:
            for t in tasks:
                t.cancel()
    if order == "spec_first":
        a = await spec()
        return a, await naive()
    b = await naive()
    return await spec(), b


async def abandon(s: Any, url: str, endpoint: str, body: dict[str, Any], stream: bool, after_s: float) -> str:
    """A request its client leaves: a stream after its first event, a plain request after
    ``after_s`` seconds. Returns how it ended (``left`` or ``answered``: it finished first);
    raises on an error answer."""
    if stream:
        async with s.post(url + ENDPOINTS[endpoint], json={**body, "stream": True}) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
            await r.content.readline()
            r.close()  # drop the connection with the stream unfinished
        return "left"
    try:
        await asyncio.wait_for(post(s, url, endpoint, body, False), after_s)
    except asyncio.TimeoutError:
        return "left"
    return "answered"


async def client(i: int, url: str, questions: list[str], model: str, deadline: float, seed: int,
                 chat: bool, dense: bool, knnlm: bool, abandon_p: float, tally: Tally) -> None:
    import aiohttp

    rng = random.Random(seed * 1_000_003 + i)
    timeout = aiohttp.ClientTimeout(total=600)

    def draw() -> tuple[str, dict[str, Any], bool]:
        return draw_request(rng, questions, model, chat=chat, dense=dense, knnlm=knnlm)

    async with aiohttp.ClientSession(timeout=timeout, headers=api_headers()) as s:
        while time.monotonic() < deadline:
            endpoint, body, stream = draw()
            order = rng.choice(["spec_first", "naive_first", "together"])
            decoy = None
            if rng.random() < abandon_p:  # a neighbour that leaves while this pair decodes
                d_endpoint, d_body, d_stream = draw()
                decoy = asyncio.ensure_future(abandon(s, url, d_endpoint, with_speculate(d_body, True), d_stream,
                                                      rng.uniform(0.05, 2.0)))
            try:
                spec, naive = await run_pair(s, url, endpoint, body, stream, order)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the soak goes on
                tally.errors.append({"client": i, "endpoint": endpoint, "body": body, "error": repr(exc)[:500]})
                print(f"  client {i}: error {exc!r:.200}", file=sys.stderr, flush=True)
                continue
            finally:
                if decoy is not None:
                    try:
                        tally.counts["abandoned_" + await decoy] += 1
                    except Exception as exc:  # noqa: BLE001
                        tally.errors.append({"client": i, "endpoint": d_endpoint, "body": d_body, "abandoned": True,
                                             "error": repr(exc)[:500]})
            tally.add(endpoint, body, stream, spec)
            diff = differences(spec, naive)
            if diff:
                tally.mismatches.append({"client": i, "endpoint": endpoint, "body": body, "stream": stream,
                                         "order": order, "fields": diff, "speculative": spec, "naive": naive})
                print(f"  MISMATCH ({', '.join(diff)}) on /v1/{endpoint}: {json.dumps(body)[:300]}",
                      file=sys.stderr, flush=True)


async def probe(url: str, model: str, knnlm: bool) -> tuple[bool, bool]:
    """Whether the server answers chat (its model has a chat template) and encodes queries (a
    dense knowledge base: the ``static`` guesser; a kNN-LM server has no guessers)."""
    import aiohttp

    async with aiohttp.ClientSession(headers=api_headers()) as s:
        info: dict[str, Any] = {}
        if not knnlm:
            async with s.get(url + "/v1/retriever") as r:
                info = await r.json(content_type=None)
        body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(url + ENDPOINTS["chat"], json=body) as r:
            chat = r.status == 200
    return chat, str(info.get("kind", "")) != "bm25"


async def soak(a: argparse.Namespace, url: str, questions: list[str]) -> dict[str, Any]:
    knnlm = a.knnlm is not None
    chat, dense = await probe(url, a.model, knnlm)
    print(f"  chat endpoint: {'yes' if chat else 'no (the model has no chat template)'}; "
          f"{'kNN-LM server' if knnlm else f'dense knowledge base: {dense}'}", file=sys.stderr, flush=True)
    tally = Tally()
    t0 = time.monotonic()
    deadline = t0 + a.minutes * 60

    async def progress() -> None:
        while True:
            await asyncio.sleep(a.progress)
            s = tally.summary()
            print(f"  {(time.monotonic() - t0) / 60:5.1f} min: {s['pairs']} pairs, {s['mismatches']} mismatches, "
                  f"{s['errors']} errors; speculated {s.get('speculated', 0)} steps "
                  f"({s.get('rollbacks', 0)} rollbacks)", file=sys.stderr, flush=True)

    ticker = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(client(i, url, questions, a.model, deadline, a.seed, chat, dense, knnlm,
                                      a.abandon, tally) for i in range(a.clients)))
    finally:
        ticker.cancel()
    stats = await server_stats(url)
    runner = stats.get("lm_runner") or {}
    if not isinstance(runner, dict):  # the kNN-LM server names its runner
        runner = {"name": runner}
    return {"summary": {**tally.summary(), "minutes": round((time.monotonic() - t0) / 60, 2),
                        "chat_endpoint": chat,
                        "lm_runner": runner.get("name"), "lm_dtype": stats.get("lm_dtype"),
                        "batched_steps_by_live_rows": runner.get("batched_steps_by_live_rows")},
            "mismatches": tally.mismatches, "errors": tally.errors, "server_stats": stats}


async def server_stats(url: str) -> dict[str, Any]:
    """``GET /v1/stats`` at the end: how the LM ran (runner, batched steps by live rows), caches."""
    import aiohttp

    async with aiohttp.ClientSession(headers=api_headers()) as s:
        async with s.get(url + "/v1/stats") as r:
            return await r.json(content_type=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="the spawned server's --model")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--questions", default="grounded", help="grounded, nq-open or a file of questions")
    p.add_argument("--n-questions", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", type=float, default=60.0, help="seconds between progress lines")
    p.add_argument("--abandon", type=float, default=0.15, metavar="P",
                   help="chance per pair of a third request whose client leaves it mid-answer (not compared)")
    p.add_argument("--knnlm", default=None, metavar="DATASTORE",
                   help="soak `ralmspec knnlm serve --datastore DATASTORE` instead of `ralmspec serve`")
    p.add_argument("--url", default=None, help="an already running server (its own settings; not spawned)")
    p.add_argument("--json", default=None, help="write the summary, mismatches and errors here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv, server_args = split_server_args(argv)
    a = build_parser().parse_args(argv)
    if a.clients < 1 or a.minutes <= 0 or not 0 <= a.abandon <= 1:
        print("error: --clients must be >= 1, --minutes > 0 and --abandon in [0, 1]", file=sys.stderr)
        return 2
    questions = load_workload(a.questions, a.n_questions)
    server = None
    if a.url is None:
        common = ["--model", a.model, "--max-concurrent", str(2 * a.clients)]
        if a.knnlm is None:
            server = Server([*common, "--no-load-governor", *server_args])
        else:
            server = Server(["--datastore", a.knnlm, *common, *server_args], command=("knnlm", "serve"))
        url = server.url
    else:
        url = a.url.rstrip("/")
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    load_before = loadavg()
    try:
        doc = asyncio.run(soak(a, url, questions))
    finally:
        if server is not None:
            server.stop()
    doc["settings"] = {"model": a.model, "knnlm": a.knnlm, "clients": a.clients, "abandon": a.abandon,
                       "minutes": a.minutes, "seed": a.seed,
                       "questions": a.questions, "n_questions": len(questions), "server_args": server_args,
                       "url": a.url, "started": started, "loadavg_before": load_before, "loadavg_after": loadavg()}
    s = doc["summary"]
    print(json.dumps(s, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1))
    if s["mismatches"]:
        print(f"FAIL: {s['mismatches']} of {s['pairs']} pairs differ (see the JSON for the bodies)", file=sys.stderr)
        return 1
    if not s.get("speculated"):
        print("FAIL: no step was speculated: the soak compared the naive loop with itself", file=sys.stderr)
        return 1
    print(f"OK: {s['pairs']} pairs identical; {s['speculated']} speculated steps, {s.get('rollbacks', 0)} rollbacks, "
          f"{s['errors']} errors", file=sys.stderr)
    return 1 if s["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
