"""The speculation figures are true: recomputed from the LM and knowledge-base calls themselves.

Every identity test trusts ``speculated`` / ``accepted`` / ``rollbacks`` to say that speculation
ran (tests/identity.py). Here they are recomputed from the outside: the request's LM client and
search client are wrapped to log every chunk (which passage its prompt starts with, after which
generated tokens) and every search (queries, top-1s). A chunk is *speculative* when no finished
search had given its passage as the top-1 of its query; a search's query is *produced* when a
speculative chunk was made for it before the search came back. Then, per request:
speculated = produced queries judged by a search; accepted = those kept (top-1 == the chunk's
passage, up to the search's first mismatch); rollbacks = rejections of produced queries = times
generated tokens were thrown away, and how many (``wasted_tokens``); the unproduced queries are
the verified steps (the first retrieval, and ``verified_ahead``: a synchronous round's last step,
judged before its chunk); rounds = the other searches.

Guessers that regenerate inside a step (``refine``) are left out: a search that finishes while the
step waits for its refinement is seen here before the engine applies it.
"""

from __future__ import annotations

import asyncio

import pytest

from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
from ralmspec.engine.core import RalmEngine

GEN = GenerationConfig(stride=2, query_len=16, max_new_tokens=23, passage_tokens=64)  # ends mid-chunk
QUESTIONS = ["who wrote the song hey jude", "when did the roman empire fall"]
SPECS = [SpeculationConfig(os3=False, fixed_stride=1, prefetch=1, async_verify=False),  # only verified ahead
         SpeculationConfig(os3=False, fixed_stride=3, prefetch=1, async_verify=False),
         SpeculationConfig(os3=False, fixed_stride=2, prefetch=20, async_verify=True, max_inflight=1, guesser="last"),
         SpeculationConfig(os3=True, naive_fallback=False, prefetch=20, async_verify=True, max_inflight=1)]


class Clock:
    def __init__(self):
        self.t = 0

    def __call__(self) -> int:
        self.t += 1
        return self.t


class LoggedLM:
    def __init__(self, inner, log, clock):
        self.inner, self.log, self.clock = inner, log, clock

    async def generate(self, prompt, n, session, sampling=None):
        start = self.clock()
        out = await self.inner.generate(prompt, n, session, sampling)
        self.log.append({"start": start, "prompt": list(prompt), "out": list(out)})
        return out

    def release(self, session):
        self.inner.release(session)


class LoggedSearch:
    def __init__(self, inner, log, clock):
        self.inner, self.log, self.clock = inner, log, clock

    async def search(self, queries, k):
        hits = await self.inner.search(queries, k)
        self.log.append({"end": self.clock(), "queries": list(queries), "top1": [h[0].doc_id for h in hits]})
        return hits


def recomputed(engine, question, chunks, searches, final) -> dict:
    """The figures of one request from its logged calls (module doc; plain prompt format)."""
    ctx = engine.context(GEN)
    pids = ctx.encode_prompt(question)
    lead = ctx.fmt.passage_lead
    passages = {d: engine.passages.get(d, GEN.passage_tokens, lead) for d in range(len(engine.retriever.corpus))}
    query = lambda gen: ctx.query(pids + gen)  # noqa: E731
    live, discards = [], []
    out = {"speculated": 0, "accepted": 0, "rollbacks": 0, "wasted_tokens": 0, "unproduced": 0,
           "searches": len(searches)}
    for c in chunks:  # in call order (one request: its chunks never overlap)
        doc = max((d for d, ids in passages.items() if c["prompt"][:len(ids)] == ids
                   and c["prompt"][len(ids):len(ids) + len(pids)] == pids), key=lambda d: len(passages[d]))
        c["doc"], c["gen"] = doc, c["prompt"][len(passages[doc]) + len(pids):]
        assert c["gen"] == live[:len(c["gen"])], "a chunk after tokens that are not the output"
        if len(live) > len(c["gen"]):
            out["rollbacks"] += 1
            out["wasted_tokens"] += len(live) - len(c["gen"])
            discards.append((c["start"], len(c["gen"])))
        # known: a finished search gave this passage for this query, and no output before it was
        # thrown away since (a search of an earlier, cut version of the output proves nothing)
        c["speculative"] = not any(s["end"] < c["start"] and (query(c["gen"]), doc) in zip(s["queries"], s["top1"])
                                   and not any(s["end"] < t < c["start"] and p < len(c["gen"]) for t, p in discards)
                                   for s in searches)
        live = c["gen"] + c["out"]
    assert live == final
    for s in sorted(searches, key=lambda s: s["end"]):
        rejected = False
        for q, top in zip(s["queries"], s["top1"]):
            made = [c for c in chunks if c["speculative"] and c["start"] < s["end"] and not c.get("judged")
                    and query(c["gen"]) == q]
            if not made:  # a real retrieval, or a round's step judged before its chunk
                out["unproduced"] += not rejected
                continue
            for c in made:
                c["judged"] = True
            out["speculated"] += 1
            if not rejected and top == made[-1]["doc"]:
                out["accepted"] += 1
            rejected = rejected or top != made[-1]["doc"]
    return out


@pytest.fixture(scope="module")
def engine(small_indexes, tiny_lm):
    return RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())


@pytest.mark.parametrize("spec", SPECS, ids=["sync-stride1", "sync-stride3", "async-last", "os3-async"])
def test_speculation_figures_match_the_calls_they_count(engine, spec):
    async def run(question):
        chunks, searches, clock = [], [], Clock()
        naive = await engine.generate(question, gen=GEN, speculate=False)
        res = await engine.generate(question, gen=GEN, spec=spec, lm_client=LoggedLM(engine.direct_lm, chunks, clock),
                                    search_client=LoggedSearch(engine.retriever, searches, clock))
        return naive, res, chunks, searches

    for question in QUESTIONS:
        naive, res, chunks, searches = asyncio.run(run(question))
        assert res.token_ids == naive.token_ids
        s, truth = res.stats, recomputed(engine, question, chunks, searches, res.token_ids)
        assert s["cancelled"] == 0 and s["refined"] == 0
        reported = {"speculated": s["speculated"], "accepted": s["accepted"], "rollbacks": s["rollbacks"],
                    "wasted_tokens": s["wasted_tokens"], "unproduced": s["verified_steps"] + s.get("verified_ahead", 0),
                    "searches": s["rounds"] + s["verified_steps"]}
        assert reported == truth, (question, s)
        kinds = [e["kind"] for e in res.trace]
        assert kinds.count("rollback") == s["rollbacks"], kinds  # a 0-token correction is a "correct"
        assert sum(int(k) * n for k, n in s["acceptance_histogram"].items()) == s["accepted"]
        if spec.fixed_stride == 1 and not spec.async_verify and not spec.os3:
            assert s["speculated"] == 0 and s.get("verified_ahead") == s["rounds"] > 0


class ReadHits(list):
    """One query's hits; logs the search when the engine reads a hit (the round's judge does)."""

    def __init__(self, hits, search):
        super().__init__(hits)
        self.search = search

    def __getitem__(self, i):
        self.search.setdefault("read", next(self.search["order"]))
        return super().__getitem__(i)


class SlowLoggedSearch:
    """The real retriever behind a FAKE latency of ``delay_s`` per batched search (so rounds pile
    up in flight and a rollback cancels some); logs every search, whether it was cancelled during
    the latency, and whether (and in which order) the engine read its hits."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s, self.log = inner, delay_s, []
        self.reads = iter(range(10**9))

    async def search(self, queries, k):
        entry = {"queries": list(queries), "order": self.reads}
        self.log.append(entry)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            entry["cancelled"] = True
            raise
        return [ReadHits(h, entry) for h in await self.inner.search(queries, k)]


def test_verify_batch_sizes_count_the_applied_rounds_not_the_cancelled_ones(engine):
    """``verify_batch_sizes`` / ``strides`` (``/metrics`` ``ralmspec_request_verify_batch_size``)
    hold one entry per APPLIED round: a round in flight that an earlier round's rollback cancelled
    is in ``cancelled`` / ``cancelled_steps``. They were recorded at submission: with asynchronous
    rounds 3 deep behind a slow search, a request of 9 rounds (8 cancelled) reported 17 batches."""
    spec = SpeculationConfig(os3=False, fixed_stride=2, prefetch=1, async_verify=True, max_inflight=3, guesser="last")
    gen = GenerationConfig(stride=2, query_len=16, max_new_tokens=24, passage_tokens=64)
    cancelled = 0
    for question in QUESTIONS:
        slow = SlowLoggedSearch(engine.retriever, delay_s=0.2)

        async def run():
            naive = await engine.generate(question, gen=gen, speculate=False)
            return naive, await engine.generate(question, gen=gen, spec=spec, search_client=slow)

        naive, res = asyncio.run(run())
        assert res.token_ids == naive.token_ids
        s = res.stats
        used = sorted((e for e in slow.log[1:] if "read" in e), key=lambda e: e["read"])  # [0]: the first retrieval
        assert "read" in slow.log[0]
        assert s["verify_batch_sizes"] == [len(e["queries"]) for e in used], s
        rounds = s["rounds"]
        assert len(s["strides"]) == len(s["verify_batch_sizes"]) == rounds == sum(s["acceptance_histogram"].values())
        assert set(s["strides"]) == {2}
        submitted = [e["size"] for e in res.trace if e["kind"] == "submit"]
        assert len(submitted) == s["rounds"] + s["cancelled"]
        assert sum(submitted) == sum(s["verify_batch_sizes"]) + s["cancelled_steps"]
        unread = [e for e in slow.log[1:] if "read" not in e]  # started, never judged
        assert s["cancelled_steps"] >= sum(len(e["queries"]) for e in unread)
        assert s["cancelled"] >= sum(1 for e in unread if e.get("cancelled"))
        cancelled += s["cancelled"]
    assert cancelled > 0, "no round was cancelled: the case tests nothing"
