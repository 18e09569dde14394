"""The speculation cache (``NeighbourCache``): its memory is bounded by its capacity, not by the
datastore (one cache per request), and its LRU bookkeeping (slots, use stamps, evictions) and
ranking follow the documented rule exactly (a plain-Python model of it, below)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from ralmspec.knnlm.speculative import NeighbourCache


class _Huge:
    """The test datastore, claiming ``n`` entries (a WikiText-103-sized id space): only ids of
    the real one are ever asked for."""

    def __init__(self, ds, n: int):
        self._ds, self.n = ds, n

    def __getattr__(self, name):
        return getattr(self._ds, name)


def _workload(cache: NeighbourCache, ds, seed: int) -> list:
    """Inserts (with successors and evictions) and lookups of entries of ``ds``; what the cache
    answered."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(20):
        cache.add_search_result(rng.choice(ds.n, size=8, replace=False), successors=10)
        q = ds.key_vectors(cache.entry_ids()[:1])[0].astype(np.float32) + rng.normal(0, 0.1, ds.dim).astype(np.float32)
        out.append(cache.topk(q, 8))
    out.append((cache.entry_ids(), cache.evictions))
    return out


def test_cache_memory_is_bounded_by_its_capacity_not_the_datastore(knn_datastores):
    """A request's cache used to hold a dense entry id -> slot table: 4 bytes per datastore
    entry (~400 MB for a 103M-entry datastore, per concurrent request)."""
    ds = knn_datastores["flat"]
    small = _workload(NeighbourCache(ds, 64), ds, seed=1)
    huge_ds = _Huge(ds, 10 ** 7)
    tracemalloc.start()
    try:
        cache = NeighbourCache(huge_ds, 64)
        set_up = tracemalloc.get_traced_memory()[1]
        huge = _workload(cache, ds, seed=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set_up < 256 * 1024, f"set-up allocated {set_up / 2**20:.1f} MiB for a 64-entry cache"
    assert peak < 2 * 2 ** 20, f"the cache's work peaked at {peak / 2**20:.1f} MiB"
    assert huge[-1][1] > 0  # it evicted
    for (a_ids, a_d), (b_ids, b_d) in zip(small[:-1], huge[:-1]):
        assert np.array_equal(a_ids, b_ids) and np.array_equal(a_d, b_d)
    assert np.array_equal(small[-1][0], huge[-1][0]) and small[-1][1] == huge[-1][1]


class _ModelCache:
    """The cache's rule in plain Python: slot ``s`` holds ``ids[s]``, last used at ``stamp[s]``.
    An insert keeps each id's last position, at most ``capacity`` of them (the last); ids not
    cached take the free slots in order, then the slots (ascending) of the least recently used
    entries not in the batch; then the batch is used in order. ``topk`` ranks every cached entry
    by (float64 squared L2, id) and uses the answer, best last."""

    def __init__(self, ds, capacity: int):
        self.ds, self.capacity = ds, capacity
        self.ids: list[int] = []
        self.stamp: list[int] = []
        self.clock = self.evictions = 0

    def add(self, ids) -> None:
        batch: list[int] = []
        for i in reversed([int(x) for x in ids]):
            if i not in batch:
                batch.append(i)
        batch = batch[::-1][-self.capacity:]
        new = [i for i in batch if i not in self.ids]
        free = list(range(len(self.ids), min(self.capacity, len(self.ids) + len(new))))
        need = len(new) - len(free)
        lru = sorted((s for s in range(len(self.ids)) if self.ids[s] not in batch), key=self.stamp.__getitem__)
        self.evictions += max(0, need)
        for s, i in zip(free + sorted(lru[:max(0, need)]), new):
            if s == len(self.ids):
                self.ids.append(i)
                self.stamp.append(0)
            else:
                self.ids[s] = i
        for j, i in enumerate(batch):
            self.stamp[self.ids.index(i)] = self.clock + j
        self.clock += len(batch)

    def topk(self, q, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array(self.ids, dtype=np.int64)
        d = self.ds.distances(q, ids)
        order = np.lexsort((ids, d))[:k]
        for r, s in enumerate(order):
            self.stamp[int(s)] = self.clock + order.size - 1 - r
        self.clock += order.size
        return ids[order], d[order]


@pytest.mark.parametrize("prefilter", [True, False])
def test_cache_follows_the_lru_rule_exactly(knn_datastores, prefilter):
    ds = knn_datastores["flat"]
    rng = np.random.default_rng(11)
    cache, model = NeighbourCache(ds, 40, prefilter=prefilter, prefilter_margin=4), _ModelCache(ds, 40)
    pool = rng.choice(ds.n, size=120, replace=False)  # a small id pool: re-inserts, hits, duplicates
    for step in range(300):
        kind = rng.integers(0, 4)
        if kind == 0 and len(model.ids):  # a lookup near a cached key
            q = ds.key_vectors([model.ids[int(rng.integers(len(model.ids)))]])[0].astype(np.float32)
            q += rng.normal(0, 0.05, ds.dim).astype(np.float32)
            k = int(rng.choice([1, 8, 60]))
            (a_ids, a_d), (b_ids, b_d) = cache.topk(q, k), model.topk(q, k)
            assert np.array_equal(a_ids, b_ids) and np.array_equal(a_d, b_d), step
        elif kind == 1:  # a batch longer than the capacity, with duplicates
            cache_in = rng.choice(pool, size=int(rng.integers(41, 70)))
            cache.add(cache_in)
            model.add(cache_in)
        else:
            ids = rng.choice(pool, size=int(rng.integers(1, 12)))
            cache.add(ids)
            model.add(ids)
        n = len(cache)
        assert n == len(model.ids) and cache.evictions == model.evictions, step
        assert cache._ids[:n].tolist() == model.ids and cache._stamp[:n].tolist() == model.stamp, step
        probe = rng.choice(pool, size=5).tolist() + [-1, ds.n, 10 ** 12]
        assert [i in cache for i in probe] == [i in model.ids for i in probe], step
    assert cache.evictions > 100
