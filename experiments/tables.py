"""A small result table written as Markdown (with its notes) and CSV (raw values)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Column:
    key: str
    title: str
    fmt: Callable[[Any], str] = str


@dataclass
class Table:
    name: str  # file stem
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self, heading: str = "###") -> str:
        head = "| " + " | ".join(c.title for c in self.columns) + " |"
        sep = "|" + "|".join("---" for _ in self.columns) + "|"
        body = []
        for r in self.rows:
            cells = []
            for c in self.columns:
                v = r.get(c.key)
                cells.append("-" if v is None else c.fmt(v))
            body.append("| " + " | ".join(cells) + " |")
        out = [f"{heading} {self.title}", "", head, sep, *body]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def write(self, out_dir: str) -> tuple[str, str]:
        os.makedirs(out_dir, exist_ok=True)
        md = os.path.join(out_dir, f"{self.name}.md")
        cs = os.path.join(out_dir, f"{self.name}.csv")
        with open(md, "w", encoding="utf-8") as f:
            f.write(self.markdown(heading="#"))
        with open(cs, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[c.key for c in self.columns], extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow({c.key: r.get(c.key) for c in self.columns})
        return md, cs


def fx(v: float) -> str:
    return f"{v:.2f}x"


def f2(v: float) -> str:
    return f"{v:.2f}"


def f3(v: float) -> str:
    return f"{v:.3f}"


def f1(v: float) -> str:
    return f"{v:.1f}"


def pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def pct1(v: float) -> str:
    return f"{100 * v:.1f}%"
