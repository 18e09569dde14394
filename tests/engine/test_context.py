"""RalmContext.encode_prompt at the edges of the context budget (engine/context.py): the limit a
refusal names, and the room a closed-book chat question has; DirectLM's session release."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from ralmspec.config import GenerationConfig
from ralmspec.engine.context import PassageTokens, RalmContext
from ralmspec.engine.prompt import PromptFormat
from ralmspec.errors import ConfigError
from tests.tokenizer_kinds import llama3_tokenizer

PASSAGE = "Robert Boulter\nRobert Boulter is an English film , television and theatre actor ."


def _context(lm, gen: GenerationConfig, fmt: PromptFormat, closed_book: bool = False) -> RalmContext:
    retriever = SimpleNamespace(corpus=[SimpleNamespace(content=PASSAGE)])
    return RalmContext(lm, retriever, PassageTokens(lm, retriever), None, None, gen, fmt, closed_book=closed_book)


def _question(tok, fmt: PromptFormat, n: int, after_passage: bool) -> str:
    """A question of exactly ``n`` tokens in ``fmt``."""
    for k in range(n, 0, -1):
        q = "x" + " y" * (k - 1)
        if len(fmt.encode_question(tok, q, after_passage)) == n:
            return q
    raise AssertionError(f"no question of {n} tokens")


def test_a_closed_book_chat_question_has_the_room_its_input_leaves():
    """A closed-book input has no passage separator (PromptFormat.build), but the check counted it:
    a question that fits was refused, the message naming one token less than fits."""
    tok = llama3_tokenizer()
    fmt = PromptFormat.chat(tok, ())
    lm = SimpleNamespace(tokenizer=tok, max_context=256)
    gen = GenerationConfig(max_new_tokens=8)
    room = 256 - 8 - 1 - fmt.template_tokens()  # closed book: the template around the question only
    assert fmt.overhead() > fmt.template_tokens()  # the separator takes room with a passage
    q = _question(tok, fmt, room, after_passage=False)
    ctx = _context(lm, gen, fmt, closed_book=True)
    ids = ctx.encode_prompt(q)
    assert len(ctx.lm_prompt(None, ids, len(ids), 8)) + 8 <= 256  # it fits
    with pytest.raises(ConfigError, match=f"at most {room} fit"):
        _context(lm, gen, fmt, closed_book=True).encode_prompt(_question(tok, fmt, room + 1, after_passage=False))
    # with a passage the separator counts: the same question is one token too many
    with pytest.raises(ConfigError, match=f"at most {256 - 8 - 1 - fmt.overhead()} fit"):
        _context(lm, gen, fmt).encode_prompt(_question(tok, fmt, room, after_passage=True))
    q = _question(tok, fmt, 256 - 8 - 1 - fmt.overhead(), after_passage=True)
    ctx = _context(lm, gen, fmt)
    ids = ctx.encode_prompt(q)
    assert len(ctx.lm_prompt(0, ids, len(ids), 8)) + 8 <= 256


def test_a_static_runners_slot_length_is_named_where_it_caps_the_context(monkeypatch):
    """The static runners cap the context at their slot length (2,048 on the CPU: SmolLM2's 8,192
    became 2,048 under `ralmspec serve`'s batched runner), and a request eager accepts was refused
    naming "the model's context of 2048": now the slot length, the model's own context and the
    way out. Views keep the cap; the kNN-LM's check names it too."""
    from ralmspec.knnlm.model import KNNLM
    from ralmspec.lm import hf
    from ralmspec.lm.models import load_lm

    monkeypatch.setitem(hf.STATIC_SLOT_LENGTH, "cpu", 256)  # tiny's 1,024 positions, capped
    lm = load_lm("tiny", runner="static")
    eager = load_lm("tiny", runner="eager")
    assert (lm.max_context, lm.model_context, eager.max_context, eager.context_cap) == (256, 1024, 1024, None)
    plain = PromptFormat.for_tokenizer("plain", lm.tokenizer)
    gen = GenerationConfig(max_new_tokens=300, prompt_format="plain")
    _context(eager, gen, plain).encode_prompt("the roman empire")  # fits the model's context
    why = (r"the static LM runner's slot length of 256 tokens \(the model's own context is 1024; "
           r"the eager LM runner holds it\)")
    with pytest.raises(ConfigError, match=why):
        _context(lm, gen, plain).encode_prompt("the roman empire")
    view = lm.view()
    assert (view.max_context, view.context_cap) == (256, lm.context_cap)
    assert lm.view(runner="eager").max_context == 1024
    with pytest.raises(ConfigError, match="exceeds " + why):
        KNNLM.check_prompt(SimpleNamespace(lm=lm, vocab_size=lm.vocab_size), "the roman empire", 300)
    with pytest.raises(ConfigError, match=r"leaves no room in the model's context of 1024 tokens$"):
        _context(eager, GenerationConfig(max_new_tokens=1023, prompt_format="plain"), plain).encode_prompt("x")


def test_a_request_cancelled_as_its_lm_call_starts_leaves_no_session_behind(tiny_lm, small_indexes):
    """A request cancelled while its LM call ran in a thread but had not yet taken the LM's lock
    (a busy machine) released its session first; the call then stored the session's KV, left
    behind: a static runner's KV slot, held until evicted (DirectLM). Now the call releases it."""
    from ralmspec.config import EngineConfig
    from ralmspec.engine.core import RalmEngine

    lm = tiny_lm.view(runner="static")  # a backend of its own, with a slot pool to count
    engine = RalmEngine(lm, small_indexes["bm25"], EngineConfig())
    entered, go = threading.Event(), threading.Event()
    generate = lm.generate

    def late(*args, **kwargs):  # the thread runs, the LM's lock is not yet taken
        entered.set()
        go.wait(30)
        return generate(*args, **kwargs)

    lm.generate = late

    async def cancel_it():
        task = asyncio.create_task(engine.generate("Who is Robert Boulter?", speculate=False,
                                                   gen=GenerationConfig(max_new_tokens=8)))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        go.set()

    asyncio.run(cancel_it())  # returns once the thread's call has ended (the loop joins its executor)
    try:
        assert lm.cached_sessions == 0 and len(lm.runner._free) == lm.runner.capacity
    finally:
        engine.close()  # the view and the worker (BM25 has nothing to close)


def test_cancelling_a_request_does_not_wait_on_the_loop_for_its_lm_call(tiny_lm, small_indexes):
    """The cancelled request's release of its session took the LM's lock on the event loop, so
    the loop (every other request of a web app, a notebook) stopped until the running LM call
    ended; it is now left to that call (DirectLM), and the session is still released."""
    from ralmspec.config import EngineConfig
    from ralmspec.engine.core import RalmEngine

    lm = tiny_lm.view()
    engine = RalmEngine(lm, small_indexes["bm25"], EngineConfig())
    entered, go, let_go = threading.Event(), threading.Event(), threading.Event()
    generate = lm.generate

    def long_call(*args, **kwargs):  # a call holding the LM's lock until told (30 s at most), then the real one
        with lm._lock:
            entered.set()
            go.wait(30)
            let_go.set()
        return generate(*args, **kwargs)

    lm.generate = long_call

    async def cancel_it() -> bool:
        task = asyncio.create_task(engine.generate("Who is Robert Boulter?", speculate=False,
                                                   gen=GenerationConfig(max_new_tokens=8)))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        held = not let_go.is_set()  # the cancel was through while the call still held the lock
        go.set()
        return held

    try:
        assert asyncio.run(cancel_it()), "the cancel waited on the loop for the running LM call"
        assert lm.cached_sessions == 0
    finally:
        engine.close()


def test_a_release_while_another_requests_call_runs_does_not_wait_on_the_loop(tiny_lm):
    """Request ``a`` ends while request ``b``'s LM call holds the LM's lock (two requests of one
    engine, no Scheduler: a notebook's ``asyncio.gather``). ``a``'s release took that lock on the
    event loop, which stopped until ``b``'s call ended (0.52 s with smollm2); it is left to the
    thread of ``b``'s call, and ``a``'s session is still released."""
    from ralmspec.engine.context import DirectLM

    lm = tiny_lm.view()
    direct = DirectLM(lm)
    entered, go, let_go = threading.Event(), threading.Event(), threading.Event()
    generate = lm.generate

    def held(prompts, n, sessions=None, sampling=None):  # ``b``'s call holds the LM's lock until told (30 s at most)
        if sessions == ["b"]:
            with lm._lock:
                entered.set()
                go.wait(30)
                let_go.set()
        return generate(prompts, n, sessions, sampling)

    lm.generate = held

    async def go_on() -> tuple[bool, int]:
        await direct.generate([101 + i for i in range(100)], 2, "a")  # a block of KV kept
        b = asyncio.create_task(direct.generate([101, 7592, 2088], 2, "b"))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        held_a = lm.cached_sessions  # ``a``'s (not ``cached_length``: it takes the lock)
        direct.release("a")
        returned_first = not let_go.is_set()  # release returned while ``b``'s call held the lock
        go.set()
        await b
        direct.release("b")
        return returned_first, held_a

    try:
        returned_first, held_a = asyncio.run(go_on())
        assert held_a == 1 and returned_first, "the release waited on the loop for b's call"
        assert lm.cached_sessions == 0  # both released, ``a`` by ``b``'s call
    finally:
        lm.close()
