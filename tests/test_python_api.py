"""The Python API (docs/python-api.md): its page runs as written, its names import from
``ralmspec``, and its synchronous calls work where an event loop already runs (a notebook)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import pytest

import ralmspec
from ralmspec import Conversation, GenerationConfig
from ralmspec.config import EngineConfig
from ralmspec.engine.core import RalmEngine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "python-api.md")
QUESTIONS = ["Who is Robert Boulter?", "What is Hed PE?"]


def page_blocks() -> list[str]:
    with open(PAGE, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_page_runs_as_written_with_the_default_model(smollm2_lm, tmp_path, monkeypatch, capsys):
    """Every ``python`` block of docs/python-api.md, in order, in one namespace (the page is one
    session), in an empty folder: its asserts (speculative == naive, with speculation counted in
    the printed stats) hold with the real default model."""
    blocks = page_blocks()
    assert len(blocks) >= 7
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{PAGE}:block{i}", "exec"), namespace)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"docs/python-api.md block {i} failed:\n{block}") from exc
    out = capsys.readouterr().out
    speculated = [int(n) for n in re.findall(r"(\d+) speculated steps", out)]
    assert len(speculated) == 2 and sum(speculated) > 0, out  # naive == naive would prove nothing
    assert (tmp_path / "my-datastore").is_dir() and (tmp_path / "my_passages.jsonl").is_file()


def test_every_public_name_imports_from_the_package_without_loading_torch():
    for name in ralmspec.__all__:
        assert getattr(ralmspec, name) is not None
    assert set(ralmspec.__all__) == {"__version__", *ralmspec._EXPORTS}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ralmspec.nope  # noqa: B018
    code = "import sys, ralmspec; ralmspec.EngineConfig(); print(sorted(m for m in ('torch', 'faiss', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def tiny_engine(tiny_lm, small_indexes):
    return RalmEngine(tiny_lm, small_indexes["exact"], EngineConfig())


def test_sync_calls_work_inside_a_running_event_loop(tiny_engine, knn_datastores, tiny_lm):
    """In a notebook an event loop runs in the caller's thread, where ``asyncio.run`` raises
    (and leaked the un-awaited coroutine). ``generate_sync``, ``run_bench`` and
    ``SpeculativeKNNLM.generate`` run there too, with the answers they give outside one."""
    from ralmspec.bench import run_bench
    from ralmspec.config import SpeculationConfig
    from ralmspec.knnlm.model import KNNLM, KNNLMConfig
    from ralmspec.knnlm.speculative import SpeculativeKNNConfig, SpeculativeKNNLM

    gen = GenerationConfig(max_new_tokens=16)
    forced = SpeculationConfig(os3=False, fixed_stride=3)  # speculate whatever the timings (a busy CI machine)
    knn = KNNLM(tiny_lm, knn_datastores["flat"], KNNLMConfig(max_new_tokens=12))
    naive = [tiny_engine.generate_sync(q, gen=gen, speculate=False).token_ids for q in QUESTIONS]
    knn_naive = knn.generate("The storm formed").tokens

    async def in_a_loop():
        spec = [tiny_engine.generate_sync(q, gen=gen, spec=forced) for q in QUESTIONS]
        summaries, _ = run_bench(tiny_engine, QUESTIONS, gen, {"spec": forced}, "exact", warmup=False)
        knn_spec = SpeculativeKNNLM(knn, SpeculativeKNNConfig(os3=False, fixed_stride=3)).generate("The storm formed")
        return spec, summaries, knn_spec

    spec, summaries, knn_spec = asyncio.run(in_a_loop())
    assert [r.token_ids for r in spec] == naive
    assert sum(r.stats["speculated"] for r in spec) > 0
    assert summaries[0].identical_fraction == 1.0 and summaries[0].speculated_steps > 0
    assert knn_spec.tokens == knn_naive and knn_spec.stats.speculated > 0


def test_generate_sync_takes_a_conversation_with_lists(smollm2_lm, embedded_indexes):
    """A ``Conversation`` built from Python lists (as a caller writes it) works as tuples do;
    a malformed turn is a ``ConfigError`` naming it."""
    engine = RalmEngine(smollm2_lm, embedded_indexes["bm25"], EngineConfig())
    gen = GenerationConfig(max_new_tokens=6)
    as_lists = Conversation([["system", "Be brief."]], "Who is Robert Boulter?")
    as_tuples = Conversation((("system", "Be brief."),), "Who is Robert Boulter?")
    assert as_lists == as_tuples and hash(as_lists) == hash(as_tuples)
    assert (engine.generate_sync(as_lists, gen=gen, speculate=False).token_ids
            == engine.generate_sync(as_tuples, gen=gen, speculate=False).token_ids)
    for bad in ([("system",)], [("robot", "hi")], "system: hi", [("user", 3)]):
        with pytest.raises(ralmspec.ConfigError, match="history"):
            Conversation(bad, "q")
    with pytest.raises(ralmspec.ConfigError, match="question must be a string"):
        Conversation([], None)


def test_an_engine_is_a_context_manager_that_closes_it(tiny_engine):
    closed = []

    class Probe(RalmEngine):
        def close(self):
            closed.append(True)

    with Probe(tiny_engine.lm, tiny_engine.retriever, EngineConfig()) as engine:
        assert isinstance(engine, Probe)
    assert closed == [True]


@pytest.mark.parametrize("kwargs, says", [
    ({"gen": {"max_new_tokens": 3}}, "gen must be a GenerationConfig or None, got dict"),
    ({"spec": GenerationConfig()}, "spec must be a SpeculationConfig or None, got GenerationConfig"),
    ({"speculate": "no"}, "speculate must be True, False or None, got 'no'"),
    ({"retrieval": None}, "retrieval must be True or False, got None"),
    ({"retries": -1}, r"retries must be an integer >= 0, got -1"),
    ({"timeout_s": -1}, r"timeout_s must be a finite number of seconds >= 0 \(0: no limit\), got -1"),
    ({"timeout_s": "30"}, "timeout_s must be a number of seconds, got '30'"),
])
def test_a_python_callers_wrong_arguments_are_config_errors(tiny_engine, kwargs, says):
    """A dict for a config was an AttributeError; speculate="no" speculated (a truthy string);
    retries=-1 and timeout_s=-1 were RetrievalErrors ("knowledge base unavailable after 0
    attempts") though no search had failed. Now a ConfigError before any work."""
    with pytest.raises(ralmspec.ConfigError, match=says):
        tiny_engine.generate_sync("Who is Robert Boulter?", **kwargs)


def test_configs_take_what_python_callers_write(tiny_lm, small_indexes):
    assert GenerationConfig(stop=["\n", "."]).stop == ("\n", ".")  # a list, kept as a tuple
    with pytest.raises(ralmspec.ConfigError, match="stop must be a tuple .or list. of non-empty strings"):
        GenerationConfig(stop="\n")
    with pytest.raises(ralmspec.ConfigError, match="config must be an EngineConfig, got dict"):
        ralmspec.build_engine({"model": "tiny"})
    with pytest.raises(ralmspec.ConfigError, match="config must be an EngineConfig or None, got dict"):
        RalmEngine(tiny_lm, small_indexes["bm25"], {"model": "tiny"})


def test_chat_messages_and_bad_deadlines_are_named(tiny_engine):
    """OpenAI-style messages given as the prompt said only "prompt must be a non-empty string";
    a Scheduler deadline of -1 or 0 was a RequestTimeoutError ("exceeded its deadline of -1 s")
    and "soon" a TypeError."""
    from ralmspec.engine.scheduler import Scheduler

    with pytest.raises(ralmspec.ConfigError, match=r"prompt must be a string or a Conversation \(chat messages"):
        tiny_engine.generate_sync([{"role": "user", "content": "Who is Robert Boulter?"}])

    async def deadlines():
        async with Scheduler(tiny_engine) as scheduler:
            for bad in (-1, 0, "soon", float("inf")):
                with pytest.raises(ralmspec.ConfigError, match="timeout_s must be a (finite )?number of seconds"):
                    await scheduler.generate("Who is Robert Boulter?", timeout_s=bad)
            return await scheduler.generate("Who is Robert Boulter?", gen=GenerationConfig(max_new_tokens=4),
                                            timeout_s=None)

    assert len(asyncio.run(deadlines()).token_ids) == 4


def test_a_results_dict_carries_its_prompt_tokens(tiny_engine):
    r = tiny_engine.generate_sync("Who is Robert Boulter?", gen=GenerationConfig(max_new_tokens=4))
    d = r.to_dict(with_trace=False)
    assert d["prompt_tokens"] == r.prompt_tokens == len(r.prompt_ids) + r.template_tokens and "trace" not in d


def test_a_closed_engine_its_lm_and_a_knnlm_on_it_refuse_requests(tiny_engine, tiny_lm, small_indexes,
                                                                   knn_datastores):
    """After ``close()`` an engine answered on (its LM keeps its weights), and so did a Scheduler
    built on it, the closed LM and a kNN-LM over it: each is a ``ClosedError`` now, which a
    scheduler's own refusal after ``async with`` is too; closing twice is harmless."""
    from ralmspec.engine.scheduler import Scheduler, SchedulerClosedError
    from ralmspec.knnlm.model import KNNLM, KNNLMConfig
    from ralmspec.knnlm.speculative import SpeculativeKNNLM

    lm = tiny_lm.view()  # a backend of its own: closing it leaves the session's LM open
    engine = RalmEngine(lm, small_indexes["bm25"], EngineConfig())  # BM25 has nothing to close
    knn = KNNLM(lm, knn_datastores["flat"], KNNLMConfig(max_new_tokens=4))
    gen = GenerationConfig(max_new_tokens=4)
    assert len(engine.generate_sync(QUESTIONS[0], gen=gen).token_ids) == 4
    engine.close()
    engine.close()
    lm.release("sched-1")  # a late release (a scheduler's) stays harmless
    for call in (lambda: engine.generate_sync(QUESTIONS[0], gen=gen),
                 lambda: asyncio.run(engine.generate(QUESTIONS[0], gen=gen)),
                 lambda: engine.check_request(QUESTIONS[0]),
                 lambda: Scheduler(engine),
                 lambda: lm.generate([[1, 2, 3]], 2),
                 lambda: knn.generate("The storm formed"),
                 lambda: SpeculativeKNNLM(knn).generate("The storm formed")):
        with pytest.raises(ralmspec.ClosedError, match="closed"):
            call()
    assert tiny_lm.greedy([[1, 2, 3]], 2)  # the weights still serve the session's LM

    async def after_exit():
        async with Scheduler(tiny_engine) as scheduler:
            pass
        await scheduler.generate(QUESTIONS[0], gen=gen)

    with pytest.raises(SchedulerClosedError, match="scheduler is closed") as refused:
        asyncio.run(after_exit())
    assert isinstance(refused.value, ralmspec.ClosedError)


def test_a_call_waiting_for_the_lm_while_it_closes_is_refused(tiny_lm):
    """A call that had passed the closed check and waited for the LM's lock while ``close()``
    ran went on to run the model on the closed backend; it is checked again under the lock."""
    import threading

    lm = tiny_lm.view()
    out: list[object] = []

    def call():
        try:
            out.append(lm.generate([[1, 2, 3]], 2))
        except Exception as exc:  # noqa: BLE001 - the test reads it
            out.append(exc)

    with lm._lock:  # the call passes its checks and waits here, as behind another request's call
        t = threading.Thread(target=call)
        t.start()
        t.join(0.3)
        lm.closed = True  # what close() sets, under this lock, before it frees the buffers
    t.join(30)
    assert len(out) == 1 and isinstance(out[0], ralmspec.ClosedError), out


def test_build_engine_closes_what_it_opened_when_the_engine_refuses_the_config(monkeypatch):
    """A config the engine refuses at start-up (the chat format for a model without a chat
    template) left the loaded LM and the opened knowledge base to the garbage collector (a vLLM
    engine's or a Ray cluster's processes lived on); both are closed before the error is raised."""
    from ralmspec.lm.hf import HFLanguageModel
    from ralmspec.retrieval import open as kb_open

    closed = []

    class KnowledgeBase:  # stands in for the opened index
        corpus: list = []

        def close(self) -> None:
            closed.append("knowledge base")

    monkeypatch.setattr(kb_open, "open_knowledge_base", lambda *args, **kwargs: KnowledgeBase())
    monkeypatch.setattr(HFLanguageModel, "close", lambda self: closed.append("lm"))
    with pytest.raises(ralmspec.ConfigError, match="chat template"):
        ralmspec.build_engine(EngineConfig(model="tiny", generation=GenerationConfig(prompt_format="chat")),
                              show_progress=False)
    assert sorted(closed) == ["knowledge base", "lm"]


def test_one_engine_answers_threads_as_it_answers_one_caller(tiny_lm, small_indexes):
    """A threaded web app's engine: 8 threads call ``generate_sync`` at once (naive and forced
    speculation, greedy and seeded sampling, one of them from inside a running event loop) and
    each gets the tokens it gets alone; every LM session and KV slot is released and no thread
    is left behind."""
    import threading

    from ralmspec.config import SpeculationConfig
    from tests.concurrent import raised, run_together

    lm = tiny_lm.view(runner="static")
    engine = RalmEngine(lm, small_indexes["hnsw"], EngineConfig())
    forced = SpeculationConfig(os3=False, fixed_stride=3, prefetch=1, async_verify=True)
    gens = [GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=12, temperature=0.8, seed=3)]
    calls = [dict(prompt=QUESTIONS[i % 2], gen=gens[i // 2 % 2], speculate=i % 4 != 3) for i in range(8)]

    def call(i: int):
        return engine.generate_sync(calls[i]["prompt"], gen=calls[i]["gen"], speculate=calls[i]["speculate"],
                                    spec=forced)

    async def in_a_loop(i: int):
        return call(i)

    alone = [call(i).token_ids for i in range(8)]
    threads = threading.active_count()
    got = run_together(8, lambda i: asyncio.run(in_a_loop(i)) if i == 5 else call(i))
    assert raised(got) == []
    assert [r.token_ids for r in got] == alone
    assert all(r.stats["speculated"] > 0 for r, c in zip(got, calls) if c["speculate"])
    assert lm.cached_sessions == 0 and len(lm.runner._free) == lm.runner.capacity
    assert threading.active_count() <= threads


def test_a_closed_engine_kept_in_a_variable_lets_go_of_its_model_and_index(small_corpus, tmp_path):
    """``close()`` drops the engine's references to its LM (the torch weights), its knowledge
    base and what it built on them, so they are freed while the closed engine object is still
    referenced (a notebook variable); what is left raises ``ClosedError``. They stayed alive
    until the engine object itself went: a weakref to the model still answered after close()."""
    import gc
    import weakref

    from ralmspec.config import RetrievalConfig
    from ralmspec.lm.models import load_lm
    from ralmspec.retrieval.index import build_index, load_retriever

    cfg = RetrievalConfig(kind="bm25")
    lm = load_lm("tiny")  # its own weights (the session's tiny LM stays referenced elsewhere)
    retriever = load_retriever(build_index(small_corpus, "bm25", str(tmp_path / "bm25"), cfg, None,
                                           show_progress=False), cfg)
    engine = RalmEngine(lm, retriever, EngineConfig())
    gen = GenerationConfig(max_new_tokens=4)
    assert len(engine.generate_sync(QUESTIONS[0], gen=gen, speculate=True).token_ids) == 4
    weights, lm_ref, kb_ref = weakref.ref(lm.model), weakref.ref(lm), weakref.ref(retriever)
    mib = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    del lm, retriever
    gc.collect()
    assert weights() is not None, "the open engine holds its model"
    engine.close()
    gc.collect()
    assert weights() is None and lm_ref() is None and kb_ref() is None, f"{mib:.1f} MiB of weights still held"
    for use in (lambda: engine.lm.tokenizer, lambda: engine.retriever.search_sync(["x"], 1),
                lambda: engine.generate_sync(QUESTIONS[0]), lambda: engine.check_request(QUESTIONS[0])):
        with pytest.raises(ralmspec.ClosedError, match="closed"):
            use()
    engine.close()  # still harmless
