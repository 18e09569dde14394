"""Session fixtures for kNN-LM tests: >= 30 prompts (in-datastore passage openings,
out-of-datastore ones, NQ questions) and the naive decoder's outputs for them; the datastores
(``knn_datastores``, ``knn_corpus``) are in tests/conftest.py (the kNN-LM server's tests use them too)."""

from __future__ import annotations

import pytest

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="session")
def knn_prompts(tiny_lm, knn_corpus):
    """32 prompts as token ids: 16 passage openings inside the datastore's span, 8 passage
    openings from elsewhere in the corpus, 8 NQ questions."""
    from ralmspec.data.loaders import default_questions

    texts = [knn_corpus[i].text.split(". ")[0] for i in range(0, 48, 3)]
    texts += [knn_corpus[i].text.split(". ")[0] for i in range(500, 3800, 420)]
    texts += [q.question for q in default_questions()[:8]]
    prompts = [tiny_lm.tokenizer.encode(t)[:24] for t in texts]
    assert len(prompts) >= 30 and all(prompts)
    return prompts


@pytest.fixture(scope="session")
def naive_results(tiny_lm, knn_datastores, knn_prompts):
    """index kind -> naive kNN-LM results for every prompt (the oracle)."""
    from ralmspec.knnlm.model import KNNLM, KNNLMConfig

    out = {}
    for kind, ds in knn_datastores.items():
        knn = KNNLM(tiny_lm, ds, KNNLMConfig(k=8, max_new_tokens=MAX_NEW_TOKENS))
        out[kind] = (knn, [knn.generate(p) for p in knn_prompts])
    return out


FALLBACK_WHY = ("OS^3 with its naive fallback speculates only where the costs it measures on this "
                "machine say it pays; the sibling with the fallback off forces speculation")


def check_fallback_sibling(knn, cfg, prompts, naive, n: int = 4) -> None:
    """The forcing sibling of an OS^3 config whose naive fallback may rightly take verified steps
    throughout (tests/identity.py): the same knobs with the fallback off, on ``n`` prompts, must
    speculate in each and still equal the naive loop. Measured 2026-12-05 on 2 cores: a tiny-model
    step with its guess (~9 ms) plus one search (~3 ms; HNSW less) loses to a naive step (~11 ms)
    at γ <= 0.5, so OS^3 falls back, and whether it ever speculates depends on the machine."""
    from dataclasses import replace

    from ralmspec.knnlm.speculative import SpeculativeKNNLM
    from tests.identity import SpeculationCheck

    forced, check = replace(cfg, naive_fallback=False), SpeculationCheck()
    spec = SpeculativeKNNLM(knn, forced)
    for p, a in list(zip(prompts, naive))[:n]:
        r = spec.generate(p)
        check.same(r.tokens, a.tokens, r.stats, where=(p, forced))
    check.ran(min_speculated=n)
