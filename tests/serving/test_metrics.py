"""ralmspec/serving/metrics.py on its own: how a scrape renders the process's memory."""

from __future__ import annotations

import platform

from ralmspec.memory import process_rss_bytes
from ralmspec.serving.metrics import ServerMetrics

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_a_scrape_renders_the_memory_it_is_given():
    """The RSS and heap gauges show the ``memory`` of the stats the scrape already read (one
    /proc read per scrape), and read their own where none is given."""
    memory = {"rss_bytes": 123456789, "heap": {"in_use_bytes": 1000, "free_bytes": 20, "mmapped_bytes": 0,
                                               "arena_bytes": 1020, "releasable_bytes": 0}}
    text = ServerMetrics().render(memory=memory)
    lines = set(text.splitlines())
    assert "ralmspec_process_resident_memory_bytes 123456789" in lines
    assert "ralmspec_process_heap_in_use_bytes 1000" in lines and "ralmspec_process_heap_free_bytes 20" in lines
    own = ServerMetrics().render()
    rss = next(float(x.split()[1]) for x in own.splitlines() if x.startswith("ralmspec_process_resident_memory_bytes "))
    if process_rss_bytes() is not None:
        assert rss > 1e6
    assert ("ralmspec_process_heap_free_bytes" in own) == GLIBC


def test_a_scrape_labels_each_ray_worker_and_marks_the_silent_one_down():
    """``memory.workers`` (LM replicas, shard actors) become gauges labelled by role and index;
    a worker that did not answer is ``ralmspec_worker_up`` 0 with no memory gauges of its own."""
    heap = {"in_use_bytes": 7000, "free_bytes": 300, "mmapped_bytes": 0, "arena_bytes": 7300, "releasable_bytes": 0}
    workers = [{"role": "lm_replica", "index": 0, "pid": 11, "rss_bytes": 5000, "heap": heap, "heap_trim": None},
               {"role": "lm_replica", "index": 1, "error": "no answer within 2 s"},
               {"role": "kb_shard", "index": 0, "pid": 12, "rss_bytes": 6000, "heap": None, "heap_trim": None}]
    lines = set(ServerMetrics().render(memory={"rss_bytes": 1, "heap": None, "workers": workers}).splitlines())
    assert {'ralmspec_worker_up{role="lm_replica",index="0"} 1', 'ralmspec_worker_up{role="lm_replica",index="1"} 0',
            'ralmspec_worker_up{role="kb_shard",index="0"} 1',
            'ralmspec_worker_resident_memory_bytes{role="lm_replica",index="0"} 5000',
            'ralmspec_worker_resident_memory_bytes{role="kb_shard",index="0"} 6000',
            'ralmspec_worker_heap_in_use_bytes{role="lm_replica",index="0"} 7000',
            'ralmspec_worker_heap_free_bytes{role="lm_replica",index="0"} 300'} <= lines
    assert not any('index="1"' in x for x in lines if not x.startswith("ralmspec_worker_up"))
    assert not any('role="kb_shard"' in x for x in lines if x.startswith("ralmspec_worker_heap"))
    assert "# TYPE ralmspec_worker_up gauge" in lines
    alone = ServerMetrics().render(memory={"rss_bytes": 1, "heap": None, "workers": []})
    assert "ralmspec_worker_" not in alone  # one process: no worker gauges at all
