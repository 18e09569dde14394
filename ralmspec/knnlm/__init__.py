"""kNN-LM (Khandelwal et al., 2020) with speculative retrieval (RaLMSpec, docs/design.md §1, kNN-LM).

- :mod:`ralmspec.knnlm.datastore`: build / load the datastore (keys = the LM's final hidden
  state, values = next token ids, in corpus order) and its canonical, batch-invariant k-NN search.
- :mod:`ralmspec.knnlm.open`: open a datastore folder, whole, sharded in this process or on Ray
  (:mod:`ralmspec.knnlm.sharded`).
- :mod:`ralmspec.knnlm.model`: the naive kNN-LM greedy decoder (the oracle).
- :mod:`ralmspec.knnlm.speculative`: speculative kNN-LM (locality cache + batched verification),
  token-identical to the naive decoder.
- :mod:`ralmspec.knnlm.perplexity`: perplexity of the base LM and of the kNN-LM on a text (λ / k /
  T sweeps from one LM pass; recall of approximate indexes).
- :mod:`ralmspec.knnlm.texts`: datastore and evaluation texts (``wt103:SPLIT[:PART]``, files).
- :mod:`ralmspec.knnlm.cli`: ``ralmspec knnlm build | reindex | generate | bench | eval``.
"""
