"""Names of speculative variants used by the studies, and the SpeculationConfig each one means.

Grammar (every name resolves against one *base* SpeculationConfig, the ``[speculation]`` table):

- ``all``: RaLMSpec with every technique: prefetch 20, OS^3, asynchronous verification
  (the paper's "P+S+A"); identical to the ablation ladder's ``all``.
- ``none``, ``+prefetch``, ``+os3``, ``+async``: the ablation ladder of ``ralmspec.bench.ABLATIONS``
  (speculation with fixed stride 3 and no prefetch, then one technique at a time).
- ``all-sync``: ``all`` with synchronous verification (prefetch 20 + OS^3 only).
- ``s=K``: ``all`` with OS^3 switched off and a fixed speculation stride of K rounds' steps.
- ``prefetch=K``: ``all`` with the top-K of every verification put in the cache.

Two names that resolve to the same SpeculationConfig are the same variant (it runs once).
"""

from __future__ import annotations

import re
from dataclasses import replace

from ralmspec.bench import ABLATIONS, ablation_variants
from ralmspec.config import SpeculationConfig
from ralmspec.errors import ConfigError

_FIXED = re.compile(r"^s=(\d+)$")
_PREFETCH = re.compile(r"^prefetch=(\d+)$")

VARIANT_HELP = ("'all', 'all-sync', 'none', '+prefetch', '+os3', '+async', 's=K' (fixed stride K, else 'all') "
                "or 'prefetch=K' ('all' with prefetch K)")


def resolve_variant(name: str, base: SpeculationConfig) -> SpeculationConfig:
    """The SpeculationConfig a variant name stands for (see module doc). ConfigError if unknown."""
    if not isinstance(name, str):
        raise ConfigError(f"variant names must be strings, got {name!r}")
    ladder = ablation_variants(base)
    if name in ladder:
        return ladder[name]
    full = ladder["all"]
    if name == "all-sync":
        return replace(full, async_verify=False)
    m = _FIXED.match(name)
    if m:
        return replace(full, os3=False, fixed_stride=int(m.group(1)))
    m = _PREFETCH.match(name)
    if m:
        return replace(full, prefetch=int(m.group(1)))
    raise ConfigError(f"unknown variant {name!r}; use {VARIANT_HELP}")


def ladder_names() -> list[str]:
    """The ablation ladder in the paper's order."""
    return list(ABLATIONS)
