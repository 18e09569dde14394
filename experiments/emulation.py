"""The EMULATED large knowledge base lives in ``ralmspec.retrieval.emulated`` (``ralmspec bench
--emulate-pad N`` uses it too); re-exported here for the study harness."""

from ralmspec.retrieval.emulated import (  # noqa: F401
    PAD_CHUNK, PaddedCostRetriever, build_pad_index, emulated_label, real_label,
)
