"""ralmspec/config.py: the one integer check behind the "must be an integer" errors, and the text check."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from ralmspec.config import (
    EngineConfig, GenerationConfig, RetrievalConfig, check_text, first_int, int_values, invalid_text_field, is_int,
    lone_surrogate,
)
from ralmspec.errors import ConfigError


def test_is_int_takes_integers_in_range_and_never_a_bool():
    assert is_int(0) and is_int(-5) and is_int(2 ** 70)
    assert not is_int(True) and not is_int(False) and not is_int(3.0) and not is_int("3") and not is_int(None)
    assert is_int(4, 1) and is_int(1, 1) and not is_int(0, 1)
    assert is_int(5, 1, 5) and not is_int(6, 1, 5) and is_int(-3, None, 0)
    assert not is_int(np.int64(3)) and is_int(np.int64(3), 1, numpy=True)
    assert not is_int(np.bool_(True), numpy=True) and not is_int(np.float32(3), numpy=True)


def test_int_values_flattens_lists_in_order_and_skips_non_integers():
    # a model config's eos_token_id is an int, a list of ints or None (lm/models.py, lm/vllm.py)
    assert int_values(2, None, [7, True, "x", 3], (5,), 2.0, False) == [2, 7, 3, 5]
    assert int_values() == [] and int_values(None, []) == []
    assert first_int(None, [True, 9], 4) == 9 and first_int(None, "x") is None


@pytest.mark.parametrize("bad", [True, -1, 2.0, "8"])
def test_configs_reject_non_integers_with_a_message(bad):
    with pytest.raises(ConfigError, match="emulate-pad"):
        RetrievalConfig(emulate_pad=bad)
    with pytest.raises(ConfigError, match="prefix-cache-mib"):
        EngineConfig(lm_prefix_cache_mib=bad)
    with pytest.raises(ConfigError, match="stride must be an integer in"):
        GenerationConfig(stride=bad if bad != -1 else 0)


def test_lone_surrogates_are_found_and_refused_by_name():
    assert lone_surrogate("") is None and lone_surrogate("caf\u00e9 \U0001f642") is None
    assert lone_surrogate("ab\ud800") == 2 and lone_surrogate("\udcff") == 0  # argv's surrogateescape
    assert lone_surrogate(json.loads('"\\ud83d\\ude42"')) is None  # JSON joins an escaped pair: one character
    assert lone_surrogate("\ud83d\ude42") == 0  # a Python string keeps the two halves apart
    check_text("fine", "the prompt")
    with pytest.raises(ConfigError, match="the prompt is not valid Unicode: a lone surrogate U[+]DFFF at character 1"):
        check_text("x\udfff", "the prompt")


def test_the_first_field_that_is_not_unicode_is_named_as_the_api_names_fields():
    assert invalid_text_field({"prompt": "ok", "stop": ["\n", 3, None], "ralm": {"stride": 2}}) is None
    assert invalid_text_field({"a": [1, "x", {"b": "\ud800"}], "c": "\udc00"}) == "a[2].b"  # depth first, in order
    assert invalid_text_field({"a": {"ok": 1, "\udc00": 2}}) == "a.\\udc00"  # a key: named with its escape
    assert invalid_text_field(["\udfff"]) == "[0]" and invalid_text_field("\ud800") == ""  # "": the whole value
    deep: list = ["\ud800"]
    for _ in range(5000):  # deeper than Python's recursion limit: the walk is iterative
        deep = [deep]
    assert invalid_text_field(deep) == "[0]" * 5001


def test_hnsw_m_below_2_is_refused():
    """FAISS's HNSW crashes the process (SIGSEGV) adding to a graph of M 1 (`index build --hnsw-m 1`)."""
    RetrievalConfig(kind="hnsw", hnsw_m=2)
    with pytest.raises(ConfigError, match="hnsw_m must be >= 2, got 1"):
        RetrievalConfig(kind="hnsw", hnsw_m=1)


@pytest.mark.parametrize("field, value", [("s_max", 0), ("s_max", 65), ("window", 0), ("gamma_max", float("nan")),
                                          ("gamma_max", 1.0)])
def test_os3_knobs_are_refused_by_name_with_the_value(field, value):
    """One combined message ("s_max must be in [1, 64], window >= 1, 0 < gamma_max < 1") named
    neither the bad field nor its value, and a server's 400 named ralm.s_max for any of them."""
    from ralmspec.config import SpeculationConfig

    with pytest.raises(ConfigError, match=rf"^{field} must .*got {value!r}$"):
        SpeculationConfig(**{field: value})



def _timeout_holders() -> list:
    from ralmspec.cluster import RayShardConfig
    from ralmspec.engine.scheduler import SchedulerConfig
    from ralmspec.lm.ray_replicas import RayLMConfig
    from ralmspec.retrieval.remote import RemoteRetriever

    remote = functools.partial(RemoteRetriever, "http://127.0.0.1:9")
    return [(RayShardConfig, "call_timeout_s"), (RayShardConfig, "start_timeout_s"), (RayLMConfig, "call_timeout_s"),
            (SchedulerConfig, "request_timeout_s"), (SchedulerConfig, "retrieval_timeout_s"),
            (remote, "timeout_s"), (remote, "connect_timeout_s")]


@pytest.mark.parametrize("make,field", _timeout_holders())
@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan"), float("inf")])
def test_a_timeout_is_a_finite_positive_number_of_seconds(make, field, seconds):
    """An infinite timeout was accepted (NaN too, by the remote retriever: ``nan <= 0`` is False),
    and failed later or meant "no limit" by accident; each names its field and value now."""
    with pytest.raises(ConfigError, match=rf"{field} must be a finite .*got (0\.0|-1\.0|nan|inf)"):
        make(**{field: seconds})
