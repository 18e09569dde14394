"""Session fixtures for kNN-LM tests: one ~20k-token datastore over the embedded corpus with the
"tiny" LM (flat index), plus IVF and HNSW indexes over the SAME entries (reindexed, no second
LM pass), and >= 30 prompts (in-datastore passage openings, out-of-datastore ones, NQ questions)."""

from __future__ import annotations

import pytest

DATASTORE_TOKENS = 20_000
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="session")
def knn_corpus():
    from ralmspec.data.loaders import default_corpus

    return default_corpus()


@pytest.fixture(scope="session")
def knn_datastores(tmp_path_factory, tiny_lm, knn_corpus):
    """{"flat": Datastore, "ivf": Datastore, "hnsw": Datastore} over identical entries."""
    from ralmspec.knnlm.datastore import DatastoreBuildConfig, build_datastore, reindex_datastore

    root = tmp_path_factory.mktemp("knnlm")
    flat = build_datastore(tiny_lm, knn_corpus, root / "flat",
                           DatastoreBuildConfig(max_tokens=DATASTORE_TOKENS, window=128, stride=96, batch_size=16),
                           progress=False)
    ivf = reindex_datastore(flat.path, root / "ivf", DatastoreBuildConfig(index="ivf", ivf_nlist=64, ivf_nprobe=4))
    hnsw = reindex_datastore(flat.path, root / "hnsw",
                             DatastoreBuildConfig(index="hnsw", hnsw_m=16, hnsw_ef_construction=40, hnsw_ef_search=16))
    return {"flat": flat, "ivf": ivf, "hnsw": hnsw}


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
