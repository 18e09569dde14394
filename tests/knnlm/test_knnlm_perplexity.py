"""`ralmspec knnlm eval`: perplexity of the base LM and the kNN-LM (ralmspec.knnlm.perplexity).

Real parts only: the tiny transformer (SmolLM2 where the real model's LM head matters), real
FAISS datastores over the shipped WikiText-103 text."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ralmspec.errors import ConfigError
from ralmspec.knnlm.datastore import DatastoreBuildConfig, build_datastore, load_datastore, reindex_datastore, \
    window_plan
from ralmspec.knnlm.perplexity import PerplexityConfig, evaluate_perplexity
from ralmspec.knnlm.texts import embedded_articles, load_documents

WINDOW, STRIDE = 64, 48  # the test datastore's key windows, also the eval windows below
ARTICLES = 2
EVAL_TOKENS = 300


@pytest.fixture(scope="module")
def inside_docs():
    """The documents the test datastore holds: first halves of the first test articles."""
    return load_documents("wt103:test:first-half")[:ARTICLES]


@pytest.fixture(scope="module")
def outside_docs():
    """Text the datastore does not hold: the second halves of the same articles."""
    return load_documents("wt103:test:second-half")[:ARTICLES]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_lm, inside_docs):
    """{"flat", "ivf"} over the same entries (the IVF one reindexed from the flat one)."""
    root = tmp_path_factory.mktemp("knnlm-ppl")
    flat = build_datastore(tiny_lm, inside_docs, root / "flat",
                           DatastoreBuildConfig(window=WINDOW, stride=STRIDE, batch_size=16), progress=False)
    ivf = reindex_datastore(flat.path, root / "ivf", DatastoreBuildConfig(index="ivf", ivf_nlist=16, ivf_nprobe=2))
    return {"flat": flat, "ivf": ivf}


def _cfg(**kw) -> PerplexityConfig:
    base = dict(context=WINDOW, stride=STRIDE, max_tokens=EVAL_TOKENS)
    return PerplexityConfig(**(base | kw))


def _direct_ppl(model, docs_ids, context: int, stride: int) -> float:
    """Reference: every target j+1 predicted by its own forward over [w0, j] (w0 = the start of
    its block's window, the rule the module states), straight from ``model(...).logits``."""
    nll, n = 0.0, 0
    with torch.inference_mode():
        for ids in docs_ids:
            for j in range(len(ids) - 1):
                b1 = min((j // stride + 1) * stride, len(ids) - 1)
                w0 = max(0, b1 - context)
                logits = model(input_ids=torch.tensor([ids[w0:j + 1]])).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, -1)[ids[j + 1]])
                n += 1
    return math.exp(nll / n)


def test_window_plan_scores_every_entry_once_with_context():
    for entries, window, stride in ((1, 4, 2), (10, 4, 3), (100, 64, 48), (47, 8, 8)):
        plan = list(window_plan(entries, window, stride))
        covered = [j for _, b0, b1 in plan for j in range(b0, b1)]
        assert covered == list(range(entries))
        for w0, b0, b1 in plan:
            assert b1 - w0 <= window and (w0 == 0 or b0 - w0 >= window - stride)


def test_base_perplexity_equals_direct_logits(tiny_lm, stores, outside_docs):
    docs = [d[:200] for d in outside_docs]  # two short documents, several windows each
    ids = [tiny_lm.tokenizer.encode(d) for d in docs]
    res = evaluate_perplexity(tiny_lm, stores["flat"], docs, PerplexityConfig(context=16, stride=6, lams=(0.0,)))
    assert res.tokens == sum(len(x) - 1 for x in ids) and res.documents == 2 and res.tokens > 2 * 16
    assert res.ppl_base == pytest.approx(_direct_ppl(tiny_lm.model, ids, 16, 6), rel=1e-6)
    # one window holding a whole document: the plain cross-entropy of one forward
    one = evaluate_perplexity(tiny_lm, stores["flat"], docs[:1], PerplexityConfig(context=512, stride=511))
    with torch.inference_mode():
        logits = tiny_lm.model(input_ids=torch.tensor([ids[0]])).logits[0, :-1].double()
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[0][1:]))
    assert one.ppl_base == pytest.approx(math.exp(float(ce)), rel=1e-6)


def test_smollm2_base_perplexity_equals_direct_logits(tmp_path, smollm2_lm):
    """The real model: lm_head(final hidden state) is its logits (Llama's final norm included)."""
    text = embedded_articles("valid")[0][1][:250]
    ds = build_datastore(smollm2_lm, [text[:120]], tmp_path / "ds", DatastoreBuildConfig(window=32, stride=24),
                         model_name="smollm2", progress=False)
    res = evaluate_perplexity(smollm2_lm, ds, [text], PerplexityConfig(context=128, stride=127, lams=(0.0, 0.25)))
    ids = smollm2_lm.tokenizer.encode(text)
    assert res.tokens == len(ids) - 1 < 128
    with torch.inference_mode():
        logits = smollm2_lm.model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    assert res.ppl_base == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert res.runs[0].ppl == res.ppl_base and res.runs[1].ppl != res.ppl_base


def test_lam_zero_is_the_base_lm(tiny_lm, stores, outside_docs):
    res = evaluate_perplexity(tiny_lm, stores["flat"], outside_docs, _cfg(lams=(0.0, 0.25), ks=(4, 16)))
    zero = [r for r in res.runs if r.lam == 0.0]
    assert len(zero) == 2 and all(r.ppl == res.ppl_base for r in zero)
    assert all(r.ppl != res.ppl_base for r in res.runs if r.lam > 0)


def test_text_inside_the_datastore_drops_sharply(tiny_lm, stores, inside_docs, outside_docs):
    cfg = _cfg(lams=(0.5,), ks=(8,))
    inside = evaluate_perplexity(tiny_lm, stores["flat"], inside_docs, cfg)
    outside = evaluate_perplexity(tiny_lm, stores["flat"], outside_docs, cfg)
    drop_in = inside.runs[0].ppl / inside.ppl_base
    drop_out = outside.runs[0].ppl / outside.ppl_base
    # an inside query finds its own key among its neighbours (value = its target): p_knn(target)
    # is large, while held-out text gets at best the mild help of similar contexts
    assert inside.runs[0].ppl < inside.ppl_base / 1000
    assert drop_in < drop_out / 100


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_sweep_equals_separate_runs(tiny_lm, stores, outside_docs, kind):
    lams, ks, temps = (0.0, 0.25, 0.5), (2, 8), (1.0, 4.0)
    sweep = evaluate_perplexity(tiny_lm, stores[kind], outside_docs, _cfg(lams=lams, ks=ks, temperatures=temps))
    assert len(sweep.runs) == len(lams) * len(ks) * len(temps)
    got = {(r.lam, r.k, r.temperature): r.ppl for r in sweep.runs}
    assert len(set(got.values())) > len(ks) * len(temps)  # the settings do differ
    for k in ks:
        for t in temps:
            lam = lams[-1]
            single = evaluate_perplexity(tiny_lm, stores[kind], outside_docs,
                                         _cfg(lams=(lam,), ks=(k,), temperatures=(t,)))
            assert single.ppl_base == sweep.ppl_base and single.tokens == sweep.tokens
            assert single.runs[0].ppl == got[(lam, k, t)]


def test_recall_of_an_approximate_index(tiny_lm, stores, outside_docs):
    cfg = _cfg(ks=(4, 16), max_tokens=200)
    assert evaluate_perplexity(tiny_lm, stores["flat"], outside_docs, cfg).recall is None
    path = stores["ivf"].path
    one = evaluate_perplexity(tiny_lm, load_datastore(path, nprobe=1), outside_docs, cfg)
    every = evaluate_perplexity(tiny_lm, load_datastore(path, nprobe=16), outside_docs, cfg)
    assert set(one.recall) == {4, 16} and all(0.0 < v < 1.0 for v in one.recall.values())
    assert every.recall == {4: 1.0, 16: 1.0}  # all lists probed: the exact answer
    exact = evaluate_perplexity(tiny_lm, stores["flat"], outside_docs, cfg)
    assert [r.ppl for r in every.runs] == [r.ppl for r in exact.runs]
    assert evaluate_perplexity(tiny_lm, stores["ivf"], outside_docs, _cfg(recall=False, max_tokens=50)).recall is None


def test_max_tokens_cuts_and_short_documents_are_counted(tiny_lm, stores, outside_docs):
    res = evaluate_perplexity(tiny_lm, stores["flat"], ["", "word", *outside_docs], _cfg(max_tokens=77))
    assert res.tokens == 77 and res.documents == 1 and res.empty_documents == 2


@pytest.mark.parametrize("kw,msg", [
    (dict(lams=(1.0,)), "λ must be in"), (dict(lams=(-0.1,)), "λ must be in"), (dict(lams=()), "at least one"),
    (dict(ks=(0,)), "k must be"), (dict(ks=(2.5,)), "k must be"), (dict(temperatures=(0.0,)), "temperature"),
    (dict(temperatures=(float("inf"),)), "temperature"), (dict(context=1), "context"),
    (dict(context=8, stride=8), "stride"), (dict(stride=0), "stride"), (dict(max_tokens=0), "max_tokens"),
    (dict(search_batch=0), "search_batch"),
])
def test_bad_config_is_a_typed_error(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        PerplexityConfig(**kw)


def test_bad_inputs_are_typed_errors(tiny_lm, stores, tmp_path):
    with pytest.raises(ConfigError, match="no token to score"):
        evaluate_perplexity(tiny_lm, stores["flat"], ["", "a"], _cfg())
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        evaluate_perplexity(tiny_lm, stores["flat"], ["a b c"], PerplexityConfig(context=tiny_lm.max_context + 1))
    with pytest.raises(ConfigError, match="must be strings"):
        evaluate_perplexity(tiny_lm, stores["flat"], [["a"]], _cfg())
    for bad in ("wt103:train", "wt103:test:middle", "wt103:test:all:x", str(tmp_path / "missing.txt")):
        with pytest.raises(ConfigError):
            load_documents(bad)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        load_documents(str(tmp_path / "empty.txt"))


def test_text_sources(tmp_path):
    for split in ("test", "valid"):
        whole = load_documents(f"wt103:{split}")
        first = load_documents(f"wt103:{split}:first-half")
        second = load_documents(f"wt103:{split}:second-half")
        assert len(whole) == len(first) == len(second) == len(embedded_articles(split)) > 0
        for w, a, b in zip(whole, first, second):
            title, body = w.split("\n", 1)
            assert a.startswith(title + "\n") and a.split("\n", 1)[1].split() + b.split() == body.split()
            assert abs(len(a.split("\n", 1)[1].split()) - len(b.split())) <= 1
    raw = " \n = First = \n \n Some words @-@ here . \n \n = Second = \n \n More <unk> text . \n"
    (tmp_path / "wiki.test.tokens").write_text(raw)
    assert load_documents(str(tmp_path / "wiki.test.tokens")) == ["First\nSome words-here.", "Second\nMore <unk> text."]
    (tmp_path / "plain.txt").write_text("one document\n\nstill the same one")
    assert load_documents(str(tmp_path / "plain.txt")) == ["one document\n\nstill the same one"]


def test_a_byte_order_mark_is_not_text(tmp_path):
    """A UTF-8 BOM at the start of a text file was kept as the first document's first character
    (a token of its own in the datastore; a WikiText file's first title was not recognised)."""
    (tmp_path / "bom.txt").write_text("\ufeffone document", encoding="utf-8")
    assert load_documents(str(tmp_path / "bom.txt")) == ["one document"]
    (tmp_path / "wiki.tokens").write_text("\ufeff = First = \n \n Some words . \n", encoding="utf-8")
    assert load_documents(str(tmp_path / "wiki.tokens")) == ["First\nSome words."]


def test_cli_eval_table_and_json(tmp_path, capsys, stores):
    from ralmspec.knnlm.cli import main

    out = tmp_path / "ppl.json"
    argv = ["eval", "--datastore", str(stores["ivf"].path), "--text", "wt103:test:second-half", "--max-documents",
            "1", "--max-tokens", "150", "--lam", "0,0.5", "--k", "4,8", "--json", str(out), "--quiet", "--nprobe", "2"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["tokens"] == 150 and d["ppl_base"] > 1 and len(d["runs"]) == 4
    assert all(set(r) == {"lam", "k", "temperature", "ppl"} for r in d["runs"])
    assert {(r["lam"], r["k"]) for r in d["runs"]} == {(0.0, 4), (0.0, 8), (0.5, 4), (0.5, 8)}
    # the context / stride default to the datastore's key windows
    assert (d["context"], d["stride"]) == (WINDOW, STRIDE) and set(d["recall"]) == {"4", "8"}
    assert f"base LM perplexity {d['ppl_base']:.3f}" in table and "recall@8" in table
    assert "ivf (approximate, nprobe 2) index" in table  # the approximate search's setting beside its numbers
    best = min(d["runs"], key=lambda r: r["ppl"])
    assert f"best: lam {best['lam']:g}, k {best['k']}" in table
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--datastore", str(stores["flat"].path), "--text", "x.txt", "--lam", "0,abc"])
    assert exc.value.code == 2 and "comma-separated list of numbers" in capsys.readouterr().err
    assert main(["eval", "--datastore", str(stores["flat"].path), "--text", "wt103:train", "--quiet"]) == 2
    assert "unknown WikiText-103 split" in capsys.readouterr().err
    assert main(["eval", "--datastore", str(stores["flat"].path), "--text", "wt103:test", "--lam", "1",
                 "--quiet"]) == 2
    assert "λ must be in [0, 1)" in capsys.readouterr().err


def test_eval_rejects_a_datastore_of_another_model(smollm2_lm, stores):
    with pytest.raises(ConfigError, match="hidden size"):
        evaluate_perplexity(smollm2_lm, stores["flat"], ["some text here"], _cfg())


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_base_perplexity_is_the_models_own_logits_after_the_head(family, tmp_path, tiny_lm, outside_docs):
    """Families whose logits are not lm_head(final hidden state): Granite divides them by
    ``logits_scaling``, Cohere multiplies them by ``logit_scale`` (Gemma 2 soft-caps them). The
    eval scores with the model's own logits; before, with lm_head(hidden) (an audit measured
    42,938 for a Granite whose own perplexity was 30,491). Small random-weight models of the real
    classes, the tiny model's tokenizer."""
    from ralmspec.lm.hf import HFLanguageModel
    from tests.lm.conftest import small_model

    extra = {"granite": dict(logits_scaling=4.0), "cohere": dict(logit_scale=0.5)}[family]
    model = small_model(family, vocab=tiny_lm.vocab_size, scale=1.0, **extra)
    lm = HFLanguageModel(model, tiny_lm.tokenizer, eos_token_id=102, max_context=512, name=family)
    docs = [d[:200] for d in outside_docs]
    ds = build_datastore(lm, docs, tmp_path / "ds", DatastoreBuildConfig(window=32, stride=24),
                         model_name=family, progress=False)
    res = evaluate_perplexity(lm, ds, docs, PerplexityConfig(context=16, stride=6, lams=(0.0,)))
    ids = [lm.tokenizer.encode(d) for d in docs]
    assert res.ppl_base == pytest.approx(_direct_ppl(model, ids, 16, 6), rel=1e-6)


def test_span_overlap_counts_spans_inside_one_datastore_document():
    """The leakage measure by hand (n = 3): spans of consecutive values inside ONE datastore
    document; a span across two documents' values is no text the datastore holds."""
    from types import SimpleNamespace

    from ralmspec.knnlm.perplexity import datastore_span_hashes, overlap_tokens

    ds = SimpleNamespace(values=np.array([1, 2, 3, 4, 5, 6], dtype=np.int32), doc_offsets=np.array([0, 3, 6]))
    stored = datastore_span_hashes(ds, 3, block=2)  # blocks smaller than the values: same answer
    assert stored.size == 2 and np.array_equal(stored, datastore_span_hashes(ds, 3))
    assert overlap_tokens([[9, 2, 3, 4]], stored, 3) == 0  # (2, 3, 4) crosses a document boundary
    assert overlap_tokens([[0, 1, 2, 3, 7]], stored, 3) == 3  # targets 1 2 3 7: (1, 2, 3) is stored
    assert overlap_tokens([[0, 4, 5, 6, 1, 2, 3], [8, 1, 2]], stored, 3) == 6  # the first token is no target
    assert overlap_tokens([[0, 4, 5, 6]], np.zeros(0, dtype=np.uint64), 3) == 0


def test_overlap_with_the_datastore_is_measured_and_warned(tmp_path, capsys, tiny_lm, stores, inside_docs,
                                                           outside_docs):
    """A text inside the datastore got a trivially low kNN-LM perplexity and nothing said so
    (SmolLM2, a default `knnlm build --max-tokens 2000` = the first test articles, `eval --text
    wt103:test`: -88.8% vs base, no warning). Now every eval measures the share of scored tokens
    the datastore holds verbatim, and the CLI warns from OVERLAP_WARN on."""
    from ralmspec.knnlm.cli import main
    from ralmspec.knnlm.perplexity import OVERLAP_NGRAM

    inside = evaluate_perplexity(tiny_lm, stores["flat"], inside_docs, _cfg())
    assert inside.overlap_tokens == inside.tokens == EVAL_TOKENS and inside.overlap_fraction == 1.0
    other = load_documents("wt103:valid")[:2]  # other articles: nothing in common
    assert evaluate_perplexity(tiny_lm, stores["flat"], other, _cfg()).overlap_tokens == 0
    # the second halves of the stored articles: what the first article's body repeats of its lead
    # (43 of the first 300 tokens), counted, not a leak of the text itself
    outside = evaluate_perplexity(tiny_lm, stores["flat"], outside_docs, _cfg())
    assert 0 < outside.overlap_tokens < outside.tokens / 4
    mixed = evaluate_perplexity(tiny_lm, stores["ivf"], [other[0], inside_docs[1]], _cfg(max_tokens=None))
    assert 0.2 < mixed.overlap_fraction < 0.8 and mixed.to_dict()["overlap"] == {
        "ngram": OVERLAP_NGRAM, "tokens": mixed.overlap_tokens, "fraction": mixed.overlap_fraction}

    out = tmp_path / "ppl.json"
    base = ["eval", "--datastore", str(stores["flat"].path), "--max-documents", "1", "--max-tokens", "150",
            "--lam", "0,0.5", "--k", "4", "--quiet"]
    assert main([*base, "--text", "wt103:test:first-half", "--json", str(out)]) == 0
    got = capsys.readouterr()
    assert "WARNING: the text is (partly) inside the datastore" in got.out and "150 of 150 scored tokens" in got.out
    assert "WARNING" in got.err and json.loads(out.read_text())["overlap"]["fraction"] == 1.0
    assert main([*base, "--text", "wt103:valid"]) == 0
    got = capsys.readouterr()
    assert "overlap with the datastore: " in got.out and "WARNING" not in got.out + got.err


def test_k_above_the_datastore_size_is_refused(tmp_path, tiny_lm, outside_docs):
    """The search clamps k to the entries, so a row labelled k = 64 over 26 entries held 26
    neighbours and equalled every larger k (measured: k 4 -> 3.9996, k 64 -> 3.9996 on a
    26-entry datastore): now a typed error naming the size."""
    ds = build_datastore(tiny_lm, [outside_docs[0][:150]], tmp_path / "ds", DatastoreBuildConfig(window=16, stride=8),
                         progress=False)
    cfg = PerplexityConfig(context=16, stride=8, max_tokens=20)
    assert evaluate_perplexity(tiny_lm, ds, outside_docs, replace(cfg, ks=(ds.n,))).runs[0].k == ds.n
    with pytest.raises(ConfigError, match=f"exceeds the datastore's {ds.n} entries"):
        evaluate_perplexity(tiny_lm, ds, outside_docs, replace(cfg, ks=(4, ds.n + 1)))
