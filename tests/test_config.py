"""ralmspec/config.py: the one integer check behind the "must be an integer" errors."""

from __future__ import annotations

import numpy as np
import pytest

from ralmspec.config import EngineConfig, GenerationConfig, RetrievalConfig, first_int, int_values, is_int
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
