"""Wording shared by the reports of ``ralmspec bench`` (document-level RaLM) and ``ralmspec knnlm
bench``: one sentence for what an identity check covered. Pure text; imports nothing of ralmspec."""

from __future__ import annotations


def identity_phrase(same: int, n: int, items: str, speculated: int, verified: int, accepted: int,
                    rollbacks: int, unit: str = "steps") -> str:
    """"``same``/``n`` ``items`` identical to the naive loop over K speculated ``unit``", with the
    counts behind it; with K = 0 it says that speculation never ran instead."""
    head = f"{same}/{n} {items} identical to the naive loop"
    if speculated == 0:
        return (f"{head} over 0 speculated {unit}: speculation never ran (all {verified} {unit} were "
                f"retrieved for real), so this compared the naive loop with itself")
    return (f"{head} over {speculated} speculated {unit} (accepted {accepted}, rollbacks {rollbacks}; "
            f"{verified} {unit} retrieved for real)")
