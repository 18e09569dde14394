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


@pytest.mark.parametrize("make, field", [
    (lambda v: RetrievalConfig(kind="hnsw", hnsw_m=v), "hnsw_m"),
    (lambda v: RetrievalConfig(hnsw_ef_search=v), "hnsw_ef_search"),
    (lambda v: RetrievalConfig(hnsw_ef_construction=v), "hnsw_ef_construction"),
    (lambda v: RetrievalConfig(ivf_nlist=v), "ivf_nlist"),
    (lambda v: RetrievalConfig(ivf_nprobe=v), "ivf_nprobe"),
    (lambda v: RetrievalConfig(rescore_margin=v), "rescore_margin"),
])
@pytest.mark.parametrize("bad", [2.5, "32", None, True])
def test_retrieval_search_parameters_are_integers(make, field, bad):
    """A float hnsw_m failed in FAISS's constructor (TypeError: 'Wrong number or type of arguments'),
    a string or None in the ``< 1`` comparison (TypeError); now a ConfigError naming the field."""
    with pytest.raises(ConfigError, match=rf"^{field} must be an integer >= [01], got {bad!r}$"):
        make(bad)


def test_retrieval_rescore_margin_below_zero_and_a_non_path_index_dir_are_refused():
    with pytest.raises(ConfigError, match="rescore_margin must be an integer >= 0, got -5"):
        RetrievalConfig(rescore_margin=-5)  # was clamped to 0 in silence
    with pytest.raises(ConfigError, match="index_dir must be a folder's path"):
        RetrievalConfig(index_dir=123)  # was a TypeError in os.path when the engine was built
    import pathlib
    RetrievalConfig(index_dir=pathlib.Path("some/index"))


@pytest.mark.parametrize("field", ["enabled", "os3", "naive_fallback", "async_verify", "eager_verify"])
@pytest.mark.parametrize("bad", ["no", "false", 0, None])
def test_speculation_switches_are_bools(field, bad):
    """SpeculationConfig(enabled="no") speculated (a truthy string), as did os3="false" run OS^3."""
    from ralmspec.config import SpeculationConfig

    with pytest.raises(ConfigError, match=rf"^{field} must be True or False, got {bad!r}$"):
        SpeculationConfig(**{field: bad})


@pytest.mark.parametrize("field", ["fixed_stride", "s_max", "window", "prefetch", "max_inflight", "cache_capacity"])
@pytest.mark.parametrize("bad", [2.5, "3", None])
def test_speculation_counts_are_integers(field, bad):
    """fixed_stride=2.5 ran strides [2.5, 2.5, ...], s_max=2.5 a TypeError mid-request, prefetch=2.5
    a RetrievalError 'knowledge base unavailable after 3 attempts', a string or None a TypeError."""
    from ralmspec.config import SpeculationConfig
    from ralmspec.knnlm.speculative import SpeculativeKNNConfig

    with pytest.raises(ConfigError, match=rf"^{field} must be an integer .*got {bad!r}$"):
        SpeculationConfig(**{field: bad})
    if field in ("fixed_stride", "s_max", "window"):  # the OS^3 knobs kNN-LM shares
        with pytest.raises(ConfigError, match=rf"^{field} must be an integer"):
            SpeculativeKNNConfig(**{field: bad})


@pytest.mark.parametrize("field, kind", [("retrieval", "RetrievalConfig"), ("generation", "GenerationConfig"),
                                         ("speculation", "SpeculationConfig")])
@pytest.mark.parametrize("bad", [{"kind": "bm25"}, None])
def test_engine_config_parts_must_be_their_configs(field, kind, bad):
    """EngineConfig(retrieval={"kind": "bm25"}) was made, then build_engine failed with
    AttributeError: 'dict' object has no attribute 'index_dir'."""
    with pytest.raises(ConfigError, match=rf"^{field} must be a {kind} "):
        EngineConfig(**{field: bad})


@pytest.mark.parametrize("field, bad", [("lm_backend", "vlm"), ("lm_runner", "fast"), ("lm_dtype", "fp17"),
                                        ("lm_dtype", None)])
def test_engine_config_lm_names_are_checked_when_made(field, bad):
    """They were checked only when the LM loaded, after the knowledge base had been opened."""
    with pytest.raises(ConfigError, match=rf"^{field} must be one of .*got {bad!r}$"):
        EngineConfig(**{field: bad})
    EngineConfig(lm_backend="vllm", lm_runner="batched", lm_dtype="bfloat16")


@pytest.mark.parametrize("make, field", [
    (lambda: RetrievalConfig(emulate_pad=-1), "emulate_pad"),
    (lambda: RetrievalConfig(kind="bm25", emulate_pad=10), "emulate_pad"),
    (lambda: RetrievalConfig(encoder_batching="some"), "encoder_batching"),
    (lambda: EngineConfig(lm_device="mps"), "lm_device"),
    (lambda: EngineConfig(lm_prefix_cache_mib=-1), "lm_prefix_cache_mib"),
])
def test_a_config_error_names_the_field_a_python_caller_set(make, field):
    """They named only the CLI's flag ('--lm-device must be ...'), which a Python caller never
    wrote; now the field first, the flag beside it."""
    with pytest.raises(ConfigError, match=rf"^{field} \(--"):
        make()
