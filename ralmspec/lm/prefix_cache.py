"""Shared prefix blocks: the KV of canonical prompt blocks, reused across sessions.

The transformers backend (``ralmspec.lm.hf``) computes a prompt's KV only in aligned blocks of
``B`` positions, each by one forward given the KV of the earlier blocks, so the KV of block
``[jB, (j+1)B)`` is a function of the token prefix ``prompt[:(j+1)B]`` alone (and of the torch
thread count the forward ran with). A session already reuses its OWN previous prompt's blocks;
this table lets any session reuse blocks any other session computed: a request whose passage
another request (or an earlier step of its own) already prefilled skips those forwards. It is
vLLM's automatic prefix caching at our block granularity: the RaLM prompt puts the passage
first, so the blocks of "template + passage" recur whenever a passage does (a passage switch
back, a rollback to a passage seen before, popular passages across requests).

Contract: ``get(threads, prefix)`` returns the block stored for exactly this token prefix
(``len(prefix)`` a multiple of ``B``) and thread count, else ``None``; ``put`` stores one,
evicting least recently used blocks beyond ``capacity_bytes`` (0 turns the table off).
An imported block equals the recomputed one bit for bit, so outputs never depend on what the
table held. Not thread-safe by itself: the backend's lock guards it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

from ralmspec.config import is_int
from ralmspec.errors import ConfigError


class PrefixBlocks:
    """LRU table ``(threads, token prefix) -> one block's KV`` bounded by bytes (module doc)."""

    def __init__(self, capacity_bytes: int):
        if not is_int(capacity_bytes, 0):
            raise ConfigError(f"the prefix cache size must be an integer >= 0 bytes, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], tuple[Any, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0  # blocks imported instead of computed

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, threads: int, prefix: Sequence[int]) -> Any | None:
        key = (threads, tuple(prefix))
        entry = self._blocks.get(key)
        if entry is None:
            return None
        self._blocks.move_to_end(key)
        self.hits += 1
        return entry[0]

    def __contains__(self, item: tuple[int, Sequence[int]]) -> bool:
        threads, prefix = item
        return (threads, tuple(prefix)) in self._blocks

    def put(self, threads: int, prefix: Sequence[int], block: Any, nbytes: int) -> None:
        """Store ``block`` (``nbytes`` of KV) for ``prefix``; a block larger than the whole table
        is not kept."""
        if nbytes > self.capacity_bytes:
            return
        key = (threads, tuple(prefix))
        old = self._blocks.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        self._blocks[key] = (block, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.capacity_bytes:
            _, (_, n) = self._blocks.popitem(last=False)
            self.nbytes -= n

    def clear(self) -> None:
        self._blocks.clear()
        self.nbytes = 0
