"""Passage corpus: doc ids are dense integers 0..N-1 in file order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence


@dataclass(frozen=True)
class Passage:
    doc_id: int
    title: str
    text: str
    source_id: str = ""  # the id given in the user's file, if any

    @property
    def content(self) -> str:
        """What is prepended to the LM context: ``title + "\\n" + text`` (docs/design.md §1)."""
        return f"{self.title}\n{self.text}"


class Corpus(Sequence[Passage]):
    """An immutable, indexable list of passages; ``corpus[doc_id]``."""

    def __init__(self, passages: Sequence[Passage]):
        for i, p in enumerate(passages):
            if p.doc_id != i:
                raise ValueError(f"passage {i} has doc_id {p.doc_id}; doc ids must be 0..N-1 in order")
        self._passages = list(passages)

    def __len__(self) -> int:
        return len(self._passages)

    def __getitem__(self, doc_id):  # type: ignore[override]
        return self._passages[doc_id]

    def __iter__(self) -> Iterator[Passage]:
        return iter(self._passages)

    def contents(self) -> list[str]:
        return [p.content for p in self._passages]
