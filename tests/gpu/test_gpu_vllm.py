"""vLLM on CUDA against the HF backend on CUDA (float32), and the engine end to end on a GPU.

Skipped without CUDA (conftest) or without a CUDA build of vLLM. On a GPU the two backends run
different float32 kernels (and vLLM batches prompts through shared GEMMs and reuses cached KV
blocks), so a greedy argmax may flip where the top-2 logits are numerically tied. Rule used by
every comparison below: two token lists must agree up to their first difference, and there
the HF backend's top-2 logit gap must be below ``NEAR_TIE``; any other difference fails. The
agreement rates are printed (run with ``-s``) so they can be copied into docs/vllm.md.

The end-to-end test asserts invariant 1 (speculative == naive) strictly, with the vLLM backend
and a faiss-gpu exact index: if it fails on a GPU, see docs/vllm.md ("batch invariance").
"""

from __future__ import annotations

import os

import pytest

from ralmspec.lm.vllm import vllm_available

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "random-small"  # GPT-2-small shape, random seeded weights
PASSAGE_TOKENS = 256
N_NEW = 16
NEAR_TIE = 1e-3  # GPU float32 kernels differ more than CPU ones (CPU: |dlogprob| <= 1.5e-6)


def _vllm_cuda() -> bool:
    if not vllm_available():
        return False
    try:
        from vllm.platforms import current_platform
    except Exception:  # noqa: BLE001 - a broken install is "not available" here
        return False
    return str(current_platform.device_type) == "cuda"


pytestmark = [pytest.mark.vllm]
needs_vllm_cuda = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (pip install vllm)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from ralmspec.lm.vllm import builtin_folder

    return builtin_folder(MODEL, tmp_path_factory.mktemp("gpu-models"))


@pytest.fixture(scope="module")
def hf_cuda(folder):
    from ralmspec.lm.models import load_lm

    return load_lm(str(folder), device="cuda", dtype="float32")


@pytest.fixture(scope="module")
def vllm_cuda(folder):
    if not _vllm_cuda():
        pytest.skip("the installed vLLM is not a CUDA build")
    from ralmspec.lm.vllm import load_vllm

    lm = load_vllm(str(folder), device="cuda", dtype="float32")
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def prompts(hf_cuda):
    """48 RaLM-shaped prompts: 16 passages (256 tokens) x 3 NQ questions."""
    from ralmspec.data.loaders import default_corpus, default_questions

    tok = hf_cuda.tokenizer
    passages = list(default_corpus())[:16]
    questions = [q.question for q in default_questions()[:48]]
    return [tok.encode(f"{passages[i // 3].title}\n{passages[i // 3].text}")[:PASSAGE_TOKENS] + tok.encode(q)
            for i, q in enumerate(questions)]


@pytest.fixture(scope="module")
def hf_tokens(hf_cuda, prompts):
    return hf_cuda.greedy(prompts, N_NEW)


def check_near_ties(ref_lm, prompts, expected, got, label: str) -> int:
    """Number of identical lists; fails on any difference that is not at a near-tie of ``ref_lm``."""
    same = 0
    for i, (a, b) in enumerate(zip(expected, got)):
        j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if j is None and len(a) == len(b):
            same += 1
            continue
        assert j is not None, f"{label}: prompt {i}: one run stopped early: {a} vs {b}"
        logits = ref_lm.next_token_states([prompts[i] + a[:j]], hidden=False)[0].logits
        top = logits.topk(2).values
        gap = float(top[0] - top[1])
        assert gap < NEAR_TIE, f"{label}: prompt {i} differs at step {j} with top-2 gap {gap:.3g}: {a} vs {b}"
    print(f"\n[gpu] {label}: identical {same}/{len(expected)}")
    return same


@needs_vllm_cuda
def test_vllm_cuda_matches_hf_cuda(vllm_cuda, hf_cuda, prompts, hf_tokens):
    vllm_cuda.reset_prefix_cache()
    got = vllm_cuda.greedy(prompts, N_NEW)
    same = check_near_ties(hf_cuda, prompts, hf_tokens, got, "vLLM(cuda) vs HF(cuda), float32")
    assert same >= len(prompts) // 2


@needs_vllm_cuda
def test_prefix_cache_hit_equals_cold(vllm_cuda, hf_cuda, prompts):
    vllm_cuda.reset_prefix_cache()
    cold = vllm_cuda.greedy(prompts, N_NEW)
    warm = vllm_cuda.greedy(prompts, N_NEW)
    assert vllm_cuda.last_call_stats.cached_tokens >= sum((len(p) - 1) // 16 * 16 for p in prompts)
    check_near_ties(hf_cuda, prompts, cold, warm, "vLLM(cuda) prefix-cache hit vs cold")


@needs_vllm_cuda
def test_batch_vs_alone(vllm_cuda, hf_cuda, prompts):
    subset = prompts[:12]
    vllm_cuda.reset_prefix_cache()
    batched = vllm_cuda.greedy(subset, N_NEW)
    alone = []
    for p in subset:
        vllm_cuda.reset_prefix_cache()
        alone.append(vllm_cuda.greedy([p], N_NEW)[0])
    check_near_ties(hf_cuda, subset, alone, batched, "vLLM(cuda) batch of 12 vs each alone")


@needs_vllm_cuda
def test_engine_end_to_end_on_gpu(vllm_cuda, tmp_path_factory, small_corpus):
    """Invariant 1 with the vLLM backend on CUDA and a faiss-gpu exact index (strict)."""
    import asyncio

    from ralmspec.config import EngineConfig, GenerationConfig, RetrievalConfig, SpeculationConfig
    from ralmspec.data.loaders import default_questions
    from ralmspec.engine.core import RalmEngine
    from ralmspec.engine.scheduler import Scheduler, SchedulerConfig
    from ralmspec.retrieval.dense import faiss_gpu_available
    from tests.identity import SpeculationCheck
    from ralmspec.retrieval.index import build_index
    from ralmspec.retrieval.open import open_knowledge_base

    if not faiss_gpu_available():
        pytest.skip("faiss has no GPU support here (pip install faiss-gpu-cu12)")
    d = build_index(small_corpus, "exact", str(tmp_path_factory.mktemp("gpu-kb") / "exact"),
                    RetrievalConfig(kind="exact"), show_progress=False)
    retriever = open_knowledge_base(RetrievalConfig(kind="exact", device="cuda", index_dir=d))
    assert retriever.faiss_device == "cuda"
    engine = RalmEngine(vllm_cuda, retriever, EngineConfig())
    questions = [q.question for q in default_questions()[100:116]]
    gen = GenerationConfig(stride=4, query_len=32, max_new_tokens=32, passage_tokens=256)
    # one at a time: a fixed stride verified beside decoding, which speculates whatever the GPU's
    # costs; concurrently: OS^3 without its naive fallback (it may choose one-step synchronous
    # rounds, the naive loop, so only the first half must speculate)
    forced = SpeculationConfig(prefetch=20, os3=False, fixed_stride=3, async_verify=True)
    spec = SpeculationConfig(prefetch=20, os3=True, async_verify=True, naive_fallback=False)

    async def go():
        naive = [await engine.generate(q, gen=gen, speculate=False) for q in questions]
        one = [await engine.generate(q, gen=gen, spec=forced, speculate=True) for q in questions]
        sched = Scheduler(engine, SchedulerConfig(max_concurrent=len(questions), max_queue=0))
        try:
            conc = await asyncio.gather(*(sched.generate(q, gen=gen, spec=spec) for q in questions))
        finally:
            await sched.aclose()
        return naive, one, conc

    naive, one, conc = asyncio.run(go())
    bad_one = [i for i, (a, b) in enumerate(zip(naive, one)) if a.token_ids != b.token_ids]
    bad_conc = [i for i, (a, b) in enumerate(zip(naive, conc)) if a.token_ids != b.token_ids]
    print(f"\n[gpu] engine: speculative==naive {len(questions) - len(bad_one)}/{len(questions)}, "
          f"16 concurrent==naive {len(questions) - len(bad_conc)}/{len(questions)}")
    assert not bad_one, f"speculative != naive on questions {bad_one} (vLLM cuda)"
    assert not bad_conc, f"concurrent speculative != naive on questions {bad_conc} (vLLM cuda, batched)"
    check = SpeculationCheck()
    for a, b in zip(naive + naive, one + conc):
        check.same(b.token_ids, a.token_ids, b.stats)
    check.ran(min_speculated=len(questions))
    retriever.close()


@needs_vllm_cuda
def test_batch_invariant_mode(folder, hf_cuda, prompts, vllm_cuda):
    """vLLM's VLLM_BATCH_INVARIANT=1 mode: batch == alone and warm == cold must then be exact.

    Skipped (with vLLM's reason) where the mode does not support this model / dtype / GPU.
    """
    from ralmspec.errors import ModelLoadError
    from ralmspec.lm.vllm import load_vllm

    vllm_cuda.close()  # one engine on the GPU at a time (the module fixture's is no longer needed)
    try:
        lm = load_vllm(str(folder), device="cuda", dtype="float32", batch_invariant=True)
    except ModelLoadError as exc:
        pytest.skip(f"VLLM_BATCH_INVARIANT=1 not supported here: {exc}")
    try:
        subset = prompts[:12]
        lm.reset_prefix_cache()
        batched = lm.greedy(subset, N_NEW)
        warm = lm.greedy(subset, N_NEW)
        alone = []
        for p in subset:
            lm.reset_prefix_cache()
            alone.append(lm.greedy([p], N_NEW)[0])
        assert batched == alone
        assert warm == batched
    finally:
        lm.close()
