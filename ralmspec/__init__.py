"""ralmspec: iterative retrieval-augmented LM serving with speculative retrieval.

Speculative output is token-identical to the naive iterative RaLM loop (the oracle in
``ralmspec.engine.naive``); see docs/design.md for the invariants.

The Python API (docs/python-api.md) is importable from here::

    from ralmspec import EngineConfig, build_engine

    with build_engine(EngineConfig()) as engine:
        print(engine.generate_sync("Which city is the American rock band Hed PE from?").text)

The names below load on first use, so ``import ralmspec`` stays cheap (no torch, no FAISS).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "EngineConfig": "ralmspec.config",
    "GenerationConfig": "ralmspec.config",
    "RetrievalConfig": "ralmspec.config",
    "SpeculationConfig": "ralmspec.config",
    "build_engine": "ralmspec.engine.core",
    "RalmEngine": "ralmspec.engine.core",
    "Conversation": "ralmspec.engine.prompt",
    "GenerationResult": "ralmspec.engine.result",
    "RalmSpecError": "ralmspec.errors",
    "ConfigError": "ralmspec.errors",
    "IndexNotFoundError": "ralmspec.errors",
    "ModelLoadError": "ralmspec.errors",
    "RetrievalError": "ralmspec.errors",
    "LMError": "ralmspec.errors",
    "ClosedError": "ralmspec.errors",
}

__all__ = ["__version__", "EngineConfig", "GenerationConfig", "RetrievalConfig", "SpeculationConfig", "build_engine",
           "RalmEngine", "Conversation", "GenerationResult", "RalmSpecError", "ConfigError", "IndexNotFoundError",
           "ModelLoadError", "RetrievalError", "LMError", "ClosedError"]

if TYPE_CHECKING:
    from ralmspec.config import EngineConfig, GenerationConfig, RetrievalConfig, SpeculationConfig
    from ralmspec.engine.core import RalmEngine, build_engine
    from ralmspec.engine.prompt import Conversation
    from ralmspec.engine.result import GenerationResult
    from ralmspec.errors import (ClosedError, ConfigError, IndexNotFoundError, LMError, ModelLoadError,
                                 RalmSpecError, RetrievalError)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ralmspec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
