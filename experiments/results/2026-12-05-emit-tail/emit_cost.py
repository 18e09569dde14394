"""What passing verified output to a stream costs the event loop over one long answer: the
driver's ``emit_verified`` reads the verified end and the steps that completed it after every
step. Before: both by scanning every step of the request (quadratic in the answer); now:
``RoundBook.verified_end`` / ``verified_from`` read back from the end of the verified prefix.

    python experiments/results/2026-12-05-emit-tail/emit_cost.py

A synthetic request of ``steps`` verified steps of ``stride`` tokens (RaLM at stride 4: 1,024
steps for a 4,096-token answer; one step per token as kNN-LM's driver runs, which passes no
``on_verified`` today: what it would cost a kNN-LM stream), one emission after each step, as the
driver does; the old code is inlined here, the new is the library's.

Measured on the 2-core VM (2026-12-05, best of 3): RaLM 0.025 s -> 0.0010 s per answer; one
step per token 0.381 s -> 0.0042 s; the same steps passed on."""

from __future__ import annotations

import time

from ralmspec.speculation.rounds import RoundBook, Step


def old_emission(book: RoundBook, start: int) -> tuple[int, list[Step]]:
    end = 0
    for st in book.steps:
        if not st.verified or st.end is None:
            break
        end = st.end
    return end, [st for st in book.steps if st.end is not None and start <= st.start < end]


def new_emission(book: RoundBook, start: int) -> tuple[int, list[Step]]:
    return book.verified_end(0), book.verified_from(start)


def run(emit, steps: int, stride: int) -> tuple[float, list]:
    book = RoundBook(Step(0, None, 0, verified=True, end=stride))
    emitted, out = 0, []
    t = time.perf_counter()
    for i in range(1, steps):
        book.add(Step(i * stride, None, 0, verified=True, end=(i + 1) * stride))
        end, got = emit(book, emitted)
        out.append([st.start for st in got])
        emitted = end
    return time.perf_counter() - t, out


if __name__ == "__main__":
    for steps, stride, what in ((1024, 4, "RaLM, 4,096 tokens at stride 4"), (4096, 1, "one step per token, 4,096 tokens")):
        old_s, old_out = min((run(old_emission, steps, stride) for _ in range(3)), key=lambda r: r[0])
        new_s, new_out = min((run(new_emission, steps, stride) for _ in range(3)), key=lambda r: r[0])
        assert old_out == new_out
        print(f"{what}: {steps} emissions, old {old_s:.3f} s, new {new_s:.4f} s, same steps")
