"""A smaller k's answer is a prefix of a larger k's answer, for every kind.

The speculative engine verifies with k = prefetch (20, 256) while the naive loop asks for k = 1;
both must see the same top-1. HNSW is the delicate case: its beam must not widen with k
(the test indexes use efSearch = 16, below both prefetch sizes).
"""

import pytest

from .conftest import KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_is_a_prefix_of_larger_k(kind, kb_retrievers, kb_queries):
    r = kb_retrievers[kind]
    for q in kb_queries[:24]:
        one = r.search_sync([q], 1)[0]
        mid = r.search_sync([q], 20)[0]
        big = r.search_sync([q], 100)[0]
        assert mid[:1] == one, (kind, q)
        assert big[:20] == mid, (kind, q)
        # approximate kinds may not reach k: HNSW's beam, or IVF's 2 probed lists of this small
        # index (on the 160-passage test corpus one query's two lists hold only 18 vectors);
        # whatever they hold, k = 20 must return as many as k = 100 up to 20
        assert len(big) == 100 or (kind in ("hnsw", "ivf") and len(mid) == min(20, len(big)) and big)
