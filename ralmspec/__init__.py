"""ralmspec: iterative retrieval-augmented LM serving with speculative retrieval.

Speculative output is token-identical to the naive iterative RaLM loop (the oracle in
``ralmspec.engine.naive``); see docs/design.md for the invariants.
"""

__version__ = "0.1.0"
